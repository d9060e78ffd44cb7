"""
Tests for the scheduler's admission control: ``max_depth`` refuses a job once that
many already wait (``queue_full``, with a ``Retry-After``), and ``max_wait`` gives
up on a job that has waited too long (``queue_timeout``), taking it out of the
queue without ever running it and without disturbing the GPU lock.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mgpumanager.common.errors import ApiError
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.job_errors import with_job_headers
from mgpumanager.web.status import scheduler_status
from tests.jobs import Jobs
from tests.support import assert_no_result, failure_result_of, success_result_of

CONFIG = parse_config(
    {
        "routing": {"tts": "voice", "llm": "llm"},
        "consumers": {
            "voice": {
                "url": "http://127.0.0.1:9001",
                "health": {"path": "/health"},
                "paths": {"tts": {"path": "/tts"}},
            },
            "llm": {
                "url": "http://127.0.0.1:9002",
                "health": {"path": "/health"},
                "paths": {"llm": {"path": "/llm"}},
            },
        },
    }
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()


def scheduler_with(clock: Clock, **queue: Any) -> GpuScheduler:
    """A scheduler whose queue settings differ from the defaults as given."""
    return GpuScheduler(clock, Registry(CONFIG), queue=attrs.evolve(CONFIG.queue, **queue))


def refusal(d: Deferred[Any]) -> ApiError:
    """The scheduler's refusal, with the headers the web layer answers it with."""
    error: ApiError = failure_result_of(d, ApiError).value
    return with_job_headers(error)


# --- max_depth -------------------------------------------------------------------


def test_one_job_more_than_max_depth_waiting_is_refused_with_queue_full(
    clock: Clock, jobs: Jobs
) -> None:
    scheduler = scheduler_with(clock, max_depth=2)
    running = scheduler.submit("voice", jobs.job("running"))
    queued = [scheduler.submit("llm", jobs.job(f"queued-{i}")) for i in range(2)]
    assert scheduler.queue_depth == 2

    refused = scheduler.submit("voice", jobs.job("refused"))

    error = refusal(refused)
    assert error.kind.code == "queue_full"
    assert error.status == 503
    assert error.kind.retryable is True
    assert int(error.headers["Retry-After"]) >= 1
    assert scheduler.refused_queue_full == 1
    assert scheduler_status(scheduler)["refused_queue_full"] == 1
    assert scheduler_status(scheduler)["max_depth"] == 2
    # The refusal changed nothing for the others.
    assert scheduler.queue_depth == 2
    assert jobs.started == ["running"]
    assert_no_result(running)
    for d in queued:
        assert_no_result(d)


def test_a_queue_full_refusal_never_runs_the_job_and_room_comes_back(
    clock: Clock, jobs: Jobs
) -> None:
    scheduler = scheduler_with(clock, max_depth=1)
    scheduler.submit("voice", jobs.job("running"))
    scheduler.submit("llm", jobs.job("queued"))
    refusal(scheduler.submit("voice", jobs.job("refused")))

    jobs.finish("running")
    later = scheduler.submit("voice", jobs.job("later"))

    assert jobs.started == ["running", "queued"]
    assert_no_result(later)
    jobs.finish("queued")
    jobs.finish("later")
    assert success_result_of(later) == "later"
    assert "refused" not in jobs.started
    assert scheduler.refused_queue_full == 1


def test_retry_after_follows_the_queue_at_the_last_jobs_pace(
    clock: Clock, jobs: Jobs
) -> None:
    scheduler = scheduler_with(clock, max_depth=2)
    scheduler.submit("voice", jobs.job("first"))
    clock.advance(4)
    jobs.finish("first")  # the last job ran 4 s
    scheduler.submit("voice", jobs.job("running"))
    scheduler.submit("llm", jobs.job("queued-1"))
    scheduler.submit("llm", jobs.job("queued-2"))

    error = refusal(scheduler.submit("voice", jobs.job("refused")))

    # Two waiting plus this one, at 4 s each.
    assert error.headers["Retry-After"] == "12"


@pytest.mark.parametrize("max_depth", [1, 0])
def test_a_job_that_gets_the_gpu_at_once_is_never_refused(
    clock: Clock, jobs: Jobs, max_depth: int
) -> None:
    scheduler = scheduler_with(clock, max_depth=max_depth)

    for label in ("a", "b", "c"):
        d = scheduler.submit("voice", jobs.job(label))
        jobs.finish(label)
        assert success_result_of(d) == label

    assert scheduler.refused_queue_full == 0


