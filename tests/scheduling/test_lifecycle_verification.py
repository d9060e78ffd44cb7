"""
The lifecycle's check that an unload gave the memory back
(:mod:`mgpumanager.scheduling.lifecycle`): by free memory or by the victim's
own processes, polled every verify interval up to the verify timeout; memory
that never comes back fails the job naming the victim, and nothing is ever
loaded on top of it.  Each decision keeps its unload and recovery timings.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lifecycle_world import CONSUMERS, HOLD, World, config_of, refusal, voice_world
from tests.support import EPOCH, assert_no_result, success_result_of


@pytest.mark.parametrize(
    ("hold_for", "release_after", "unload_ms", "recovery_ms"),
    [(0.0, 0.0, 0, 0), (0.5, 0.0, 500, 0), (0.0, 1.0, 0, 1000), (0.75, 2.5, 750, 2500)],
)
def test_a_decision_keeps_the_unload_and_recovery_timings(
    hold_for: float, release_after: float, unload_ms: int, recovery_ms: int
) -> None:
    world = voice_world()
    unload = "http://127.0.0.1:9003/api/free"
    if hold_for:
        world.client.answers[unload] = HOLD
    if release_after:
        world.release_after("image", release_after)

    d = world.prepare("voice")
    world.advance(hold_for)
    if hold_for:
        assert_no_result(d)
        world.client.answers.pop(unload)
        world.client.answer(200)
    if release_after:
        world.advance(release_after - 0.25)
        assert_no_result(d)
        assert world.client.urls() == ["9003/api/free"]  # nothing loaded meanwhile
        world.advance(0.25)
    success_result_of(d)

    (decision,) = world.lifecycle.decisions
    assert (decision.unload_ms, decision.recovery_ms) == (unload_ms, recovery_ms)
    assert decision.recovered_mib == 13000
    assert decision.time == EPOCH
    assert world.client.urls() == ["9003/api/free", "9001/admin/load"]


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(("back_mib", "verified"), [(9750, True), (9749, False)])
def test_three_quarters_of_the_declared_memory_back_verifies_the_unload(
    back_mib: int, verified: bool
) -> None:
    world = voice_world()
    world.card.per_process = False  # only free memory to go by

    def partly() -> None:
        world.card.held.pop("image")
        world.card.other_mib += 13000 - back_mib

    world.on_unload["image"] = partly

    d = world.run("voice", limit=20)

    if verified:
        success_result_of(d)
        assert world.lifecycle.decisions[0].recovered_mib == back_mib
    else:
        assert refusal(d).kind.code == "unload_failed"


def test_the_victims_own_processes_letting_go_verifies_the_unload() -> None:
    # Someone else grabs the memory at once, so free memory never rises; but NVML
    # shows the victim's process holding nothing any more.
    world = voice_world()

    def taken_over() -> None:
        world.card.other_mib += world.card.held.pop("image")

    world.on_unload["image"] = taken_over

    success_result_of(world.prepare("voice"))

    first = world.lifecycle.decisions[0]
    assert (first.victim, first.outcome, first.recovered_mib) == ("image", "unloaded", 0)
    assert first.recovery_ms == 0
    # The memory really is still taken, so making room goes on with whisper.
    assert world.lifecycle.decisions[1].victim == "whisper"
    assert "voice" in world.resident()


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(("left_mib", "verified"), [(649, True), (650, False)])
def test_less_than_five_percent_left_in_its_processes_counts_as_unloaded(
    left_mib: int, verified: bool
) -> None:
    world = voice_world()

    def mostly() -> None:
        world.card.held["image"] = left_mib
        world.card.other_mib += 13000 - left_mib

    world.on_unload["image"] = mostly

    d = world.run("voice", limit=20)

    if verified:
        success_result_of(d)
    else:
        assert refusal(d).consumer == "image"


@pytest.mark.logged_errors_expected
def test_per_process_memory_is_no_evidence_when_nvml_does_not_report_processes() -> None:
    world = voice_world()
    world.card.per_process = False

    def taken_over() -> None:
        world.card.other_mib += world.card.held.pop("image")

    world.on_unload["image"] = taken_over

    assert refusal(world.run("voice", limit=20)).kind.code == "unload_failed"


@pytest.mark.logged_errors_expected
def test_memory_that_never_comes_back_fails_the_job_and_loads_nothing(
    fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    world = voice_world()
    world.on_unload["image"] = lambda: None  # the route says 200; the card disagrees

    d = world.prepare("voice")
    world.advance(9.75)
    assert_no_result(d)
    world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.status, error.kind.retryable) == ("unload_failed", 503, True)
    assert error.consumer == "image"
    assert "image" in error.message
    assert "did not come back within 10 s" in error.message
    assert world.client.urls() == ["9003/api/free"]  # no load call
    assert "voice" not in world.resident()
    assert world.lifecycle.failed_unloads == 1
    assert world.lifecycle.loads == 0
    (decision,) = world.lifecycle.decisions
    assert decision.outcome == error.message
    assert decision.recovery_ms == 10000
    assert decision.victim == "image"
    assert fail_on_logged_errors, "the failed unload is logged as an error"


@pytest.mark.logged_errors_expected
def test_a_retry_after_memory_never_came_back_does_not_load_on_top_of_it() -> None:
    # No per-process figures (so nothing measures the victim as still loaded).
    world = voice_world()
    world.card.per_process = False
    world.on_unload["image"] = lambda: None

    assert refusal(world.run("voice", limit=20)).consumer == "image"
    retry = world.run("voice", limit=20)

    # Today: whisper is evicted, "nothing can be evicted; proceeding", and voice is
    # loaded with 1884 MiB free for its 3000.
    assert "9001/admin/load" not in world.client.urls()
    assert refusal(retry).kind.code == "unload_failed"


@pytest.mark.logged_errors_expected
def test_the_card_is_polled_every_verify_interval_up_to_the_verify_timeout() -> None:
    world = World(
        config_of(CONSUMERS, verify_interval_seconds=0.5, verify_timeout_seconds=2),
        loaded={"voice": False, "image": True},
    )
    world.on_unload["image"] = lambda: None
    reads: list[tuple[float, int]] = []

    d = world.prepare("voice")
    for _ in range(8):
        reads.append((world.clock.seconds() - EPOCH, world.card.reads))
        world.clock.advance(0.25)

    # One read for the fit, then one at 0, 0.5, 1, 1.5 and 2 s after the unload.
    assert [n for _, n in reads] == [2, 2, 3, 3, 4, 4, 5, 5]
    assert world.card.reads == 6
    assert "within 2 s" in refusal(d).message


def test_a_failed_nvml_read_while_waiting_does_not_end_the_wait() -> None:
    world = voice_world()

    def driver_hiccup() -> None:
        world.card.available = False

        def back() -> None:
            world.card.available = True
            world.card.held.pop("image")

        world.clock.callLater(0.5, back)

    world.on_unload["image"] = driver_hiccup

    d = world.prepare("voice")
    world.advance(0.25)
    assert_no_result(d)
    world.advance(0.25)

    success_result_of(d)
    assert world.lifecycle.decisions[0].recovery_ms == 500


def test_an_unload_is_verified_against_what_the_victim_held_not_its_peak() -> None:
    # The image server once held 20 GiB; it holds its declared 13000 MiB now.
    world = voice_world()
    world.card.per_process = False  # only free memory to go by
    world.registry["image"].note_resident_mib(20000)
    assert world.registry["image"].size_mib == 20000

    d = world.run("voice", limit=20)

    success_result_of(d)
    assert world.lifecycle.decisions[0].outcome == "unloaded"
    assert world.lifecycle.decisions[0].recovered_mib == 13000
