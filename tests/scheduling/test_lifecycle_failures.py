"""
The lifecycle when an unload or a load fails or is cancelled
(:mod:`mgpumanager.scheduling.lifecycle`): a failed or hung route or
``systemctl`` fails the job naming the consumer; a job cancelled meanwhile is
cancelled, not failed; a load that may still be going on counts as loaded.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError

from mgpumanager.consumers.commands import CommandTimedOut
from tests.lifecycle_world import HOLD, SYSTEMCTL, World, refusal, voice_world
from tests.support import EPOCH, assert_no_result, failure_result_of


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((500, b"CUDA error:\n  out of memory"), "POST /api/free answered HTTP 500 CUDA error: "
         "out of memory"),
        (ConnectionRefusedError(), "POST /api/free: connection refused"),
    ],
)
def test_a_failed_unload_route_fails_the_job_naming_the_victim(answer: Any, said: str) -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = answer

    error = refusal(world.prepare("voice"))

    assert (error.kind.code, error.status, error.consumer) == ("unload_failed", 503, "image")
    assert error.message == f"unloading image failed: {said}"
    assert world.client.urls() == ["9003/api/free"]
    assert world.resident() >= {"image", "whisper"}
    assert "voice" not in world.resident()
    assert (world.lifecycle.evictions, world.lifecycle.failed_unloads) == (0, 1)
    assert world.registry["image"].unload_count == 0
    assert world.lifecycle.decisions[0].outcome == error.message


@pytest.mark.logged_errors_expected
def test_an_unload_route_that_hangs_fails_after_the_unload_timeout() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = HOLD

    d = world.prepare("voice")
    world.advance(29.75)
    assert_no_result(d)
    world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.consumer) == ("unload_failed", "image")
    assert "timed out after 30 s" in error.message
    assert world.client.cancelled == ["http://127.0.0.1:9003/api/free"]
    assert world.client.urls() == ["9003/api/free"]
    assert "image" in world.resident()


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(
    ("result", "said"),
    [
        (
            (5, "Failed to stop whisper.service: Access denied\n"),
            "`sudo -n systemctl stop whisper.service` exited with 5: "
            "Failed to stop whisper.service: Access denied",
        ),
        (
            CommandTimedOut("`sudo -n systemctl stop whisper.service` took longer than 30 s"),
            "took longer than 30 s",
        ),
    ],
)
def test_a_failed_systemctl_stop_fails_the_job_naming_the_unit_consumer(
    result: Any, said: str
) -> None:
    # image is not on the card; whisper is the only victim.  884 MiB free.
    world = World(loaded={"voice": False}, other_mib=10500)
    world.commands.results["stop"] = result

    error = refusal(world.prepare("voice"))

    assert (error.kind.code, error.consumer) == ("unload_failed", "whisper")
    assert said in error.message
    assert world.commands.calls == [([*SYSTEMCTL, "stop", "whisper.service"], 30.0)]
    assert world.client.calls == []
    assert "whisper" in world.resident()


def test_a_job_cancelled_during_an_unload_route_is_cancelled_not_failed() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = HOLD

    d = world.prepare("voice")
    assert [c.getTime() for c in world.clock.getDelayedCalls()].count(EPOCH + 30) == 1
    d.cancel()

    failure_result_of(d, CancelledError)
    assert world.client.cancelled == ["http://127.0.0.1:9003/api/free"]
    assert world.lifecycle.failed_unloads == 0
    assert world.client.urls() == ["9003/api/free"]
    # The unload's 30 s time limit went with it.
    assert [c for c in world.clock.getDelayedCalls() if c.getTime() == EPOCH + 30] == []


def test_a_job_cancelled_during_systemctl_is_cancelled_not_failed() -> None:
    world = World(loaded={"voice": False}, other_mib=10500)
    world.commands.results["stop"] = HOLD

    d = world.prepare("voice")
    d.cancel()

    failure_result_of(d, CancelledError)
    assert world.commands.cancelled == ["stop"]
    assert world.lifecycle.failed_unloads == 0
    assert "whisper" in world.resident()


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((500, b"no such model"), "POST /admin/load answered HTTP 500 no such model"),
        (ConnectionRefusedError(), "POST /admin/load: connection refused"),
        (HOLD, "POST /admin/load timed out after 120 s"),
    ],
)
def test_a_failed_load_route_fails_the_job_naming_the_target(answer: Any, said: str) -> None:
    world = World(loaded={"voice": False})
    world.client.answers["http://127.0.0.1:9001/admin/load"] = answer

    d = world.prepare("voice")
    if answer == HOLD:
        world.advance(119.75)
        assert_no_result(d)
        world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.status, error.kind.retryable) == ("load_failed", 503, True)
    assert error.consumer == "voice"
    assert error.message == f"loading voice failed: {said}"
    # The load may still be going on: count it as loaded, never load on top of it.
    assert "voice" in world.resident()
    assert (world.lifecycle.loads, world.lifecycle.failed_loads) == (0, 1)


@pytest.mark.logged_errors_expected
def test_a_started_unit_that_never_turns_healthy_fails_after_the_load_timeout() -> None:
    world = World(loaded={"whisper": False})
    world.card.held.pop("whisper", None)
    world.health.healthy_from["whisper"] = EPOCH + 10_000

    d = world.prepare("whisper")
    world.advance(119.75)
    assert_no_result(d)
    world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.consumer) == ("load_failed", "whisper")
    assert "never answered its health route" in error.message
    # systemd may yet bring it up: it counts as loaded until unloaded again.
    assert "whisper" in world.resident()


@pytest.mark.logged_errors_expected
def test_a_unit_that_fails_to_start_fails_the_job_without_probing() -> None:
    world = World(loaded={"whisper": False})
    world.commands.results["start"] = (1, "Job for whisper.service failed.")

    error = refusal(world.prepare("whisper"))

    assert (error.kind.code, error.consumer) == ("load_failed", "whisper")
    assert "`sudo -n systemctl start whisper.service` exited with 1" in error.message
    assert world.health.calls == []
    assert world.lifecycle.failed_loads == 1


def test_a_load_abandoned_by_its_client_counts_as_loaded() -> None:
    """The server keeps loading after our request is cut: the next job must unload it."""
    world = World(loaded={"voice": False})
    world.client.answers["http://127.0.0.1:9001/admin/load"] = HOLD

    d = world.prepare("voice")
    d.cancel()

    failure_result_of(d, CancelledError)
    assert "voice" in world.resident()
