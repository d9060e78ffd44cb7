"""
The core knows no HTTP: the scheduler refuses with typed errors that carry
numbers (the retry delay, the wait), and only the web layer turns them into
``Retry-After`` and ``Server-Timing``.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mgpumanager.common.errors import CONSUMER_DOWN, LOAD_FAILED, ApiError, JobTiming
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.refusals import (
    NOT_RUN,
    NoConsumer,
    QueueFull,
    QueueTimedOut,
    ShuttingDown,
)
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.job_errors import server_timing, with_job_headers
from tests.builders import consumer
from tests.support import failure_result_of

CONFIG = parse_config({"consumers": {"voice": consumer(9001, "tts"),
                                     "image": consumer(9003, "image")}})
PACKAGE = Path(__file__).resolve().parents[2] / "mgpumanager"


def _scheduler(clock: Clock, **queue: float) -> GpuScheduler:
    return GpuScheduler(clock, Registry(CONFIG), queue=attrs.evolve(CONFIG.queue, **queue))


def test_a_full_queue_is_refused_with_the_retry_delay_and_no_headers() -> None:
    scheduler = _scheduler(Clock(), max_depth=1)
    scheduler.submit("voice", lambda: Deferred())
    scheduler.submit("voice", lambda: Deferred())

    error = failure_result_of(scheduler.submit("voice", lambda: succeed(1)), QueueFull).value

    assert (error.waiting, error.retry_after, error.timing) == (1, 2, NOT_RUN)
    assert error.headers == {}


def test_a_wait_that_timed_out_carries_the_wait() -> None:
    clock = Clock()
    scheduler = _scheduler(clock, max_wait_seconds=7.5)
    scheduler.submit("voice", lambda: Deferred())
    waiting = scheduler.submit("image", lambda: succeed(1))

    clock.advance(7.5)

    error = failure_result_of(waiting, QueueTimedOut).value
    assert (error.consumer, error.waited, error.retry_after) == ("image", 7.5, 2)
    assert error.timing == JobTiming(queue_ms=7500, prepare_ms=0)
    assert error.headers == {}


def test_shutting_down_and_a_removed_consumer_are_typed_too() -> None:
    scheduler = _scheduler(Clock())
    scheduler.submit("voice", lambda: Deferred())
    waiting = scheduler.submit("image", lambda: succeed(1))
    removed = parse_config({"consumers": {"voice": consumer(9001, "tts")}})
    scheduler.reconfigure(removed)
    assert failure_result_of(waiting, NoConsumer).value.consumer == "image"

    queued = scheduler.submit("voice", lambda: succeed(1))
    scheduler.close()

    assert isinstance(failure_result_of(queued, ShuttingDown).value, ShuttingDown)
    assert failure_result_of(scheduler.submit("voice", lambda: succeed(1)), ShuttingDown)


def test_the_web_layer_writes_the_headers_and_keeps_those_an_error_has() -> None:
    full = with_job_headers(QueueFull(3, 12))
    assert full.headers == {"Retry-After": "12", "Server-Timing": "queue;dur=0, prepare;dur=0"}

    failed = ApiError(LOAD_FAILED, "loading voice failed", "voice")
    failed.timing = JobTiming(queue_ms=2500, prepare_ms=40)
    failed.headers["Server-Timing"] = "already"
    assert with_job_headers(failed).headers == {"Server-Timing": "already"}

    assert with_job_headers(ApiError(CONSUMER_DOWN, "down")).headers == {}
    assert server_timing(JobTiming(1, 2)) == "queue;dur=1, prepare;dur=2"


def test_the_core_names_no_job_header() -> None:
    for layer in ("config", "state", "consumers", "scheduling"):
        for module in (PACKAGE / layer).rglob("*.py"):
            text = module.read_text().lower()
            assert '"retry-after"' not in text and '"server-timing"' not in text, module
