"""
The scheduler with a scheduling policy as its chooser: the order jobs really
start in, the linger held with a Clock, the decision log and the queue as
status shows it.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from mgpumanager.scheduling.choosing import PolicyChooser
from mgpumanager.scheduling.policy import FIFO, SchedulingConfig, make_policy
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import queue_status
from tests.scheduling.test_priority import CONFIG, Jobs, failure_result_of


def scheduler_with(clock: Clock, swapping: set[str], **scheduling: object) -> GpuScheduler:
    config = SchedulingConfig.from_mapping(scheduling or None)
    chooser = PolicyChooser(make_policy(config), lambda name: name in swapping)
    return GpuScheduler(clock, Registry(CONFIG), queue=CONFIG.queue, chooser=chooser,
                        scheduling=config)


def submit(scheduler: GpuScheduler, jobs: Jobs, consumer: str, kind: str, label: str,
           priority: int = 0) -> object:
    job_class = scheduler.class_of(kind)
    return scheduler.submit(consumer, jobs.job(label), kind=kind, job_class=job_class,
                            priority=priority)


def run_all(jobs: Jobs, count: int) -> None:
    for _ in range(count):
        jobs.finish()


def test_a_voice_job_behind_three_images_runs_first_under_interactive_first() -> None:
    scheduler, jobs = scheduler_with(Clock(), set()), Jobs()
    submit(scheduler, jobs, "image", "image", "running")
    for n in range(3):
        submit(scheduler, jobs, "image", "image", f"image-{n}")
    submit(scheduler, jobs, "voice", "tts", "tts")
    run_all(jobs, 5)
    assert jobs.order == ["running", "tts", "image-0", "image-1", "image-2"]


def test_the_same_queue_runs_in_arrival_order_under_fifo() -> None:
    scheduler, jobs = scheduler_with(Clock(), set(), policy=FIFO), Jobs()
    submit(scheduler, jobs, "image", "image", "running")
    for n in range(3):
        submit(scheduler, jobs, "image", "image", f"image-{n}")
    submit(scheduler, jobs, "voice", "tts", "tts")
    run_all(jobs, 5)
    assert jobs.order == ["running", "image-0", "image-1", "image-2", "tts"]
    assert scheduler.policy_name == "fifo"


def test_a_resident_job_goes_first_and_the_decision_log_says_why() -> None:
    scheduler, jobs = scheduler_with(Clock(), {"llm"}, linger_seconds=0), Jobs()
    submit(scheduler, jobs, "image", "image", "running")
    submit(scheduler, jobs, "llm", "llm", "needs-swap")
    submit(scheduler, jobs, "voice", "tts", "resident")
    run_all(jobs, 3)
    assert jobs.order == ["running", "resident", "needs-swap"]
    [decision] = scheduler.decisions
    assert (decision.type, decision.rule, decision.job.consumer) == ("pick", "no-swap", "voice")


def test_after_an_interactive_job_batch_work_needing_a_swap_lingers() -> None:
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, {"image"}, linger_seconds=2), Jobs()
    submit(scheduler, jobs, "voice", "tts", "voice")
    submit(scheduler, jobs, "image", "image", "image")
    jobs.finish()
    assert jobs.order == ["voice"]
    clock.advance(1)
    submit(scheduler, jobs, "voice", "tts", "voice-again")
    assert jobs.order == ["voice", "voice-again"]
    jobs.finish()
    clock.advance(1.9)
    assert jobs.order == ["voice", "voice-again"]
    clock.advance(0.2)
    assert jobs.order == ["voice", "voice-again", "image"]


def test_the_default_linger_holds_an_image_twelve_seconds_after_a_voice_job() -> None:
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, {"image"}), Jobs()
    submit(scheduler, jobs, "voice", "tts", "voice")
    submit(scheduler, jobs, "image", "image", "image")
    jobs.finish()
    clock.advance(11.9)
    assert jobs.order == ["voice"]
    assert scheduler.queue_depth == 1
    clock.advance(0.1)
    assert jobs.order == ["voice", "image"]


def test_an_interactive_job_needing_a_swap_never_lingers() -> None:
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, {"llm"}), Jobs()
    submit(scheduler, jobs, "voice", "tts", "voice")
    submit(scheduler, jobs, "llm", "llm", "llm")
    jobs.finish()  # the default 12 s linger would hold batch work, not this
    assert jobs.order == ["voice", "llm"]
    jobs.finish()
    submit(scheduler, jobs, "voice", "tts", "voice-2")
    assert jobs.order == ["voice", "llm", "voice-2"]
    assert [d.rule for d in scheduler.decisions] == []


def test_a_stream_of_interactive_jobs_ahead_of_a_batch_job_does_not_make_it_due() -> None:
    # Twenty voice jobs start ahead of a waiting image: none of them bypasses
    # it (interactive comes first), so it waits for the guard, not for the cap.
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, set(), max_bypass=2, batch_guard_seconds=100), Jobs()
    submit(scheduler, jobs, "voice", "tts", "voice-0")
    submit(scheduler, jobs, "image", "image", "image")
    image_started = None
    for n in range(1, 41):
        submit(scheduler, jobs, "voice", "tts", f"voice-{n}")
        image = [e.job for e in scheduler.queue_entries() if e.job.consumer == "image"]
        assert [job.bypassed for job in image] in ([0], [])
        clock.advance(3)
        jobs.finish()
        if image_started is None and "image" in jobs.order:
            image_started = clock.seconds()
    # Not after two voice jobs (the cap), but once the guard expired.
    assert image_started == 102


def test_the_batch_guard_starts_the_oldest_batch_job_through_a_flood_of_voice() -> None:
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, set(), batch_guard_seconds=10), Jobs()
    submit(scheduler, jobs, "voice", "tts", "voice-0")
    submit(scheduler, jobs, "image", "image", "image")
    for n in range(1, 20):
        submit(scheduler, jobs, "voice", "tts", f"voice-{n}")
        clock.advance(3)
        jobs.finish()
    assert jobs.order.index("image") <= 5


def test_cancelling_a_waiter_anywhere_keeps_the_rest_in_run_order() -> None:
    scheduler, jobs = scheduler_with(Clock(), {"llm"}, linger_seconds=0), Jobs()
    submit(scheduler, jobs, "image", "image", "running")
    submit(scheduler, jobs, "llm", "llm", "llm")
    middle = submit(scheduler, jobs, "voice", "tts", "middle")
    submit(scheduler, jobs, "voice", "tts", "last")
    middle.cancel()  # type: ignore[attr-defined]
    failure_result_of(middle, CancelledError)
    run_all(jobs, 3)
    assert jobs.order == ["running", "last", "llm"]


def test_status_shows_the_running_job_and_the_queue_in_run_order_with_eta() -> None:
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, {"image"}), Jobs()
    submit(scheduler, jobs, "voice", "tts", "first")
    clock.advance(2)
    jobs.finish()
    clock.advance(12)  # past the linger, which would hold the image
    submit(scheduler, jobs, "image", "image", "running")
    submit(scheduler, jobs, "image", "image", "image")
    submit(scheduler, jobs, "voice", "tts", "voice")
    clock.advance(1)
    status = queue_status(scheduler, clock.seconds())
    assert status["policy"] == "interactive-first"
    assert status["running"]["phase"] == "relaying"
    assert [(job["consumer"], job["class"]) for job in status["queue"]] == [
        ("voice", "interactive"), ("image", "batch")]
    assert status["queue"][0]["eta_seconds"] is None  # no image run observed yet
    assert status["queue"][1]["needs_swap"] is True


def test_512_waiters_start_in_the_run_order_status_announced() -> None:
    scheduler, jobs = scheduler_with(Clock(), {"llm"}), Jobs()
    submit(scheduler, jobs, "image", "image", "running")
    kinds = [("image", "image"), ("llm", "llm"), ("voice", "tts")]
    for n in range(511):
        consumer, kind = kinds[(n * 7) % 3]
        submit(scheduler, jobs, consumer, kind, f"{consumer}-{n + 2}")
    announced = [f"{entry.job.consumer}-{entry.job.id}" for entry in scheduler.queue_entries()]
    run_all(jobs, 512)
    assert jobs.order[1:] == announced


def test_an_interactive_job_needing_a_swap_is_due_after_the_swap_bound() -> None:
    clock = Clock()
    scheduler, jobs = scheduler_with(clock, {"llm"}, swap_bound_seconds=10,
                                     linger_seconds=0), Jobs()
    submit(scheduler, jobs, "voice", "tts", "running")
    submit(scheduler, jobs, "llm", "llm", "llm")
    for n in range(4):
        submit(scheduler, jobs, "voice", "tts", f"voice-{n}")
    clock.advance(4)
    jobs.finish()  # 4 s waited: the resident voice job goes first
    clock.advance(7)
    jobs.finish()  # 11 s waited: the llm job is due
    run_all(jobs, 4)
    assert jobs.order == ["running", "voice-0", "llm", "voice-1", "voice-2", "voice-3"]
    assert [d.rule for d in scheduler.decisions] == ["no-swap"]


def test_a_job_bypassed_max_bypass_times_is_due() -> None:
    scheduler, jobs = scheduler_with(Clock(), {"llm"}, max_bypass=2, linger_seconds=0), Jobs()
    submit(scheduler, jobs, "voice", "tts", "running")
    submit(scheduler, jobs, "llm", "llm", "llm")
    for n in range(3):
        submit(scheduler, jobs, "voice", "tts", f"voice-{n}")
    run_all(jobs, 5)
    assert jobs.order == ["running", "voice-0", "voice-1", "llm", "voice-2"]
    assert [d.rule for d in scheduler.decisions] == ["no-swap", "no-swap"]


def test_within_a_group_higher_priority_then_arrival() -> None:
    scheduler, jobs = scheduler_with(Clock(), set()), Jobs()
    submit(scheduler, jobs, "image", "image", "running")
    submit(scheduler, jobs, "voice", "tts", "low-first", priority=0)
    submit(scheduler, jobs, "voice", "tts", "high", priority=3)
    submit(scheduler, jobs, "voice", "tts", "low-second", priority=0)
    run_all(jobs, 4)
    assert jobs.order == ["running", "high", "low-first", "low-second"]
