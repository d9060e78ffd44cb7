"""The timer under the GPU sampler and the health probes, and a reload changing its period."""

from __future__ import annotations

from twisted.internet.task import Clock

from mgpumanager.common.periodic import Periodic


def test_work_runs_at_start_then_every_interval_and_a_new_interval_takes_over() -> None:
    clock = Clock()
    runs: list[float] = []
    timer = Periodic(lambda: runs.append(clock.seconds()), clock, 5.0)

    timer.start()
    clock.advance(5.0)
    timer.set_interval(2.0)
    clock.advance(2.0)
    clock.advance(2.0)

    assert runs == [0.0, 5.0, 7.0, 9.0]
    timer.stop()
    clock.advance(10.0)
    assert runs == [0.0, 5.0, 7.0, 9.0]
    assert clock.getDelayedCalls() == []


def test_an_unchanged_or_stopped_timer_is_left_alone() -> None:
    clock = Clock()
    runs: list[float] = []
    timer = Periodic(lambda: runs.append(clock.seconds()), clock, 5.0)
    timer.set_interval(3.0)  # not started: only remembered
    timer.start()
    clock.advance(3.0)
    timer.set_interval(3.0)
    clock.advance(3.0)
    assert runs == [0.0, 3.0, 6.0]
    timer.stop()
