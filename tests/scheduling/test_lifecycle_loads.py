"""
The lifecycle loading a job's consumer (:mod:`mgpumanager.scheduling.lifecycle`):
by its load route or by starting its unit and waiting until it is healthy;
what it leaves alone (a resident or self-managing target, one without a
declared size), and how probe reports and a fresh sample decide residency.
"""

from __future__ import annotations

import pytest

from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.registry import Registry
from tests.lifecycle_world import CONFIG, PIDS, SYSTEMCTL, World, snapshot, voice_world
from tests.support import EPOCH, assert_no_result, success_result_of


def test_a_target_with_a_load_route_is_loaded_and_marked_resident() -> None:
    world = World(loaded={"voice": False})

    success_result_of(world.prepare("voice"))

    assert world.client.urls() == ["9001/admin/load"]
    assert list(world.lifecycle.decisions) == []
    state = world.registry["voice"]
    assert state.resident and state.load_count == 1
    assert state.lifecycle_changed_at == EPOCH
    assert world.lifecycle.loads == 1


def test_a_systemd_target_is_started_then_waited_for_until_healthy() -> None:
    world = World(loaded={"whisper": False})
    world.card.held.pop("whisper", None)
    world.health.healthy_from["whisper"] = EPOCH + 2

    d = world.prepare("whisper")
    world.advance(1.75)
    assert_no_result(d)
    assert "whisper" not in world.resident()
    world.advance(0.25)
    success_result_of(d)

    assert world.commands.calls == [([*SYSTEMCTL, "start", "whisper.service"], 120.0)]
    assert [name for name, _ in world.health.calls] == ["whisper"] * 9
    assert world.health.calls[-1][1] == EPOCH + 2
    assert "whisper" in world.resident()
    assert world.lifecycle.loads == 1


@pytest.mark.parametrize("target", ["llm", "voice", "embed"])
def test_a_resident_or_self_managing_target_is_left_alone(target: str) -> None:
    world = World()
    before = snapshot(world.registry)

    success_result_of(world.prepare(target))

    assert world.card.reads == 0
    assert world.client.calls == [] and world.commands.calls == []
    assert list(world.lifecycle.decisions) == []
    assert snapshot(world.registry) == before


def test_a_target_without_a_declared_size_is_loaded_without_making_room() -> None:
    world = World(loaded={"ocr": False}, other_mib=9000)

    success_result_of(world.prepare("ocr"))

    assert world.card.reads == 0
    assert world.client.urls() == ["9006/load"]
    assert list(world.lifecycle.decisions) == []
    assert "ocr" in world.resident()


def test_a_self_managing_target_reported_unloaded_is_loaded_without_making_room() -> None:
    world = World(other_mib=9000)
    world.registry["llm"].reported_loaded = False

    success_result_of(world.prepare("llm"))

    assert world.card.reads == 0
    assert world.registry["llm"].resident
    assert world.registry["llm"].reported_loaded is None


def test_initial_residency_lazy_consumers_start_empty() -> None:
    registry = Registry(CONFIG)

    assert {state.name for state in registry if state.resident} == {
        "voice", "llm", "whisper", "embed", "ocr",
    }
    assert not registry["image"].resident


def test_a_probe_reporting_the_lazy_consumer_loaded_makes_it_a_victim() -> None:
    world = World(loaded={"voice": False})
    world.registry["image"].reported_loaded = True
    world.card.held["image"] = 13000  # 384 MiB free

    success_result_of(world.prepare("voice"))

    assert world.client.urls() == ["9003/api/free", "9001/admin/load"]
    image = world.registry["image"]
    assert (image.reported_loaded, image.resident) == (None, False)


def test_a_target_the_fresh_sample_shows_loaded_is_neither_made_room_for_nor_loaded() -> None:
    # Believed unloaded, but its process holds its full size on the card: once the
    # sample taken for the fit check is attributed, it counts as resident.
    world = World(loaded={"voice": False}, other_mib=10000)
    world.card.held["voice"] = 3000  # 384 MiB free: voice would not fit

    def attribute(sample: GpuSample) -> None:
        if sample.reading is not None:
            state = world.registry["voice"]
            state.measured_resident_mib = sample.reading.processes.get(PIDS["voice"], 0)
            state.measured_at = world.clock.seconds()

    world.sampler.subscribe(attribute)

    success_result_of(world.prepare("voice"))

    assert world.card.reads == 1
    assert world.client.calls == [] and world.commands.calls == []
    assert list(world.lifecycle.decisions) == []
    assert world.lifecycle.loads == 0
    assert world.registry["voice"].resident


def test_a_probe_reporting_the_target_unloaded_makes_it_load() -> None:
    world = World()
    world.registry["voice"].reported_loaded = False
    world.card.held.pop("voice")

    success_result_of(world.prepare("voice"))

    assert world.client.urls() == ["9001/admin/load"]
    assert world.registry["voice"].resident


def test_a_probe_reporting_a_resident_unloaded_takes_it_off_the_candidates() -> None:
    world = voice_world()
    world.registry["image"].reported_loaded = False  # yet the card still holds it

    success_result_of(world.prepare("voice"))

    # whisper goes; 1884 MiB is still short, and nothing else may go.
    assert [d.victim for d in world.lifecycle.decisions] == ["whisper", None]
    reasons = {c.name: c.reason for c in world.lifecycle.decisions[0].candidates}
    assert reasons["image"] == "not resident"
    assert world.client.urls() == ["9001/admin/load"]
