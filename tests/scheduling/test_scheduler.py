"""
Tests for :mod:`mgpumanager.scheduling.scheduler`: one GPU job at a time across every consumer,
in arrival order, with the lock released however a job ends (success, failure,
cancellation, a failed preparation), the numbers ``/v1/status`` shows, and a clean
shutdown that answers queued jobs instead of dropping them.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock

from mgpumanager.common.errors import LOAD_FAILED, ApiError
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import consumer_status, scheduler_status
from tests.builders import consumer as _consumer
from tests.jobs import Jobs
from tests.support import EPOCH, assert_no_result, failure_result_of, success_result_of

#: 2026-05-15T10:00:00Z, so status times read like real ones.


CONFIG = parse_config(
    {
        "routing": {"tts": "voice", "llm": "llm"},
        "consumers": {"voice": _consumer(9001, "tts"), "llm": _consumer(9002, "llm")},
    }
)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(EPOCH)
    return clock


@pytest.fixture
def registry() -> Registry:
    return Registry(CONFIG)


@pytest.fixture
def scheduler(clock: Clock, registry: Registry) -> GpuScheduler:
    return GpuScheduler(clock, registry, queue=CONFIG.queue)


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()


def _refusal(d: Deferred[Any]) -> ApiError:
    return failure_result_of(d, ApiError).value  # type: ignore[no-any-return]


def test_second_job_waits_until_the_first_has_finished_even_for_another_consumer(
    scheduler: GpuScheduler, jobs: Jobs
) -> None:
    first = scheduler.submit("voice", jobs.job("voice-1"))
    second = scheduler.submit("llm", jobs.job("llm-1"))

    assert jobs.started == ["voice-1"]
    assert_no_result(second)

    jobs.finish("voice-1")
    assert success_result_of(first) == "voice-1"
    assert jobs.started == ["voice-1", "llm-1"]
    jobs.finish("llm-1")
    assert success_result_of(second) == "llm-1"


def test_queued_jobs_run_in_arrival_order(scheduler: GpuScheduler, jobs: Jobs) -> None:
    labels = ["voice-1", "llm-1", "voice-2", "llm-2"]
    results = [
        scheduler.submit(label.split("-")[0], jobs.job(label)) for label in labels
    ]

    for label in labels:
        assert jobs.started[-1] == label
        jobs.finish(label)

    assert jobs.started == labels
    assert [success_result_of(d) for d in results] == labels


def test_stats_follow_the_queue_and_time_waits_and_runs_with_the_clock(
    scheduler: GpuScheduler, jobs: Jobs, clock: Clock
) -> None:
    idle = scheduler_status(scheduler)
    assert idle["queue_depth"] == 0
    assert idle["in_flight"] == 0
    assert idle["total_jobs"] == 0
    assert idle["oldest_queued"] is None

    scheduler.submit("voice", jobs.job("first"))
    assert scheduler_status(scheduler)["last_wait_ms"] == 0
    clock.advance(2)
    scheduler.submit("llm", jobs.job("second"))
    clock.advance(1.5)
    scheduler.submit("voice", jobs.job("third"))

    busy = scheduler_status(scheduler)
    assert busy["queue_depth"] == 2
    assert busy["in_flight"] == 1
    assert busy["total_jobs"] == 1
    assert busy["oldest_queued"] == "2026-05-15T10:00:02.000Z"

    clock.advance(1.5)
    jobs.finish("first")
    after_first = scheduler_status(scheduler)
    assert after_first["last_run_ms"] == 5000
    assert after_first["last_wait_ms"] == 3000
    assert after_first["queue_depth"] == 1
    assert after_first["in_flight"] == 1
    assert after_first["total_jobs"] == 2
    assert after_first["oldest_queued"] == "2026-05-15T10:00:03.500Z"

    clock.advance(0.25)
    jobs.finish("second")
    clock.advance(0.125)
    jobs.finish("third")
    done = scheduler_status(scheduler)
    assert done["last_run_ms"] == 125
    assert done["last_wait_ms"] == 1750
    assert done["queue_depth"] == 0
    assert done["in_flight"] == 0
    assert done["total_jobs"] == 3
    assert done["oldest_queued"] is None


def test_cancelling_a_queued_job_leaves_the_queue_at_once_and_never_runs_it(
    scheduler: GpuScheduler, jobs: Jobs
) -> None:
    scheduler.submit("voice", jobs.job("running"))
    queued = scheduler.submit("llm", jobs.job("given-up"))
    assert scheduler.queue_depth == 1

    queued.cancel()

    failure_result_of(queued, CancelledError)
    assert scheduler.queue_depth == 0
    assert scheduler_status(scheduler)["oldest_queued"] is None
    assert scheduler.cancelled_jobs == 1

    jobs.finish("running")
    assert jobs.started == ["running"]
    nxt = scheduler.submit("llm", jobs.job("next"))
    assert jobs.started == ["running", "next"]
    jobs.finish("next")
    assert success_result_of(nxt) == "next"
    assert scheduler.total_jobs == 2


def test_cancelling_a_running_job_cancels_its_work_and_releases_the_lock(
    scheduler: GpuScheduler, jobs: Jobs, registry: Registry
) -> None:
    running = scheduler.submit("voice", jobs.job("running"))
    queued = scheduler.submit("llm", jobs.job("queued"))

    running.cancel()

    failure_result_of(running, CancelledError)
    assert jobs.cancelled == ["running"]
    assert scheduler.cancelled_jobs == 1
    assert registry["voice"].active == 0
    assert registry["voice"].last_used is None
    assert jobs.started == ["running", "queued"]
    jobs.finish("queued")
    assert success_result_of(queued) == "queued"


def test_a_failing_job_releases_the_lock_and_is_counted(
    scheduler: GpuScheduler, jobs: Jobs, registry: Registry
) -> None:
    failing = scheduler.submit("voice", lambda: fail(ValueError("upstream said no")))
    after = scheduler.submit("llm", jobs.job("after"))

    assert str(failure_result_of(failing, ValueError).value) == "upstream said no"
    assert scheduler.failed_jobs == 1
    assert scheduler.in_flight == 1
    assert jobs.started == ["after"]
    state = registry["voice"]
    assert (state.active, state.total_requests, state.last_used) == (0, 1, None)
    jobs.finish("after")
    success_result_of(after)
    assert scheduler.failed_jobs == 1


def test_registry_counts_active_and_total_and_records_last_used_on_success(
    scheduler: GpuScheduler, jobs: Jobs, registry: Registry, clock: Clock
) -> None:
    state = registry["voice"]
    done = scheduler.submit("voice", jobs.job("one"))
    assert (state.active, state.total_requests, state.last_used) == (1, 1, None)
    assert registry["llm"].active == 0

    clock.advance(3)
    jobs.finish("one")
    success_result_of(done)
    assert (state.active, state.total_requests) == (0, 1)
    assert state.last_used == EPOCH + 3
    assert consumer_status(state)["last_used"] == "2026-05-15T10:00:03.000Z"

    clock.advance(3)
    failed = scheduler.submit("voice", lambda: fail(RuntimeError("boom")))
    failure_result_of(failed, RuntimeError)
    assert state.total_requests == 2
    assert state.last_used == EPOCH + 3


class Preparer:
    """A ``prepare`` hook whose steps finish on command."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.calls: list[tuple[str, list[str]]] = []
        self.pending: list[Deferred[None]] = []

    def __call__(self, consumer: str) -> Deferred[None]:
        self.calls.append((consumer, list(self.jobs.started)))
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d


