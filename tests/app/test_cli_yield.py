"""
``mgpumanager yield`` and ``resume`` against a loopback stand-in that answers as
the daemon's yield routes do: the request each sends, that ``yield`` waits for a
slow answer, what they print, and their exit status (0 done, 1 unreachable or an
error envelope, 2 a usage error).  The command blocks, so it runs in a thread
while the reactor serves.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mgpumanager.app import cli_yield
from mgpumanager.app.cli import main
from mgpumanager.app.cli_yield import duration
from tests.app.test_cli import run, run_in_thread

TOKEN = "yield-token-0123456789"
SINCE = "2026-12-01T20:00:00Z"
FREE_MIB = 23552
_PATH = re.compile(r"/v1/gpus/([^/]+)/yield")


@attrs.define
class Seen:
    """One request the stand-in received."""

    method: str
    path: str
    body: Any
    content_type: str | None


class YieldRoutes(Resource):
    """
    ``POST``/``DELETE /v1/gpus/<index>/yield`` as SPEC describes them: the token is
    needed, an unknown card is the daemon's 404 ``not_found``, a bad body a 400,
    and ``POST`` answers ``{"card", "yielded", "free_mib"}`` once the card is held
    (here after ``delay`` seconds, as if a job were still running).
    """

    isLeaf = True

    def __init__(self, cards: int = 2) -> None:
        super().__init__()
        self.cards = cards
        self.delay = 0.0
        self.seen: list[Seen] = []

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", b"application/json")
        raw = request.content.read() if request.content is not None else b""
        method = request.method.decode()
        self.seen.append(Seen(method, request.path.decode(), json.loads(raw) if raw else None,
                              (request.getHeader("content-type") or None)))
        if request.getHeader("authorization") != f"Bearer {TOKEN}":
            return error(request, 401, "unauthorized", "a bearer token is required")
        match = _PATH.fullmatch(request.path.decode())
        if match is None or method not in ("POST", "DELETE"):
            return error(request, 404, "not_found", "no such route")
        index = match.group(1)
        if not index.isdigit() or int(index) >= self.cards:
            return error(request, 404, "not_found", f"no card {index}")
        card = int(index)
        if method == "DELETE":
            return answer(request, {"card": card, "yielded": None, "free_mib": 9000})
        body = json.loads(raw) if raw else {}
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not (seconds is None or isinstance(seconds, int)):
            return error(request, 400, "bad_request", "the body must be {seconds, reason}")
        until = None if seconds is None else f"+{seconds}s"
        yielded = {"reason": body.get("reason", "manual"), "since": SINCE, "until": until}
        document = {"card": card, "yielded": yielded, "free_mib": FREE_MIB}
        later: IDelayedCall = reactor.callLater(  # type: ignore[attr-defined]
            self.delay, lambda: request.write(answer(request, document)) or request.finish()
        )

        def gone(_: Failure) -> None:
            if later.active():
                later.cancel()

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET


def answer(request: Request, document: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    return json.dumps(document).encode()


def error(request: Request, status: int, code: str, message: str) -> bytes:
    return answer(request, {"error": code, "message": message, "retryable": False}, status)


@attrs.frozen
class StandIn:
    url: str
    routes: YieldRoutes


@pytest_twisted.async_yield_fixture(name="daemon")
async def daemon_fixture() -> AsyncIterator[StandIn]:
    routes = YieldRoutes()
    port = reactor.listenTCP(0, Site(routes), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield StandIn(f"http://127.0.0.1:{port.getHost().port}", routes)
    await port.stopListening()


@pytest.fixture(name="token_file")
def token_file_fixture(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400),
     ("1h30m15s", 5415), (" 2H ", 7200)],
)
def test_durations(text: str, seconds: int) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1.5h", "-5", "0", "0h0m", "2d", "h", "30m2h"])
def test_a_bad_duration_is_a_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["yield", "--for", text])
    assert exited.value.code == 2
    assert "--for" in capsys.readouterr().err


@pytest.mark.parametrize("card", ["-1", "x", "1.0"])
def test_a_bad_card_is_a_usage_error(card: str) -> None:
    for command in ("yield", "resume"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--card", card])
        assert exited.value.code == 2


@pytest_twisted.ensureDeferred
async def test_yield_sends_its_card_duration_and_reason_and_prints_the_free_memory(
    daemon: StandIn, token_file: str
) -> None:
    code, out = await run_in_thread(
        "yield", "--card", "1", "--for", "1h30m", "--reason", "game",
        "--url", daemon.url, "--token-file", token_file,
    )
    assert code == 0
    assert out == f"card 1 yielded: {FREE_MIB} MiB free (reason game, until +5400s)\n"
    assert daemon.routes.seen == [
        Seen("POST", "/v1/gpus/1/yield", {"seconds": 5400, "reason": "game"},
             "application/json")
    ]


@pytest_twisted.ensureDeferred
async def test_yield_without_options_is_card_0_until_resume(
    daemon: StandIn, token_file: str
) -> None:
    code, out = await run_in_thread("yield", "--url", daemon.url, "--token-file", token_file)
    assert code == 0
    assert out == f"card 0 yielded: {FREE_MIB} MiB free (reason manual, until resume)\n"
    assert [(s.path, s.body) for s in daemon.routes.seen] == [("/v1/gpus/0/yield", {})]


@pytest_twisted.ensureDeferred
async def test_yield_waits_until_the_card_is_held(
    daemon: StandIn, token_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.routes.delay = 1.5
    started = time.monotonic()
    code, out = await run_in_thread(
        "yield", "--url", daemon.url + "/", "--token-file", token_file
    )
    assert time.monotonic() - started >= 1.5
    assert code == 0 and f"{FREE_MIB} MiB free" in out
    assert "waiting for card 0" in capsys.readouterr().err
    # Nothing shorter than a long job may cut the wait.
    assert cli_yield.YIELD_WAIT_SECONDS >= 15 * 60


@pytest_twisted.ensureDeferred
async def test_a_yield_that_is_not_answered_in_time_exits_1(
    daemon: StandIn, token_file: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_yield, "YIELD_WAIT_SECONDS", 0.3)
    daemon.routes.delay = 5
    code, out = await run_in_thread("yield", "--url", daemon.url, "--token-file", token_file)
    assert (code, out) == (1, "")
    assert "did not answer within" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_resume_deletes_the_yield(daemon: StandIn, token_file: str) -> None:
    code, out = await run_in_thread(
        "resume", "--card", "1", "--url", daemon.url, "--token-file", token_file
    )
    assert (code, out) == (0, "card 1 resumed: jobs that need it may start\n")
    assert [(s.method, s.path, s.body) for s in daemon.routes.seen] == [
        ("DELETE", "/v1/gpus/1/yield", None)
    ]


@pytest.mark.parametrize("command", ["yield", "resume"])
@pytest_twisted.ensureDeferred
async def test_an_unknown_card_exits_1_with_the_daemons_message(
    daemon: StandIn, token_file: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out = await run_in_thread(
        command, "--card", "5", "--url", daemon.url, "--token-file", token_file
    )
    assert (code, out) == (1, "")
    assert "mgpumanager: 404 not_found: no card 5" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["yield", "resume"])
@pytest_twisted.ensureDeferred
async def test_without_the_token_exits_1(
    daemon: StandIn, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out = await run_in_thread(command, "--url", daemon.url)
    assert (code, out) == (1, "")
    assert "401 unauthorized: a bearer token is required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["yield", "resume"])
def test_a_closed_port_exits_1(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    code, out = run(command, "--url", f"http://127.0.0.1:{closed}")
    assert (code, out) == (1, "")
    assert f"cannot reach http://127.0.0.1:{closed}" in capsys.readouterr().err


def test_an_unreadable_token_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run("resume", "--token-file", str(tmp_path / "absent"))
    assert code == 1
    assert "cannot read the token file" in capsys.readouterr().err
