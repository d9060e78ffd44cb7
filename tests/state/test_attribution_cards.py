"""
Tests for attribution per card: each consumer's processes are measured on every card
read, ``gpu_resident_mib_by_card`` says what it holds on each of its cards, and on
one card the single ``measured_resident_mib`` is what it always was.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mgpumanager.config.parsing import parse_config
from mgpumanager.state.attribution import PidMap, ProcessAttributor
from mgpumanager.state.gpu import GpuReading, GpuSample
from mgpumanager.state.registry import Registry
from tests.builders import consumer
from tests.support import EPOCH

PIDS: PidMap = {
    "ollama": frozenset({100, 101}),
    "comfy": frozenset({200}),
    "wide": frozenset({300}),
}


def config(**top: Any) -> Any:
    return parse_config(
        {
            "consumers": {
                "ollama": consumer(11434, "llm", gpus=[0], vram_resident_mib=6000),
                "comfy": consumer(8188, "image", gpus=[1], vram_resident_mib=9000),
                "wide": consumer(8000, "tts", vram_resident_mib={0: 4000, 1: 2000}),
            },
            **top,
        }
    )


def one_card() -> Any:
    return parse_config(
        {
            "consumers": {
                "ollama": consumer(11434, "llm", vram_resident_mib=6000),
                "comfy": consumer(8188, "image", vram_resident_mib=9000),
                "wide": consumer(8000, "tts", vram_resident_mib=4000),
            }
        }
    )


TWO_CARDS = {"gpus": [{"index": 0}, {"index": 1}]}


def reading(processes: Mapping[int, int], total: int = 24576) -> GpuReading:
    used = sum(processes.values())
    return GpuReading("card", total, used, total - used, MappingProxyType(dict(processes)))


def attributor(registry: Registry) -> ProcessAttributor:
    clock = Clock()
    clock.advance(EPOCH)
    return ProcessAttributor(registry, lambda: PIDS, maybeDeferred, clock)


def test_each_consumer_is_measured_on_each_card() -> None:
    registry = Registry(config(**TWO_CARDS))
    samples = {
        0: GpuSample(time=EPOCH, reading=reading({100: 5000, 101: 600, 300: 3900})),
        1: GpuSample(time=EPOCH, reading=reading({200: 9100, 300: 2100, 999: 700})),
    }

    attributor(registry).on_cards(samples)

    ollama, comfy, wide = registry["ollama"], registry["comfy"], registry["wide"]
    assert ollama.gpu_resident_mib_by_card == {0: 5600}
    assert comfy.gpu_resident_mib_by_card == {1: 9100}
    assert wide.gpu_resident_mib_by_card == {0: 3900, 1: 2100}
    assert dict(wide.measured_by_card or {}) == {0: 3900, 1: 2100}
    # The one number: on the card where it holds most.
    assert (ollama.measured_resident_mib, comfy.measured_resident_mib) == (5600, 9100)
    assert wide.measured_resident_mib == 3900
    assert wide.measured_at == EPOCH
    assert wide.resident  # 3900 >= half of its 4000 on card 0


def test_memory_on_a_card_outside_its_own_is_still_shown() -> None:
    registry = Registry(config(**TWO_CARDS))
    samples = {
        0: GpuSample(time=EPOCH, reading=reading({200: 1200})),
        1: GpuSample(time=EPOCH, reading=reading({200: 9000})),
    }
    attributor(registry).on_cards(samples)
    assert registry["comfy"].gpu_resident_mib_by_card == {1: 9000, 0: 1200}


def test_a_card_that_failed_is_not_measured_and_the_others_are() -> None:
    registry = Registry(config(**TWO_CARDS))
    samples = {
        0: GpuSample(time=EPOCH, err="GPU is lost"),
        1: GpuSample(time=EPOCH, reading=reading({200: 9000, 300: 2000})),
    }
    attributor(registry).on_cards(samples)
    assert registry["comfy"].gpu_resident_mib_by_card == {1: 9000}
    assert registry["wide"].gpu_resident_mib_by_card == {0: 0, 1: 2000}


def test_on_one_card_the_single_number_is_what_it_was() -> None:
    registry = Registry(one_card())
    sample = GpuSample(time=EPOCH, reading=reading({100: 5000, 101: 600, 200: 9000}))

    attributor(registry).on_sample(sample)

    assert registry["ollama"].measured_resident_mib == 5600
    assert registry["comfy"].measured_resident_mib == 9000
    assert registry["wide"].measured_resident_mib == 0
    for state in registry:
        assert state.gpu_resident_mib_by_card == {0: state.gpu_resident_mib}
        assert state.measured_at == EPOCH


def test_without_a_reading_nothing_changes() -> None:
    registry = Registry(config(**TWO_CARDS))
    attributor(registry).on_cards({0: GpuSample(time=EPOCH, err="x"), 1: GpuSample()})
    assert all(state.measured_resident_mib is None for state in registry)


def test_unmeasured_sizes_per_card_are_the_declared_ones_while_resident() -> None:
    registry = Registry(config(**TWO_CARDS))
    wide = registry["wide"]
    wide.believed_loaded = True
    assert wide.gpu_resident_mib_by_card == {0: 4000, 1: 2000}
    wide.believed_loaded = False
    assert wide.gpu_resident_mib_by_card == {0: 0, 1: 0}
    comfy = registry["comfy"]
    comfy.reported_resident_mib = 8500  # one card: its own report, as today
    assert comfy.gpu_resident_mib_by_card == {1: 8500}