def test_prepare_runs_under_the_lock_before_the_job(clock: Clock, registry: Registry) -> None:
    jobs = Jobs()
    prepare = Preparer(jobs)
    scheduler = GpuScheduler(clock, registry, prepare, queue=CONFIG.queue)

    first = scheduler.submit("voice", jobs.job("voice"))
    second = scheduler.submit("llm", jobs.job("llm"))
    assert prepare.calls == [("voice", [])]
    assert jobs.started == []

    prepare.pending[0].callback(None)
    assert jobs.started == ["voice"]
    # The next consumer is prepared only once the GPU is free again.
    assert len(prepare.calls) == 1

    jobs.finish("voice")
    success_result_of(first)
    assert prepare.calls == [("voice", []), ("llm", ["voice"])]
    prepare.pending[1].callback(None)
    jobs.finish("llm")
    success_result_of(second)


def test_an_api_error_from_prepare_fails_the_job_without_running_it(
    clock: Clock, registry: Registry
) -> None:
    jobs = Jobs()
    refusal = ApiError(LOAD_FAILED, "loading voice failed", "voice")

    def prepare(consumer: str) -> Deferred[None]:
        return fail(refusal) if consumer == "voice" else succeed(None)

    scheduler = GpuScheduler(clock, registry, prepare, queue=CONFIG.queue)
    refused = scheduler.submit("voice", jobs.job("voice"))
    after = scheduler.submit("llm", jobs.job("llm"))

    assert _refusal(refused) is refusal
    assert jobs.started == ["llm"]
    assert scheduler.failed_jobs == 1
    assert registry["voice"].active == 0
    jobs.finish("llm")
    success_result_of(after)


