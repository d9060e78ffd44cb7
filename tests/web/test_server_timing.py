"""
Every job answer says how long it waited for the GPU and how long making
room and loading took, the daemon's own errors too: a client can tell a slow
queue from a slow load whatever happened.  The scheduler's errors carry the
numbers; the web layer's :func:`with_job_headers` writes them.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater

from mgpumanager.common.errors import LOAD_FAILED, ApiError
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.job_errors import with_job_headers
from tests.builders import consumer
from tests.support import failure_result_of

CONFIG = parse_config({"consumers": {"voice": consumer(9001, "tts")}})


def test_a_job_that_fails_to_load_answers_with_its_queue_and_prepare_times() -> None:
    clock = Clock()

    async def slow_failing_load(name: str) -> None:
        await _after(clock, 2.5)
        raise ApiError(LOAD_FAILED, "loading voice failed: HTTP 500", name)

    scheduler = GpuScheduler(clock, Registry(CONFIG), slow_failing_load, queue=CONFIG.queue)
    blocker: Deferred[str] = Deferred()
    first = scheduler.submit("voice", lambda: blocker)  # its load fails too; it goes first
    first.addErrback(lambda _: None)
    job = scheduler.submit("voice", lambda: succeed("never"))
    clock.advance(2.5)  # the first one's load fails; ours starts after 2.5 s in the queue
    clock.advance(2.5)

    error = with_job_headers(failure_result_of(job, ApiError).value)
    assert error.kind == LOAD_FAILED
    assert error.headers["Server-Timing"] == "queue;dur=2500, prepare;dur=2500"


def test_a_job_that_waited_too_long_answers_with_the_wait() -> None:
    clock = Clock()
    queue = attrs.evolve(CONFIG.queue, max_wait_seconds=7)
    scheduler = GpuScheduler(clock, Registry(CONFIG), queue=queue)
    scheduler.submit("voice", lambda: Deferred())
    waiting = scheduler.submit("voice", lambda: succeed("never"))

    clock.advance(7)

    error = with_job_headers(failure_result_of(waiting, ApiError).value)
    assert error.kind.code == "queue_timeout"
    assert error.headers["Server-Timing"] == "queue;dur=7000, prepare;dur=0"


def test_a_job_refused_for_a_full_queue_never_waited() -> None:
    clock = Clock()
    queue = attrs.evolve(CONFIG.queue, max_depth=1)
    scheduler = GpuScheduler(clock, Registry(CONFIG), queue=queue)
    scheduler.submit("voice", lambda: Deferred())
    scheduler.submit("voice", lambda: Deferred())

    refused = scheduler.submit("voice", lambda: succeed("never"))

    error = with_job_headers(failure_result_of(refused, ApiError).value)
    assert error.kind.code == "queue_full"
    assert error.headers["Server-Timing"] == "queue;dur=0, prepare;dur=0"


def _after(clock: Clock, seconds: float) -> Deferred[None]:
    return deferLater(clock, seconds, lambda: None)