def test_an_idle_scheduler_accepts_a_job_even_with_max_depth_one(
    clock: Clock, jobs: Jobs
) -> None:
    scheduler = scheduler_with(clock, max_depth=1)

    running = scheduler.submit("voice", jobs.job("running"))
    queued = scheduler.submit("llm", jobs.job("queued"))

    assert jobs.started == ["running"]
    assert_no_result(running)
    assert_no_result(queued)
    assert scheduler.refused_queue_full == 0


# --- max_wait --------------------------------------------------------------------


def test_a_queued_job_gives_up_after_max_wait(clock: Clock, jobs: Jobs) -> None:
    scheduler = scheduler_with(clock, max_wait_seconds=30)
    running = scheduler.submit("voice", jobs.job("running"))
    waiting = scheduler.submit("llm", jobs.job("waiting"))
    assert scheduler.queue_depth == 1

    clock.advance(29.9)
    assert_no_result(waiting)
    clock.advance(0.1)

    error = refusal(waiting)
    assert error.kind.code == "queue_timeout"
    assert error.status == 503
    assert error.kind.retryable is True
    assert error.consumer == "llm"
    assert error.envelope()["consumer"] == "llm"
    assert "30 s" in error.message
    assert int(error.headers["Retry-After"]) >= 1
    assert scheduler.queue_depth == 0
    assert scheduler.queue_timeouts == 1
    assert scheduler_status(scheduler)["queue_timeouts"] == 1
    assert scheduler_status(scheduler)["queue_depth"] == 0
    assert scheduler.cancelled_jobs == 0

    # The running job is untouched, the one that gave up never runs, and the
    # lock serves the next job once the running one finishes.
    assert_no_result(running)
    jobs.finish("running")
    assert success_result_of(running) == "running"
    assert jobs.started == ["running"]
    assert clock.getDelayedCalls() == []
    following = scheduler.submit("voice", jobs.job("following"))
    assert jobs.started == ["running", "following"]
    jobs.finish("following")
    assert success_result_of(following) == "following"


def test_only_the_jobs_that_waited_too_long_give_up(clock: Clock, jobs: Jobs) -> None:
    scheduler = scheduler_with(clock, max_wait_seconds=10)
    scheduler.submit("voice", jobs.job("running"))
    early = scheduler.submit("llm", jobs.job("early"))
    clock.advance(6)
    late = scheduler.submit("voice", jobs.job("late"))

    clock.advance(4)
    assert refusal(early).consumer == "llm"
    assert_no_result(late)
    assert scheduler.queue_depth == 1

    jobs.finish("running")
    assert jobs.started == ["running", "late"]
    clock.advance(100)
    jobs.finish("late")
    assert success_result_of(late) == "late"
    assert scheduler.queue_timeouts == 1


def test_a_job_that_gets_the_gpu_before_max_wait_cancels_its_timer(
    clock: Clock, jobs: Jobs
) -> None:
    scheduler = scheduler_with(clock, max_wait_seconds=30)
    scheduler.submit("voice", jobs.job("running"))
    waiting = scheduler.submit("llm", jobs.job("waiting"))
    assert len(clock.getDelayedCalls()) == 1

    clock.advance(20)
    jobs.finish("running")
    assert jobs.started == ["running", "waiting"]
    assert clock.getDelayedCalls() == []

    clock.advance(100)  # well past max_wait: nothing happens

    assert_no_result(waiting)
    assert scheduler.queue_timeouts == 0
    jobs.finish("waiting")
    assert success_result_of(waiting) == "waiting"


def test_a_job_that_gets_the_gpu_at_once_sets_no_timer(clock: Clock, jobs: Jobs) -> None:
    scheduler = scheduler_with(clock, max_wait_seconds=30)

    running = scheduler.submit("voice", jobs.job("running"))

    assert clock.getDelayedCalls() == []
    clock.advance(100)
    jobs.finish("running")
    assert success_result_of(running) == "running"
    assert scheduler.queue_timeouts == 0


def test_a_job_cancelled_while_queued_cancels_its_timer(clock: Clock, jobs: Jobs) -> None:
    scheduler = scheduler_with(clock, max_wait_seconds=30)
    scheduler.submit("voice", jobs.job("running"))
    waiting = scheduler.submit("llm", jobs.job("waiting"))

    waiting.cancel()
    waiting.addErrback(lambda _: None)

    assert clock.getDelayedCalls() == []
    assert scheduler.cancelled_jobs == 1
    clock.advance(100)
    assert scheduler.queue_timeouts == 0
