"""
The replayer against a real loopback server: arrival times scaled, chains in
order, class header and scaled work in each request, waits and refusals read
from the answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mgpumanager.replay.client import (
    Replayer,
    check_scale,
    outcome_of,
    queue_seconds,
    scaled_interval,
)
from mgpumanager.replay.report import FAILED, OK, REFUSED, TIMEOUT
from mgpumanager.replay.traces import TraceJob


@attrs.frozen
class Seen:
    kind: str
    job_class: str
    work_seconds: float
    at: float


class FakeDaemon(Resource):
    """Answers after the requested work; refuses images as a full queue would."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.started = reactor.seconds()

    def render_POST(self, request: Request) -> bytes | int:
        kind = request.path.decode().rsplit("/", 1)[-1]
        work = json.loads(request.content.read())["work_seconds"]
        job_class = request.getHeader("x-mgpu-class") or ""
        self.seen.append(Seen(kind, job_class, work, reactor.seconds() - self.started))
        if kind == "image":
            request.setResponseCode(503)
            return b'{"error": "queue_full", "message": "the queue is full"}'
        if kind == "llm":
            request.setHeader("server-timing", "queue;dur=250, prepare;dur=3")

        def answer() -> None:
            request.write(b"done")
            request.finish()

        reactor.callLater(work, answer)
        return NOT_DONE_YET


@pytest_twisted.async_yield_fixture
async def daemon() -> AsyncIterator[tuple[str, FakeDaemon]]:
    resource = FakeDaemon()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/", resource
    await port.stopListening()


TRACE = [
    TraceJob(0.0, "stt", "interactive", 2.0, chain=7, step=0),
    TraceJob(0.0, "llm", "interactive", 2.0, chain=7, step=1),
    TraceJob(0.0, "tts", "batch", 2.0, chain=7, step=2),
    TraceJob(1.0, "tts", "interactive", 1.0),
    TraceJob(2.0, "image", "batch", 4.0),
]


@pytest_twisted.ensureDeferred
async def test_a_trace_is_replayed_scaled_with_chains_in_order(
    daemon: tuple[str, FakeDaemon],
) -> None:
    base_url, fake = daemon
    fake.started = reactor.seconds()
    records = await Replayer(base_url, 20, reactor).replay(TRACE)

    by_kind = {(seen.kind, seen.job_class): seen for seen in fake.seen}
    assert {(s.kind, s.job_class, s.work_seconds) for s in fake.seen} == {
        ("stt", "interactive", 0.1), ("llm", "interactive", 0.1), ("tts", "batch", 0.1),
        ("tts", "interactive", 0.05), ("image", "batch", 0.2)}
    # Each step goes out only after the answer to the one before it (0.1 s of work).
    stt, llm, tts = by_kind["stt", "interactive"], by_kind["llm", "interactive"], by_kind[
        "tts", "batch"]
    assert llm.at >= stt.at + 0.1 and tts.at >= llm.at + 0.1
    # Arrival times are divided by the scale: 1 s and 2 s of trace are 50 and 100 ms.
    assert 0.05 <= by_kind["tts", "interactive"].at < 0.05 + 0.5
    assert 0.1 <= by_kind["image", "batch"].at < 0.1 + 0.5

    outcome = {(r.kind, r.chain): r for r in records}
    assert outcome["llm", 7].wait == pytest.approx(5.0)  # 250 ms of queue at scale 20
    stt_record = outcome["stt", 7]
    assert stt_record.outcome == OK and stt_record.wait is not None
    assert 0 <= stt_record.wait < 10  # time to headers, less the 2 s of work
    assert stt_record.end is not None and stt_record.end >= 2.0
    assert (outcome["image", None].outcome, outcome["image", None].wait) == (REFUSED, None)
    assert [r.arrival for r in records] == sorted(r.arrival for r in records)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_daemon_fails_every_job_and_a_chain_stops() -> None:
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    records = await Replayer(url, 20, reactor).replay(TRACE[:3])
    assert [(r.kind, r.outcome) for r in records] == [("stt", FAILED)]


def test_outcomes_from_status_and_error_code() -> None:
    assert outcome_of(200, b"anything") == OK
    assert outcome_of(404, b"{}") == FAILED
    assert outcome_of(503, b'{"error": "queue_full"}') == REFUSED
    assert outcome_of(503, b'{"error": "queue_timeout"}') == TIMEOUT
    assert outcome_of(504, b"gateway") == TIMEOUT
    assert outcome_of(503, b'{"error": "unload_failed"}') == FAILED


def test_queue_timing_header_and_scale_limits() -> None:
    assert queue_seconds(Headers({b"server-timing": [b"prepare;dur=9, queue;dur=1500.5"]})) == (
        1.5005)
    assert queue_seconds(Headers({b"server-timing": [b"prepare;dur=9"]})) is None
    assert queue_seconds(Headers()) is None
    assert scaled_interval(0.5, 20) == 0.05 and scaled_interval(2, 10) == 0.2
    with pytest.raises(ValueError, match="at most 20"):
        check_scale(21)
    with pytest.raises(ValueError):
        check_scale(0)
