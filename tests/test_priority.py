"""
The queue serves higher-priority consumers first (``priority``: 0 low … 4
urgent), first come first served within a priority, and a cancelled or timed-out
waiter leaves both orders intact.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpumanager.config import parse_config
from mgpumanager.registry import Registry
from mgpumanager.scheduler import GpuScheduler
from tests.builders import consumer

_case = SynchronousTestCase()
failure_result_of = _case.failureResultOf


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
    scheduler = GpuScheduler(Clock(), Registry(CONFIG))
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
    scheduler = GpuScheduler(Clock(), Registry(CONFIG))
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
    scheduler = GpuScheduler(clock, Registry(CONFIG))
    jobs = Jobs()
    scheduler.submit("image", jobs.job("image-1"))
    scheduler.submit("image", jobs.job("image-2"))  # waits since t=1000
    clock.advance(5)
    scheduler.submit("voice", jobs.job("voice-1"))  # first in line, since t=1005

    assert scheduler.as_status()["oldest_queued"] == "1970-01-01T00:16:40.000Z"
