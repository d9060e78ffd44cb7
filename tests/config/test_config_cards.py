"""
Tests for the keys of several cards: ``gpus`` (each entry by index or uuid, inheriting
``gpu:``), the guest keys of ``gpu:``, ``consumers.<n>.gpus`` and a per-card
``vram_resident_mib``; without ``gpus``, card 0 alone with ``gpu:``'s settings.
"""

from __future__ import annotations

from typing import Any

import pytest

from mgpumanager.config.cards import CardConfig, GpuConfig
from mgpumanager.config.document import Config, ConfigError, ConsumerConfig
from mgpumanager.config.parsing import parse_config
from tests.builders import consumer


def document(**top: Any) -> dict[str, Any]:
    """Two consumers: ollama (llm), comfy (image)."""
    return {
        "consumers": {"ollama": consumer(11434, "llm"), "comfy": consumer(8188, "image")},
        **top,
    }


def two_cards(**comfy: Any) -> dict[str, Any]:
    doc = document(gpus=[{"index": 0}, {"index": 1}])
    doc["consumers"]["comfy"].update(comfy)
    return doc


def assert_error(doc: object, key_path: str, *hints: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="x.yaml")
    assert info.value.key_path == key_path
    assert str(info.value).startswith(f"x.yaml: {key_path}: ")
    for hint in hints:
        assert hint in info.value.problem


def test_without_gpus_card_0_is_managed_with_the_settings_of_gpu() -> None:
    config = parse_config(document(gpu={"total_mib": 24576, "reserved_mib": 512}))
    assert config.cards == (
        CardConfig(index=0, settings=GpuConfig(total_mib=24576, reserved_mib=512)),
    )
    assert config.card_indexes == (0,)
    assert config.cards[0].nvml_index == 0
    comfy = config.consumers["comfy"]
    assert comfy.cards == (0,)
    assert comfy.vram_resident_mib == 0


def test_a_config_without_gpu_has_one_default_card() -> None:
    config = parse_config(document())
    assert config.gpu == GpuConfig()
    assert config.cards == (CardConfig(index=0, settings=GpuConfig()),)


def test_one_card_sizes_mean_what_they_meant() -> None:
    config = parse_config(document(gpu={"reserved_mib": 0}))
    doc = document()
    doc["consumers"]["comfy"]["vram_resident_mib"] = 9000
    comfy = parse_config(doc).consumers["comfy"]
    assert comfy.vram_resident_mib == 9000
    assert comfy.vram_mib_on(0) == 9000
    assert comfy.vram_mib_on(1) == 0
    assert config.card(0).settings.reserved_mib == 0


def test_the_guest_keys_have_their_defaults_and_are_read() -> None:
    assert GpuConfig().guest_headroom_mib == 0
    assert GpuConfig().yield_to_guests_mib == 0
    assert GpuConfig().yield_cooldown_seconds == 30.0
    gpu = {"guest_headroom_mib": 4096, "yield_to_guests_mib": 2048, "yield_cooldown_seconds": 5}
    settings = parse_config(document(gpu=gpu)).cards[0].settings
    assert (settings.guest_headroom_mib, settings.yield_to_guests_mib) == (4096, 2048)
    assert settings.yield_cooldown_seconds == 5.0


@pytest.mark.parametrize(
    ("gpu", "key_path"),
    [
        ({"guest_headroom_mib": -1}, "gpu.guest_headroom_mib"),
        ({"yield_to_guests_mib": "lots"}, "gpu.yield_to_guests_mib"),
        ({"yield_cooldown_seconds": 0}, "gpu.yield_cooldown_seconds"),
    ],
)
def test_bad_guest_keys_are_named(gpu: dict[str, Any], key_path: str) -> None:
    assert_error(document(gpu=gpu), key_path)


def test_each_card_inherits_gpu_unless_it_sets_a_key() -> None:
    config = parse_config(
        document(
            gpu={"reserved_mib": 1024, "poll_interval_seconds": 1, "guest_headroom_mib": 2000},
            gpus=[{"index": 0}, {"index": 1, "reserved_mib": 512, "total_mib": 24576}],
        )
    )
    first, second = config.cards
    assert first == CardConfig(
        index=0,
        settings=GpuConfig(reserved_mib=1024, poll_interval_seconds=1.0, guest_headroom_mib=2000),
    )
    assert second.index == 1
    assert second.settings == GpuConfig(
        total_mib=24576, reserved_mib=512, poll_interval_seconds=1.0, guest_headroom_mib=2000
    )
    assert config.card(1) is second
    with pytest.raises(KeyError):
        config.card(2)


def test_a_consumer_without_gpus_uses_every_card() -> None:
    config = parse_config(two_cards(vram_resident_mib=9000))
    comfy = config.consumers["comfy"]
    assert comfy.cards == (0, 1)
    assert (comfy.vram_mib_on(0), comfy.vram_mib_on(1)) == (9000, 9000)
    assert comfy.vram_resident_mib == 9000