@pytest.mark.logged_errors_expected
def test_an_unexpected_prepare_error_becomes_a_scheduler_error(
    clock: Clock, registry: Registry
) -> None:
    jobs = Jobs()

    async def prepare(consumer: str) -> None:
        if consumer == "voice":
            raise KeyError("oops")

    scheduler = GpuScheduler(clock, registry, prepare, queue=CONFIG.queue)
    refused = scheduler.submit("voice", jobs.job("voice"))
    after = scheduler.submit("llm", jobs.job("llm"))

    error = _refusal(refused)
    assert error.kind.code == "scheduler_error"
    assert error.status == 500
    assert error.kind.retryable is True
    assert error.consumer == "voice"
    assert "Traceback" not in error.message
    assert jobs.started == ["llm"]
    assert scheduler.failed_jobs == 1
    jobs.finish("llm")
    success_result_of(after)


def test_close_refuses_queued_and_new_jobs_while_the_running_one_finishes(
    scheduler: GpuScheduler, jobs: Jobs
) -> None:
    running = scheduler.submit("voice", jobs.job("running"))
    queued = [scheduler.submit("llm", jobs.job(f"queued-{i}")) for i in range(2)]

    scheduler.close()

    for d in queued:
        error = _refusal(d)
        assert error.kind.code == "shutting_down"
        assert error.status == 503
        assert error.envelope()["retryable"] is True
    assert scheduler.queue_depth == 0
    assert jobs.started == ["running"]
    assert scheduler.in_flight == 1

    late = scheduler.submit("voice", jobs.job("late"))
    assert _refusal(late).kind.code == "shutting_down"

    jobs.finish("running")
    assert success_result_of(running) == "running"
    assert jobs.started == ["running"]


def test_when_idle_fires_once_nothing_runs_or_waits(
    scheduler: GpuScheduler, jobs: Jobs
) -> None:
    success_result_of(scheduler.when_idle())

    scheduler.submit("voice", jobs.job("one"))
    scheduler.submit("llm", jobs.job("two"))
    idle = scheduler.when_idle()
    assert_no_result(idle)

    jobs.finish("one")
    assert_no_result(idle)
    jobs.finish("two")
    success_result_of(idle)


def test_when_idle_after_close_waits_for_the_running_job_only(
    scheduler: GpuScheduler, jobs: Jobs
) -> None:
    scheduler.submit("voice", jobs.job("running"))
    queued = scheduler.submit("llm", jobs.job("queued"))
    scheduler.close()
    _refusal(queued)

    idle = scheduler.when_idle()
    assert_no_result(idle)
    jobs.finish("running")
    success_result_of(idle)


def test_abort_running_cancels_the_running_job_and_frees_the_lock(
    scheduler: GpuScheduler, jobs: Jobs
) -> None:
    running = scheduler.submit("voice", jobs.job("running"))
    scheduler.close()
    idle = scheduler.when_idle()

    scheduler.abort_running()

    failure_result_of(running, CancelledError)
    assert jobs.cancelled == ["running"]
    assert scheduler.in_flight == 0
    success_result_of(idle)


def test_abort_running_also_stops_a_job_that_is_still_preparing(
    clock: Clock, registry: Registry
) -> None:
    jobs = Jobs()
    prepare = Preparer(jobs)
    scheduler = GpuScheduler(clock, registry, prepare, queue=CONFIG.queue)
    preparing = scheduler.submit("voice", jobs.job("voice"))
    assert scheduler.in_flight == 1

    scheduler.abort_running()

    failure_result_of(preparing, CancelledError)
    prepare.pending[0].callback(None)
    assert jobs.started == []
