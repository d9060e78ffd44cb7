"""
ConsumerControl against a real HTTP server on a loopback port: what the
lifecycle, the health prober and server adapters rely on.  Answers of any status
are read (capped); a route call insists on success; a dead port, a stalled
server and a failing ``systemctl`` each become one ``ControlFailed`` whose
message names the call, and a cancelled call stays a cancellation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mgpumanager.common.answers import Answer
from mgpumanager.config.document import ConsumerConfig, Route
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.commands import CommandResult, CommandTimedOut
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from tests.builders import consumer


class Server(Resource):
    """Answers each path as told: ``(status, body)``, or holds it open on ``/hang``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.seen: list[tuple[str, str, bytes, list[bytes]]] = []
        self.held: list[Request] = []
        self.gone: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        body = request.content.read() if request.content is not None else b""
        types = request.requestHeaders.getRawHeaders(b"content-type", [])
        self.seen.append((request.method.decode(), path, body, types))
        if path == "/hang":
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: self.gone.append(request))
            return NOT_DONE_YET
        status, answer = self.answers.get(path, (200, b"{}"))
        request.setResponseCode(status)
        return answer


class Harness:
    def __init__(self, server: Server, url: str, pool: HTTPConnectionPool) -> None:
        self.server = server
        self.clock = Clock()
        self.commands: list[tuple[list[str], float]] = []
        self.command_result: Any = 0
        self.consumer: ConsumerConfig = parse_config(
            {"consumers": {"c": {**consumer(1), "url": url}}}
        ).consumers["c"]
        client = HTTPClient(Agent(reactor, pool=pool))
        self.control = ConsumerControl(
            client, self.clock, self.run, systemctl=("sudo", "-n", "systemctl")
        )

    def run(self, argv: Sequence[str], timeout: float) -> Deferred[CommandResult]:
        self.commands.append((list(argv), timeout))
        if isinstance(self.command_result, Exception):
            return fail(self.command_result)
        code, output = (
            self.command_result if isinstance(self.command_result, tuple)
            else (self.command_result, "")
        )
        return succeed(CommandResult(argv=tuple(argv), code=code, output=output))


@pytest_twisted.async_yield_fixture
async def harness() -> AsyncIterator[Harness]:
    server = Server()
    port = reactor.listenTCP(0, Site(server), interface="127.0.0.1")  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield Harness(server, f"http://127.0.0.1:{port.getHost().port}", pool)
    for request in server.held:
        if not request.finished and not request._disconnected:
            request.finish()
    await port.stopListening()
    await pool.closeCachedConnections()


def tick() -> Deferred[None]:
    """Let the real reactor turn (the server side of a loopback call)."""
    return deferLater(reactor, 0.01, lambda: None)


async def failure_of(call: Any) -> ControlFailed:
    with pytest.raises(ControlFailed) as caught:
        await call
    return caught.value


@pytest_twisted.ensureDeferred
async def test_get_json_reads_the_object_and_status_of_any_answer(harness: Harness) -> None:
    harness.server.answers["/api/ps"] = (503, json.dumps({"models": [], "busy": True}).encode())

    code, answer = await harness.control.get_json(harness.consumer, "GET", "/api/ps", 5.0)

    assert (code, answer) == (503, {"models": [], "busy": True})


@pytest_twisted.ensureDeferred
async def test_get_json_sends_a_json_body(harness: Harness) -> None:
    body = {"model": "m", "keep_alive": 0}

    await harness.control.get_json(harness.consumer, "POST", "/api/generate", 5.0, body=body)

    method, path, sent, types = harness.server.seen[-1]
    assert (method, path, json.loads(sent), types) == (
        "POST", "/api/generate", body, [b"application/json"]
    )


@pytest.mark.parametrize(
    "answer", [b"not json", b"[1, 2]", json.dumps({"pad": "x" * 2000}).encode()]
)
@pytest_twisted.ensureDeferred
async def test_get_json_gives_none_for_what_is_not_a_small_json_object(
    harness: Harness, answer: bytes
) -> None:
    harness.server.answers["/health"] = (200, answer)

    code, document = await harness.control.get_json(
        harness.consumer, "GET", "/health", 5.0, cap=1000
    )

    assert (code, document) == (200, None)


@pytest_twisted.ensureDeferred
async def test_call_route_sends_the_configured_body_and_returns_the_answer(
    harness: Harness,
) -> None:
    harness.server.answers["/free"] = (200, b"freed")
    route = Route("POST", "/free", b'{"unload_models":true}')

    answer = await harness.control.call_route(harness.consumer, route, 5.0)

    assert answer == Answer(200, b"freed")
    assert harness.server.seen[-1] == (
        "POST", "/free", b'{"unload_models":true}', [b"application/json"]
    )


@pytest_twisted.ensureDeferred
async def test_call_route_refuses_an_answer_other_than_2xx_quoting_it(harness: Harness) -> None:
    harness.server.answers["/load"] = (500, b"CUDA error:\n  out of memory")

    error = await failure_of(
        harness.control.call_route(harness.consumer, Route("POST", "/load"), 5.0)
    )

    assert error.message == "POST /load answered HTTP 500 CUDA error: out of memory"
    assert not error.timed_out


@pytest_twisted.ensureDeferred
async def test_a_closed_port_fails_with_a_short_reason(harness: Harness) -> None:
    closed = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
    port = closed.getHost().port
    await closed.stopListening()
    dead = parse_config({"consumers": {"d": consumer(port)}}).consumers["d"]

    error = await failure_of(harness.control.request(dead, "GET", "/health", 5.0))

    assert error.message == "GET /health: connection refused"
    assert error.cause == "connection refused"


@pytest_twisted.ensureDeferred
async def test_a_stalled_answer_times_out_and_the_connection_is_closed(harness: Harness) -> None:
    pending = Deferred.fromCoroutine(
        harness.control.request(harness.consumer, "GET", "/hang", 2.0)
    )
    while not harness.server.held:
        await tick()

    harness.clock.advance(2.0)
    error = await failure_of(pending)

    assert (error.message, error.timed_out) == ("GET /hang timed out after 2 s", True)
    while not harness.server.gone:
        await tick()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_call_is_a_cancellation_not_a_failure(harness: Harness) -> None:
    pending = Deferred.fromCoroutine(
        harness.control.request(harness.consumer, "GET", "/hang", 30.0)
    )
    while not harness.server.held:
        await tick()

    pending.cancel()

    with pytest.raises(CancelledError):
        await pending
    assert not harness.clock.getDelayedCalls(), "the time limit is dropped with the call"


@pytest_twisted.ensureDeferred
async def test_systemctl_runs_the_configured_prefix(harness: Harness) -> None:
    result = await harness.control.systemctl("stop", "whisper.service", 30.0)

    assert result.ok
    assert harness.commands == [(["sudo", "-n", "systemctl", "stop", "whisper.service"], 30.0)]


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        (
            (5, "Unit whisper.service not loaded."),
            "`sudo -n systemctl start whisper.service` exited with 5: "
            "Unit whisper.service not loaded.",
        ),
        (CommandTimedOut("`systemctl start` took longer than 30 s"),
         "`systemctl start` took longer than 30 s"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_failing_systemctl_is_one_control_failure(
    harness: Harness, outcome: Any, message: str
) -> None:
    harness.command_result = outcome

    error = await failure_of(harness.control.systemctl("start", "whisper.service", 30.0))

    assert error.message == message
