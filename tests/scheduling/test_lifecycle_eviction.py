"""
The lifecycle making room for a job (:mod:`mgpumanager.scheduling.lifecycle`):
which residents it unloads and in what order (least recently used first,
coexisting ones never, at most five), how it unloads each (its route or its
systemd unit), and how it decides without NVML (the budget, a fixed settle).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from tests.lifecycle_world import (
    COEXIST,
    CONSUMERS,
    SMALL,
    SYSTEMCTL,
    World,
    config_of,
    voice_world,
)
from tests.support import EPOCH, assert_no_result, success_result_of


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


def test_evicts_least_recently_used_first_until_the_target_fits() -> None:
    # 16384 - voice 3000 - llm 1000 - whisper 1500 - embed 500 - 1000 other = 9384 free;
    # image needs 13000 + 256.  voice goes first (older), then whisper: 13884 free.
    world = World(other_mib=1000)
    world.registry["voice"].last_used = EPOCH - 50
    world.registry["whisper"].last_used = EPOCH - 10

    success_result_of(world.prepare("image"))

    assert world.client.urls() == ["9001/admin/unload"]
    assert world.commands.calls == [([*SYSTEMCTL, "stop", "whisper.service"], 30.0)]
    assert world.resident() == {"llm", "embed", "image"}
    assert world.lifecycle.evictions == 2
    assert world.lifecycle.loads == 1  # image cold-starts: no route, no unit
    assert (world.registry["voice"].unload_count, world.registry["whisper"].unload_count) == (
        1,
        1,
    )
    assert world.registry["image"].load_count == 1
    decisions = list(world.lifecycle.decisions)
    assert [d.victim for d in decisions] == ["voice", "whisper"]
    assert [d.outcome for d in decisions] == ["unloaded", "unloaded"]
    assert [d.fit.available_mib for d in decisions] == [9384, 12384]
    assert [d.recovered_mib for d in decisions] == [3000, 1500]
    assert all(d.fit.basis == "nvml" and d.fit.needed_mib == 13256 for d in decisions)


def test_never_used_counts_as_oldest_and_equal_use_is_broken_by_name() -> None:
    world = World(SMALL, other_mib=1500, loaded={f"s{i}": True for i in range(1, 7)})
    # big: 7000 + 256 needed; 8192 - 6000 - 1500 = 692 free.
    world.registry["big"].believed_loaded = False
    world.card.held.pop("big")
    world.registry["s1"].last_used = EPOCH - 5
    world.registry["s2"].last_used = EPOCH - 5
    world.registry["s3"].last_used = None
    world.registry["s4"].last_used = EPOCH - 60
    world.registry["s5"].last_used = EPOCH - 1
    world.registry["s6"].last_used = EPOCH - 5

    success_result_of(world.prepare("big"))

    # At most five evictions: s5 (the most recent) stays.
    assert [d.victim for d in world.lifecycle.decisions] == ["s3", "s4", "s1", "s2", "s6", None]


def test_the_unload_route_gets_its_method_body_and_content_type() -> None:
    world = voice_world()

    success_result_of(world.prepare("voice"))

    unload, load = world.client.calls
    assert (unload.method, unload.data) == ("POST", b'{"unload_models":true}')
    assert unload.headers == {"Content-Type": ["application/json"]}
    assert unload.allow_redirects is False
    assert (load.method, load.url, load.data, load.headers) == (
        "POST",
        "http://127.0.0.1:9001/admin/load",
        None,
        None,
    )
    assert world.resident() >= {"voice", "whisper"}
    assert "image" not in world.resident()


def test_coexisting_residents_stay_whichever_side_lists_the_other() -> None:
    # 18432 - whisper 1500 - voice 3000 - other 2000 = 11932 free; image needs 13256.
    world = World(COEXIST, loaded={"image": False, "other": True, "voice": True})
    world.card.held.pop("image", None)

    success_result_of(world.prepare("image"))

    (decision,) = world.lifecycle.decisions
    assert decision.victim == "other"
    reasons = {c.name: c.reason for c in decision.candidates}
    assert reasons["whisper"] == "may coexist with image"  # image lists whisper
    assert reasons["voice"] == "may coexist with image"  # voice lists image
    assert world.resident() == {"image", "whisper", "voice"}
    assert world.client.urls() == ["9007/free", "9003/load"]


def test_a_systemd_victim_is_stopped_and_verified() -> None:
    world = World(loaded={"voice": False}, other_mib=10500)

    success_result_of(world.prepare("voice"))

    assert world.commands.calls == [([*SYSTEMCTL, "stop", "whisper.service"], 30.0)]
    assert world.client.urls() == ["9001/admin/load"]
    assert world.lifecycle.decisions[0].recovered_mib == 1500
    assert "whisper" not in world.resident()
    assert world.registry["whisper"].restartable


@pytest.mark.parametrize("settle", [1.0, 2.5])
def test_without_nvml_the_budget_decides_and_a_fixed_settle_replaces_verification(
    settle: float,
) -> None:
    # Budget 15360 - voice 3000 - whisper 1500 - embed 500 = 10360 < 13000; without voice
    # 13360 fits.
    world = World(config_of(CONSUMERS, settle_seconds=settle))
    world.card.available = False
    world.registry["voice"].last_used = EPOCH - 50
    world.registry["whisper"].last_used = EPOCH - 10

    d = world.prepare("image")
    world.advance(settle - 0.25)
    assert_no_result(d)
    world.advance(0.25)
    success_result_of(d)

    (decision,) = world.lifecycle.decisions
    assert decision.victim == "voice"
    assert decision.fit.basis == "budget"
    assert (decision.fit.needed_mib, decision.fit.available_mib) == (13000, 10360)
    assert decision.outcome == "unloaded (settled, no NVML)"
    assert decision.recovery_ms == round(settle * 1000)
    assert decision.recovered_mib is None
    assert world.resident() == {"llm", "whisper", "embed", "image"}


def test_without_nvml_or_card_size_every_blocking_resident_is_evicted() -> None:
    world = World(config_of(CONSUMERS, gpu={}))
    world.card.available = False

    d = world.run("image", limit=10)

    success_result_of(d)
    # embed has no way to be unloaded: the warning case, and the job proceeds.
    assert [d.victim for d in world.lifecycle.decisions] == ["voice", "whisper", None]
    assert world.lifecycle.decisions[-1].fit.available_mib is None
    assert world.resident() == {"llm", "embed", "image"}


def test_with_nothing_evictable_the_job_proceeds_and_the_decision_says_so(
    warnings_logged: list[str],
) -> None:
    world = World(loaded={"voice": False, "whisper": False}, other_mib=13000)

    success_result_of(world.prepare("voice"))

    (decision,) = world.lifecycle.decisions
    assert (decision.victim, decision.outcome) == (None, "nothing can be evicted; proceeding")
    assert decision.fit.fits is False
    assert {c.name: c.reason for c in decision.candidates} == {
        "embed": "no unload route or systemd unit",
        "image": "not resident",
        "llm": "manages its own VRAM",
        "ocr": "not resident",
        "whisper": "not resident",
    }
    assert world.client.urls() == ["9001/admin/load"]
    assert world.lifecycle.evictions == 0
    assert "voice" in world.resident()
    assert any("nothing can be evicted; proceeding" in line for line in warnings_logged)


def test_at_most_five_evictions_per_job_then_it_proceeds(warnings_logged: list[str]) -> None:
    world = World(SMALL, other_mib=1500, loaded={f"s{i}": True for i in range(1, 7)})
    world.registry["big"].believed_loaded = False
    world.card.held.pop("big")
    for i in range(1, 7):
        world.registry[f"s{i}"].last_used = EPOCH - 100 + i

    success_result_of(world.prepare("big"))

    decisions = list(world.lifecycle.decisions)
    assert [d.victim for d in decisions] == ["s1", "s2", "s3", "s4", "s5", None]
    assert decisions[-1].outcome == "still short after 5 evictions; proceeding"
    assert decisions[-1].fit.available_mib == 5692
    assert world.lifecycle.evictions == 5
    assert world.resident() == {"s6", "big"}
    assert world.client.urls() == [*(f"{9100 + i}/u" for i in range(1, 6)), "9100/load"]
    assert any("still short after 5 evictions" in line for line in warnings_logged)
