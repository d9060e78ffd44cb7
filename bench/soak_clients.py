"""
The soak's clients: one GPU job each, whose end is classified from what the
client saw, and the ``/v1/events`` readers.

A job ends in exactly one of these ways, and only the first three are right:

``relayed``   the consumer's answer arrived whole (its length, or a stream's
              ``done`` line), whatever its status;
``daemon``    the daemon's own JSON error (``{"error": …, "retryable": …}``);
``cancelled`` the client itself hung up mid-answer;
``cut``       the answer started and broke off (a consumer killed mid-answer);
``closed``    the connection closed with no answer at all: the client cannot
              know whether its POST ran.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from mgpumanager.simulate.voice import fake_wav

#: kind -> (daemon path, body); every consumer of the simulated host, the
#: HTTP/1.0 speech server included, through the facade or the passthrough.
SPEECH = {"model": "tts-1", "input": "hello", "voice": "alloy"}
JOB_KINDS: dict[str, tuple[str, bytes]] = {
    "tts": ("/v1/tts", json.dumps({"text": "hello there"}).encode()),
    "stt": ("/v1/stt", fake_wav("a short clip")),
    "whisper": ("/upstream/whisper/inference", fake_wav("a short clip")),
    "speech": ("/upstream/speech/v1/audio/speech", json.dumps(SPEECH).encode()),
    "llm": ("/v1/llm", json.dumps({"prompt": "hello", "num_lines": 3}).encode()),
    "image": ("/v1/image", json.dumps({"prompt": {"seed": 1}}).encode()),
}
OUTCOMES = ("relayed", "daemon", "cancelled", "cut", "closed")


@attrs.define
class JobResult:
    index: int
    kind: str
    outcome: str = ""
    status: int = 0
    detail: str = ""
    started: float = 0.0
    ended: float = 0.0


class _Body(Protocol):
    """Collects an answer; hangs up after its first bytes when told to."""

    def __init__(self, hang_up: bool) -> None:
        self.data = bytearray()
        self.hang_up = hang_up
        self.hung_up = False
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.hang_up and not self.hung_up:
            self.hung_up = True
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not self.done.called:
            self.reason = reason
            self.done.callback(None)


async def read_all(response: IResponse) -> bytes:
    """The whole body of ``response``."""
    collector = _Body(hang_up=False)
    response.deliverBody(collector)
    await collector.done
    return bytes(collector.data)


async def run_job(agent: Agent, base: str, result: JobResult, hang_up: bool,
                  clock: Any) -> JobResult:
    path, body = JOB_KINDS[result.kind]
    headers = Headers({b"x-request-id": [b"job-%d" % result.index],
                       b"content-type": [b"application/json"]})
    result.started = clock.seconds()
    try:
        response: IResponse = await agent.request(
            b"POST", (base + path).encode("ascii"), headers, FileBodyProducer(BytesIO(body)))
    except Exception as e:  # no status line at all
        result.outcome, result.detail = "closed", _describe(e)
        result.ended = clock.seconds()
        return result
    result.status = response.code
    collector = _Body(hang_up)
    response.deliverBody(collector)
    await collector.done
    reason = collector.reason
    assert reason is not None
    result.ended = clock.seconds()
    data = bytes(collector.data)
    if collector.hung_up:
        result.outcome = "cancelled"
    elif not reason.check(ResponseDone, PotentialDataLoss):
        result.outcome, result.detail = "cut", _describe(reason.value)
    elif response.length is not UNKNOWN_LENGTH and len(data) != response.length:
        result.outcome, result.detail = "cut", f"{len(data)} of {response.length} bytes"
    elif _daemon_error(response, data):
        result.outcome, result.detail = "daemon", json.loads(data)["error"]
    elif result.kind == "llm" and response.code == 200 and b'"done": true' not in data \
            and b'"done":true' not in data:
        result.outcome, result.detail = "cut", "stream without its done line"
    else:
        result.outcome = "relayed"
        if response.code >= 400:
            result.detail = data[:120].decode("utf-8", "replace")
    return result


def _daemon_error(response: IResponse, data: bytes) -> bool:
    types = response.headers.getRawHeaders(b"content-type") or [b""]
    if not types[0].startswith(b"application/json") or response.code < 400:
        return False
    try:
        document = json.loads(data)
    except ValueError:
        return False
    return (isinstance(document, dict) and isinstance(document.get("error"), str)
            and "retryable" in document)


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return f"{type(error).__name__}: " + ", ".join(
            type(r.value).__name__ for r in reasons)
    return f"{type(error).__name__}: {error}"


class _Events(Protocol):
    def __init__(self, reader: EventReader) -> None:
        self._reader = reader
        self._buffer = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._reader.seen(json.loads(line[5:]))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.closed.callback(None)


class EventReader:
    """One ``/v1/events`` client for the whole run; reconnects if dropped, and counts it."""

    def __init__(self, agent: Agent, url: str, clock: Any) -> None:
        self._agent = agent
        self._clock = clock
        self._url = url.encode("ascii")
        self.events = 0
        self.reconnects = 0
        self.last: dict[str, Any] | None = None
        self._stopping = False
        self._response: IResponse | None = None
        self.running: Deferred[None] = Deferred.fromCoroutine(self._run())

    def seen(self, document: dict[str, Any]) -> None:
        self.events += 1
        self.last = document

    async def _run(self) -> None:
        first = True
        while not self._stopping:
            if not first:
                self.reconnects += 1
            first = False
            try:
                response = await self._agent.request(b"GET", self._url)
            except Exception:
                await deferLater(self._clock, 0.2, lambda: None)
                continue
            protocol = _Events(self)
            response.deliverBody(protocol)
            self._protocol = protocol
            await protocol.closed

    def stop(self) -> None:
        self._stopping = True
        protocol = getattr(self, "_protocol", None)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.stopProducing()
