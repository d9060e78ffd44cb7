"""
The scheduler's own queue: by default it serves higher-priority consumers first
(``priority``: 0 low … 4 urgent), first come first served within a priority; a
cancelled or timed-out waiter leaves it at once without disturbing the order or
the GPU lock; a chooser may keep the GPU idle and ask to be asked again later.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock

from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.scheduler import Chooser, GpuScheduler, QueuedJob
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import scheduler_status
from tests.builders import consumer
from tests.support import assert_no_result, failure_result_of, success_result_of

CONFIG = parse_config(
    {
        "routing": {"tts": "voice", "llm": "llm", "image": "image"},
        "consumers": {
            "voice": consumer(9001, "tts", priority=4),
            "llm": consumer(9002, "llm", priority=2),
            "image": consumer(9003, "image", priority=0),
        },
    }
)


class Jobs:
    def __init__(self) -> None:
        self.order: list[str] = []
        self.running: Deferred[None] | None = None

    def job(self, label: str) -> Callable[[], Deferred[None]]:
        def run() -> Deferred[None]:
            self.order.append(label)
            self.running = Deferred()
            return self.running

        return run

    def finish(self) -> None:
        assert self.running is not None
        running, self.running = self.running, None
        running.callback(None)


def test_higher_priority_jobs_jump_the_queue_fifo_within_a_priority() -> None:
    scheduler = GpuScheduler(Clock(), Registry(CONFIG), queue=CONFIG.queue)
    jobs = Jobs()
    scheduler.submit("image", jobs.job("image-1"))  # holds the GPU
    for label, name in [("image-2", "image"), ("llm-1", "llm"), ("voice-1", "voice"),
                        ("llm-2", "llm"), ("voice-2", "voice"), ("image-3", "image")]:
        scheduler.submit(name, jobs.job(label))

    for _ in range(7):
        jobs.finish()

    assert jobs.order == ["image-1", "voice-1", "voice-2", "llm-1", "llm-2",
                          "image-2", "image-3"]
    assert scheduler.queue_depth == 0


def test_a_cancelled_waiter_leaves_the_priority_order_intact() -> None:
    scheduler = GpuScheduler(Clock(), Registry(CONFIG), queue=CONFIG.queue)
    jobs = Jobs()
    scheduler.submit("image", jobs.job("image-1"))
    low = scheduler.submit("image", jobs.job("image-2"))
    scheduler.submit("llm", jobs.job("llm-1"))
    urgent = scheduler.submit("voice", jobs.job("voice-1"))
    scheduler.submit("voice", jobs.job("voice-2"))

    urgent.cancel()
    failure_result_of(urgent, CancelledError)
    low.cancel()
    failure_result_of(low, CancelledError)
    for _ in range(3):
        jobs.finish()

    assert jobs.order == ["image-1", "voice-2", "llm-1"]


def test_oldest_queued_is_the_longest_waiter_whatever_its_place() -> None:
    clock = Clock()
    clock.advance(1000)
    scheduler = GpuScheduler(clock, Registry(CONFIG), queue=CONFIG.queue)
    jobs = Jobs()
    scheduler.submit("image", jobs.job("image-1"))
    scheduler.submit("image", jobs.job("image-2"))  # waits since t=1000
    clock.advance(5)
    scheduler.submit("voice", jobs.job("voice-1"))  # first in line, since t=1005

    assert scheduler_status(scheduler)["oldest_queued"] == "1970-01-01T00:16:40.000Z"


def scheduler_for(clock: Clock, chooser: Chooser | None = None) -> GpuScheduler:
    return GpuScheduler(clock, Registry(CONFIG), queue=CONFIG.queue, chooser=chooser)


def test_cancelling_a_waiter_in_the_middle_leaves_at_once_and_the_rest_keep_their_turn() -> None:
    scheduler = scheduler_for(Clock())
    jobs = Jobs()
    scheduler.submit("image", jobs.job("running"))
    scheduler.submit("llm", jobs.job("first"))
    middle = scheduler.submit("llm", jobs.job("middle"))
    scheduler.submit("llm", jobs.job("last"))
    ids = [job.id for job in scheduler.queued_in_run_order()]

    middle.cancel()

    failure_result_of(middle, CancelledError)
    assert scheduler.queue_depth == 2
    assert [job.id for job in scheduler.queued_in_run_order()] == [ids[0], ids[2]]
    for _ in range(3):
        jobs.finish()
    assert jobs.order == ["running", "first", "last"]
    assert scheduler.cancelled_jobs == 1


def test_512_waiters_start_by_priority_then_arrival_as_the_run_order_said() -> None:
    scheduler = scheduler_for(Clock())
    jobs = Jobs()
    scheduler.submit("image", jobs.job("running"))
    shuffle = random.Random(8)
    names = [shuffle.choice(["voice", "llm", "image"]) for _ in range(512)]
    for number, name in enumerate(names):
        scheduler.submit(name, jobs.job(f"{name}-{number}"))
    rank = {"voice": 0, "llm": 1, "image": 2}
    expected = sorted(
        (f"{name}-{number}" for number, name in enumerate(names)),
        key=lambda label: (rank[label.split("-")[0]], int(label.split("-")[1])),
    )

    announced = [f"{job.consumer}-{job.id - 2}" for job in scheduler.queued_in_run_order()]
    for _ in range(513):
        jobs.finish()

    assert announced == expected
    assert jobs.order == ["running", *expected]
    assert scheduler.queue_depth == 0


def test_bypassed_counts_the_jobs_after_it_in_class_priority_arrival_order_that_started_first(
) -> None:
    scheduler = scheduler_for(Clock())
    jobs = Jobs()
    scheduler.submit("image", jobs.job("running"))
    scheduler.submit("llm", jobs.job("patient"))  # interactive, priority 2
    scheduler.submit("image", jobs.job("urgent-batch"), job_class="batch", priority=4)
    scheduler.submit("voice", jobs.job("urgent"))  # interactive, priority 4
    assert [job.bypassed for job in scheduler.queued_in_run_order()] == [0, 0, 0]

    # A batch job starting first bypasses every interactive job, whatever
    # their priority or arrival.
    jobs.finish()
    assert [(job.consumer, job.bypassed) for job in scheduler.queued_in_run_order()] == [
        ("voice", 1),
        ("llm", 1),
    ]
    # A job of higher priority in the same class bypasses no one, even one
    # that arrived before it.
    jobs.finish()
    assert [job.bypassed for job in scheduler.queued_in_run_order()] == [1]
    assert jobs.order == ["running", "urgent-batch", "urgent"]


class HoldUntil:
    """A chooser that keeps the GPU idle until ``release_at``, then serves in arrival order."""

    def __init__(self, release_at: float | None) -> None:
        self.release_at = release_at
        self.asked: list[float] = []

    def pick(self, waiting: Sequence[QueuedJob], now: float) -> QueuedJob | None:
        self.asked.append(now)
        if self.release_at is None or now < self.release_at:
            return None
        return waiting[0]

    def recheck_at(self, waiting: Sequence[QueuedJob], now: float) -> float | None:
        return self.release_at

    def run_order(self, waiting: Sequence[QueuedJob], now: float) -> list[QueuedJob]:
        return list(waiting)


def test_a_chooser_that_picks_nothing_is_asked_again_at_the_time_it_named() -> None:
    clock = Clock()
    chooser = HoldUntil(release_at=10)
    scheduler = scheduler_for(clock, chooser)
    jobs = Jobs()

    held = scheduler.submit("voice", jobs.job("held"))
    idle = scheduler.when_idle()
    clock.advance(9.5)

    assert jobs.order == []
    assert scheduler.queue_depth == 1
    assert_no_result(idle)
    assert chooser.asked == [0]

    clock.advance(0.5)
    assert jobs.order == ["held"]
    assert chooser.asked == [0, 10]
    assert scheduler_status(scheduler)["last_wait_ms"] == 10_000
    jobs.finish()
    success_result_of(held)
    success_result_of(idle)


def test_a_chooser_that_names_no_time_is_asked_again_when_a_job_arrives() -> None:
    clock = Clock()
    chooser = HoldUntil(release_at=None)
    scheduler = scheduler_for(clock, chooser)
    jobs = Jobs()
    scheduler.submit("image", jobs.job("first"))
    clock.advance(100)
    assert jobs.order == []
    assert clock.getDelayedCalls() and all(
        call.getTime() == 600 for call in clock.getDelayedCalls()
    ), "only the queue timeout is pending: no recheck was asked for"

    chooser.release_at = 100
    scheduler.submit("voice", jobs.job("second"))

    assert jobs.order == ["first"]
    assert chooser.asked == [0, 100]


def test_cancelling_every_waiter_leaks_no_lock() -> None:
    clock = Clock()
    scheduler = scheduler_for(clock)
    jobs = Jobs()
    scheduler.submit("image", jobs.job("running"))
    waiting = [scheduler.submit("llm", jobs.job(f"gone-{i}")) for i in range(5)]
    idle = scheduler.when_idle()

    for d in reversed(waiting):
        d.cancel()
        failure_result_of(d, CancelledError)
    assert scheduler.queue_depth == 0
    assert_no_result(idle)
    jobs.finish()
    success_result_of(idle)

    after = scheduler.submit("voice", jobs.job("after"))
    assert jobs.order == ["running", "after"], "the GPU was free for the next job at once"
    jobs.finish()
    success_result_of(after)
    assert scheduler.in_flight == 0


def test_cancelling_the_waiters_a_chooser_holds_back_leaves_the_scheduler_idle() -> None:
    clock = Clock()
    scheduler = scheduler_for(clock, HoldUntil(release_at=50))
    jobs = Jobs()
    held = [scheduler.submit("llm", jobs.job(f"held-{i}")) for i in range(3)]
    idle = scheduler.when_idle()

    for d in held:
        d.cancel()
        failure_result_of(d, CancelledError)

    success_result_of(idle)
    assert clock.getDelayedCalls() == [], "no recheck or timeout is left behind"
    clock.advance(50)
    assert jobs.order == []


def test_a_job_abandoned_mid_run_and_collected_never_hands_the_gpu_on() -> None:
    jobs = Jobs()
    scheduler = scheduler_for(Clock())
    scheduler.submit("voice", jobs.job("abandoned"))
    scheduler.submit("llm", jobs.job("waiting"))
    jobs.running = None

    # Nothing refers to the scheduler or its jobs any more: collecting the
    # running job's coroutine must not release the lock into the waiting one.
    del scheduler
    gc.collect()

    assert jobs.order == ["abandoned"]


def test_a_full_queue_of_jobs_failing_at_once_drains_without_exhausting_the_stack() -> None:
    scheduler = scheduler_for(Clock())
    jobs = Jobs()
    scheduler.submit("image", jobs.job("running"))
    failing = [
        scheduler.submit("llm", lambda: fail(ValueError("refused at once")))
        for _ in range(CONFIG.queue.max_depth)
    ]

    jobs.finish()

    for d in failing:
        failure_result_of(d, ValueError)
    assert scheduler.failed_jobs == CONFIG.queue.max_depth
    assert (scheduler.queue_depth, scheduler.in_flight) == (0, 0)
