"""
What a reload does to the daemon's knowledge of its consumers: a consumer that
stays the same server keeps what the daemon learnt about it; one that became
another server starts afresh; one removed while its model was on the card
still counts against the budget until the card shows its memory gone.
"""

from __future__ import annotations

from typing import Any

from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.eviction import check_fit, dry_run_plan
from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.registry import Registry

NO_NVML = GpuSample(time=1.0, err="NVML Shared Library Not Found")


def _config(**consumers: dict[str, Any]) -> Config:
    return parse_config({"gpu": {"total_mib": 16384, "reserved_mib": 0},
                         "routing": {"image": "image"}, "consumers": consumers})


def _entry(port: int, mib: int, **extra: Any) -> dict[str, Any]:
    return {"url": f"http://127.0.0.1:{port}", "health": {"path": "/health"},
            "vram_resident_mib": mib, "unload": {"path": "/unload"},
            "load": {"path": "/load"}, **extra}


BEFORE = _config(
    voice=_entry(9001, 3000),
    llm=_entry(9002, 8000),
    image=_entry(9003, 9000, paths={"image": {"path": "/prompt"}}),
)


def test_a_consumer_that_stays_the_same_server_keeps_its_state() -> None:
    registry = Registry(BEFORE)
    voice = registry["voice"]
    voice.total_requests, voice.load_count, voice.peak_resident_mib = 7, 2, 3100
    voice.mark_loaded(False, 10.0)
    after = _config(voice=_entry(9001, 3500, priority=3), llm=_entry(9002, 8000),
                    image=_entry(9003, 9000, paths={"image": {"path": "/prompt"}}))

    removed = registry.replace_consumers(after, lambda name: frozenset())

    assert removed == []
    assert registry["voice"] is voice
    assert (voice.total_requests, voice.load_count, voice.resident) == (7, 2, False)
    assert voice.config.priority == 3 and voice.config.vram_resident_mib == 3500


def test_a_consumer_whose_url_changed_is_another_server() -> None:
    registry = Registry(BEFORE)
    registry["llm"].total_requests = 5
    after = _config(voice=_entry(9001, 3000), llm=_entry(9999, 8000),
                    image=_entry(9003, 9000, paths={"image": {"path": "/prompt"}}))

    registry.replace_consumers(after, lambda name: frozenset())

    assert registry["llm"].total_requests == 0
    assert registry["llm"].config.url == "http://127.0.0.1:9999"


def test_a_removed_resident_consumer_holds_its_memory_in_the_budget() -> None:
    registry = Registry(BEFORE)
    after = _config(voice=_entry(9001, 3000),
                    image=_entry(9003, 9000, paths={"image": {"path": "/prompt"}}))

    removed = registry.replace_consumers(after, lambda name: frozenset({4242}))

    assert removed == ["llm"]
    assert "llm" not in registry
    assert registry.held_elsewhere_mib == 8000
    registry["image"].mark_loaded(False, 1.0)
    resident = [state for state in registry if state.resident]
    # 16384 - 3000 (voice) - 8000 (the holder) = 5384 < 9000: the holder counts.
    fit = check_fit(after, after.consumers["image"], NO_NVML, resident, 9000,
                    registry.held_elsewhere_mib)
    assert not fit.fits and fit.available_mib == 5384
    plan = dry_run_plan(after, registry, "image", NO_NVML)
    assert plan.would_evict == ("voice",)


def test_a_holder_is_released_when_the_card_shows_its_processes_empty() -> None:
    registry = Registry(BEFORE)
    after = _config(voice=_entry(9001, 3000),
                    image=_entry(9003, 9000, paths={"image": {"path": "/prompt"}}))
    registry.replace_consumers(after, lambda name: frozenset({4242}))

    assert registry.release_holders({4242: 7900}) == []
    assert registry.release_holders({4242: 100}) == ["llm"]
    assert registry.held_elsewhere_mib == 0


def test_a_removed_consumer_that_was_not_loaded_holds_nothing() -> None:
    registry = Registry(BEFORE)
    registry["llm"].mark_loaded(False, 1.0)
    after = _config(voice=_entry(9001, 3000),
                    image=_entry(9003, 9000, paths={"image": {"path": "/prompt"}}))

    registry.replace_consumers(after, lambda name: frozenset())

    assert registry.holders == {}
