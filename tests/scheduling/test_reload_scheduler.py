"""
What a reload does to the GPU queue: waiting jobs of a removed consumer are
answered ``no_consumer`` at once, the others keep their places; a running job
of a removed consumer finishes as it was and hands the GPU on; new queue
limits and a new policy hold from the next job and the next pick.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mgpumanager.common.errors import NO_CONSUMER, QUEUE_FULL, QUEUE_TIMEOUT, ApiError
from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.config.scheduling import BATCH, INTERACTIVE
from mgpumanager.scheduling.choosing import PolicyChooser
from mgpumanager.scheduling.policy import make_policy
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import queue_status, scheduler_status
from tests.builders import consumer
from tests.support import assert_no_result, failure_result_of, success_result_of


def _config(**extra: Any) -> Config:
    consumers = extra.pop("consumers", None) or {
        "voice": consumer(9001, "tts"),
        "image": consumer(9003, "image"),
    }
    return parse_config({"consumers": consumers, **extra})


def _pending() -> tuple[Callable[[], Deferred[str]], Deferred[str]]:
    """A job that runs until its Deferred is fired."""
    done: Deferred[str] = Deferred()
    return (lambda: done), done


def _scheduler(
    config: Config, clock: Clock
) -> tuple[GpuScheduler, Registry, PolicyChooser]:
    registry = Registry(config)
    chooser = PolicyChooser(make_policy(config.scheduling), lambda name: False)
    scheduler = GpuScheduler(clock, registry, queue=config.queue, chooser=chooser,
                             scheduling=config.scheduling)
    return scheduler, registry, chooser


def _reload(config: Config, registry: Registry, chooser: PolicyChooser,
            scheduler: GpuScheduler) -> None:
    """What the daemon's reload does to these three, in its order."""
    registry.reconfigure(config)
    chooser.reconfigure(config)
    scheduler.reconfigure(config)


def test_waiting_jobs_of_a_removed_consumer_get_no_consumer_and_the_rest_keep_their_turn() -> None:
    clock = Clock()
    scheduler, registry, chooser = _scheduler(_config(), clock)
    first, first_done = _pending()
    running = scheduler.submit("voice", first, kind="tts")
    doomed = [scheduler.submit("image", lambda: Deferred(), kind="image") for _ in range(2)]
    kept_job, kept_done = _pending()
    kept = scheduler.submit("voice", kept_job, kind="tts")

    _reload(_config(consumers={"voice": consumer(9001, "tts")}), registry, chooser, scheduler)

    for refused in doomed:
        error = failure_result_of(refused, ApiError).value
        assert (error.kind, error.consumer) == (NO_CONSUMER, "image")
        assert error.kind.status == 501
        assert "image was removed by a reload" in error.message
    assert scheduler.queue_depth == 1
    assert_no_result(kept)
    first_done.callback("first")
    assert success_result_of(running) == "first"
    kept_done.callback("kept")
    assert success_result_of(kept) == "kept"
    assert scheduler.failed_jobs == 0


def test_a_running_job_of_a_removed_consumer_finishes_and_hands_the_gpu_on() -> None:
    clock = Clock()
    scheduler, registry, chooser = _scheduler(_config(), clock)
    job, done = _pending()
    running = scheduler.submit("image", job, kind="image", job_class=BATCH)
    waiting_job, waiting_done = _pending()
    waiting = scheduler.submit("voice", waiting_job, kind="tts")
    image_state = registry["image"]

    _reload(_config(consumers={"voice": consumer(9001, "tts")}), registry, chooser, scheduler)
    clock.advance(3)
    # Status still describes the job holding the GPU, though its consumer is gone.
    status = queue_status(scheduler, clock.seconds())
    assert status["running"]["consumer"] == "image"
    assert [job["consumer"] for job in status["queue"]] == ["voice"]

    done.callback("generated")
    assert success_result_of(running) == "generated"
    assert (image_state.active, image_state.total_requests) == (0, 1)
    assert scheduler.running is not None and scheduler.running.view.consumer == "voice"
    waiting_done.callback("spoken")
    assert success_result_of(waiting) == "spoken"
    assert scheduler_status(scheduler)["total_jobs"] == 2
    assert registry["voice"].total_requests == 1


def test_new_queue_limits_hold_for_jobs_queued_after_the_reload() -> None:
    clock = Clock()
    scheduler, registry, chooser = _scheduler(_config(queue={"max_wait_seconds": 100}), clock)
    job, _ = _pending()
    scheduler.submit("voice", job, kind="tts")
    early = scheduler.submit("voice", lambda: Deferred(), kind="tts")

    _reload(_config(queue={"max_depth": 2, "max_wait_seconds": 10}),
            registry, chooser, scheduler)
    late = scheduler.submit("voice", lambda: Deferred(), kind="tts")
    assert failure_result_of(
        scheduler.submit("voice", lambda: Deferred(), kind="tts"), ApiError
    ).value.kind == QUEUE_FULL
    assert scheduler.max_depth == 2

    clock.advance(10)
    assert failure_result_of(late, ApiError).value.kind == QUEUE_TIMEOUT
    assert_no_result(early)  # it was promised 100 s when it queued
    clock.advance(90)
    assert failure_result_of(early, ApiError).value.kind == QUEUE_TIMEOUT


def test_the_next_pick_follows_a_reloaded_policy() -> None:
    clock = Clock()
    scheduler, registry, chooser = _scheduler(_config(scheduling={"policy": "fifo"}), clock)
    assert scheduler.policy_name == "fifo"
    job, done = _pending()
    scheduler.submit("voice", job, kind="tts")
    started: list[str] = []

    def record(label: str) -> Callable[[], Deferred[str]]:
        def run() -> Deferred[str]:
            started.append(label)
            return Deferred()

        return run

    scheduler.submit("image", record("image"), kind="image", job_class=BATCH)
    clock.advance(1)
    scheduler.submit("voice", record("voice"), kind="tts", job_class=INTERACTIVE)
    assert [job.consumer for job in scheduler.queued_in_run_order()] == ["image", "voice"]

    _reload(_config(scheduling={"policy": "interactive-first"}), registry, chooser, scheduler)
    assert scheduler.policy_name == "interactive-first"
    assert [job.consumer for job in scheduler.queued_in_run_order()] == ["voice", "image"]
    done.callback("done")
    assert started == ["voice"]


def test_a_job_whose_consumer_vanished_unseen_never_keeps_the_gpu() -> None:
    clock = Clock()
    scheduler, registry, _ = _scheduler(_config(), clock)
    first, first_done = _pending()
    scheduler.submit("voice", first, kind="tts")
    orphan = scheduler.submit("image", lambda: Deferred(), kind="image")
    after, after_done = _pending()
    later = scheduler.submit("voice", after, kind="tts")
    # The registry forgets "image" without the scheduler being told.
    registry.reconfigure(_config(consumers={"voice": consumer(9001, "tts")}))

    first_done.callback("first")

    assert failure_result_of(orphan, ApiError).value.kind == NO_CONSUMER
    after_done.callback("after")
    assert success_result_of(later) == "after"
    assert scheduler.in_flight == 0