def test_a_consumer_pinned_to_a_card_uses_it_alone() -> None:
    comfy = parse_config(two_cards(gpus=[1], vram_resident_mib=9000)).consumers["comfy"]
    assert comfy.cards == (1,)
    assert (comfy.vram_mib_on(0), comfy.vram_mib_on(1)) == (0, 9000)


def test_sizes_per_card_as_a_map() -> None:
    comfy = parse_config(two_cards(vram_resident_mib={0: 20000, 1: 18000})).consumers["comfy"]
    assert (comfy.vram_mib_on(0), comfy.vram_mib_on(1)) == (20000, 18000)
    # The one number the one-card scheduler reads: the most on any card.
    assert comfy.vram_resident_mib == 20000


def test_a_card_left_out_of_the_map_is_unknown() -> None:
    comfy = parse_config(two_cards(vram_resident_mib={"1": 18000})).consumers["comfy"]
    assert (comfy.vram_mib_on(0), comfy.vram_mib_on(1)) == (0, 18000)


def test_a_card_named_by_uuid_is_known_by_its_place() -> None:
    uuid = "GPU-5c6a8f3e-1f2b-4c3d-9e8f-0a1b2c3d4e5f"
    config = parse_config(document(gpus=[{"index": 0}, {"uuid": uuid}]))
    assert config.cards[1] == CardConfig(index=1, uuid=uuid, settings=GpuConfig())
    assert config.cards[1].nvml_index is None


@pytest.mark.parametrize(
    ("gpus", "key_path", "hint"),
    [
        ([], "gpus", "list of cards"),
        ({"index": 0}, "gpus", "list of cards"),
        ([{}], "gpus[0]", "exactly one of index"),
        ([{"index": 0, "uuid": "GPU-1"}], "gpus[0]", "exactly one of index"),
        ([{"index": -1}], "gpus[0].index", "negative"),
        ([{"index": "0"}], "gpus[0].index", "whole number"),
        ([{"index": 0}, {"index": 0}], "gpus[1].index", "card 0 is already gpus[0]"),
        ([{"uuid": "GPU-a"}, {"uuid": "GPU-a"}], "gpus[1].uuid", "uuid GPU-a is already"),
        ([{"uuid": "GPU-a"}, {"index": 0}], "gpus[1].index", "card 0 is already gpus[0]"),
        ([{"index": 1}, {"uuid": "GPU-a"}], "gpus[1].uuid", "known by its place"),
        ([{"uuid": "nvidia0"}], "gpus[0].uuid", "GPU-"),
        ([{"index": 0, "reserved_mb": 1}], "gpus[0].reserved_mb", "did you mean 'reserved_mib'"),
        ([{"index": 0, "reserved_mib": -5}], "gpus[0].reserved_mib", "negative"),
    ],
)
def test_bad_cards_are_named(gpus: object, key_path: str, hint: str) -> None:
    assert_error(document(gpus=gpus), key_path, hint)


@pytest.mark.parametrize(
    ("comfy", "key_path", "hint"),
    [
        ({"gpus": [2]}, "consumers.comfy.gpus[0]", "unknown card 2; the managed cards are 0, 1"),
        ({"gpus": [1, 1]}, "consumers.comfy.gpus[1]", "listed twice"),
        ({"gpus": []}, "consumers.comfy.gpus", "every managed card"),
        ({"gpus": 1}, "consumers.comfy.gpus", "list of card indexes"),
        ({"gpus": ["one"]}, "consumers.comfy.gpus[0]", "whole number"),
        (
            {"gpus": [1], "vram_resident_mib": {0: 9000}},
            "consumers.comfy.vram_resident_mib.0",
            "not one of this consumer's cards (1)",
        ),
        ({"vram_resident_mib": {"first": 1}}, "consumers.comfy.vram_resident_mib.first", "card"),
        ({"vram_resident_mib": {1: -1}}, "consumers.comfy.vram_resident_mib.1", "negative"),
        ({"vram_resident_mib": "9 GiB"}, "consumers.comfy.vram_resident_mib", "MiB"),
        ({"gpu": [1]}, "consumers.comfy.gpu", "did you mean 'gpus'"),
    ],
)
def test_bad_consumer_cards_are_named(comfy: dict[str, Any], key_path: str, hint: str) -> None:
    assert_error(two_cards(**comfy), key_path, hint)


def test_a_consumer_on_an_unmanaged_card_of_a_one_card_config() -> None:
    doc = document()
    doc["consumers"]["comfy"]["gpus"] = [1]
    assert_error(doc, "consumers.comfy.gpus[0]", "unknown card 1; the managed cards are 0")


def test_a_config_built_by_hand_cannot_name_an_unmanaged_card() -> None:
    comfy = ConsumerConfig(name="comfy", url="http://127.0.0.1:8188", health=None, paths={},
                           cards=(1,))
    with pytest.raises(ValueError, match="unknown card 1"):
        Config(source="x", consumers={"comfy": comfy})
