"""
Making room per card, in the dry run and in the real loop alike: the fit on
each of the target's cards is that card's free memory (or its budget), the
victims are consumers on that card only, and unloading a consumer that uses
two cards frees both, so room made on one card counts on the other.
"""

from __future__ import annotations

from typing import Any

from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.eviction import dry_run_plan
from mgpumanager.state.registry import Registry
from tests.builders import consumer
from tests.scheduling.test_plan_agreement import FakeCard, build_registry, run_real_loop
from tests.support import EPOCH


def two_cards(**consumers: dict[str, Any]) -> Any:
    return parse_config({
        "gpu": {"total_mib": 24576, "reserved_mib": 0},
        "gpus": [{"index": 0}, {"index": 1}],
        "consumers": consumers,
    })


def loaded(config: Any, *names: str, used: dict[str, float] | None = None) -> dict[str, Any]:
    """Registry states: ``names`` resident, last used in the order given (first = oldest)."""
    return {
        name: {
            "believed_loaded": name in names,
            "reported_loaded": None,
            "last_used": (used or {}).get(name, float(names.index(name)) if name in names
                                          else None),
        }
        for name in config.consumers
    }


CONFIG = two_cards(
    target=consumer(9001, "image", gpus=[0, 1], vram_resident_mib=6000),
    both=consumer(9002, "llm", gpus=[0, 1], vram_resident_mib=8000,
                  unload={"path": "/unload"}),
    card1=consumer(9003, "tts", gpus=[1], vram_resident_mib=8000, unload={"path": "/unload"}),
    card0=consumer(9004, "stt", gpus=[0], vram_resident_mib=8000, unload={"path": "/unload"}),
)


def test_room_made_on_one_card_by_a_two_card_victim_counts_on_the_other() -> None:
    states = loaded(CONFIG, "both", "card1")
    free = {0: 1000, 1: 1000}
    plan = dry_run_plan(CONFIG, build_registry(CONFIG, states), "target",
                        FakeCard(CONFIG, free).samples())
    assert plan.would_evict == ("both",)
    assert [step.card for step in plan.steps] == [0, 0, 1]
    assert run_real_loop(CONFIG, build_registry(CONFIG, states), "target", free) == ["both"]


def test_a_victim_is_only_ever_a_consumer_on_the_card_being_made_room_on() -> None:
    config = two_cards(
        target=consumer(9001, "image", gpus=[1], vram_resident_mib=6000),
        card0=consumer(9004, "stt", gpus=[0], vram_resident_mib=8000,
                       unload={"path": "/unload"}),
        card1=consumer(9003, "tts", gpus=[1], vram_resident_mib=8000,
                       unload={"path": "/unload"}),
    )
    # card0 is the least recently used, but it is on the other card.
    states = loaded(config, "card0", "card1")
    free = {0: 0, 1: 1000}
    plan = dry_run_plan(config, build_registry(config, states), "target",
                        FakeCard(config, free).samples())
    assert plan.would_evict == ("card1",)
    reasons = {c.name: c.reason for c in plan.steps[0].candidates}
    assert reasons["card0"] == "not on card 1"
    assert run_real_loop(config, build_registry(config, states), "target", free) == ["card1"]


def test_without_nvml_each_card_has_its_own_budget() -> None:
    config = parse_config({
        "gpu": {"reserved_mib": 0},
        "gpus": [{"index": 0, "total_mib": 10000}, {"index": 1, "total_mib": 24000}],
        "consumers": {
            "target": consumer(9001, "image", gpus=[0, 1], vram_resident_mib=6000),
            "card1": consumer(9003, "tts", gpus=[1], vram_resident_mib=8000,
                              unload={"path": "/unload"}),
            "card0": consumer(9004, "stt", gpus=[0], vram_resident_mib=8000,
                              unload={"path": "/unload"}),
        },
    })
    states = loaded(config, "card0", "card1")
    registry = build_registry(config, states)
    plan = dry_run_plan(config, registry, "target", FakeCard(config, None).samples())
    # Card 0: 10000 - 8000 < 6000, so card0 goes; card 1: 24000 - 8000 is room enough.
    assert plan.would_evict == ("card0",)
    assert [step.fit.available_mib for step in plan.steps] == [2000, 10000, 16000]


def test_a_two_card_consumer_takes_its_size_on_each_card() -> None:
    config = two_cards(
        split=consumer(9002, "llm", gpus=[0, 1], vram_resident_mib={0: 20000, 1: 4000}),
    )
    state = Registry(config)["split"]
    assert (state.size_on(0), state.size_on(1)) == (20000, 4000)
    state.last_used = EPOCH
    assert state.size_on(2) == 0
