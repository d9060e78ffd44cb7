"""
A consumer's size, as a victim and as a target, is the largest of what it
declares, what it holds now and the most it ever held; and a server busy with
work sent around the daemon is the last victim chosen.
"""

from __future__ import annotations

from mgpumanager.scheduling.eviction import rank_candidates, why_no_room_needed
from mgpumanager.state.registry import Registry
from tests.adapter_fakes import registry_of


def two() -> Registry:
    return registry_of(
        {
            "ollama": {"url": "http://127.0.0.1:1", "adapter": "ollama"},
            "comfyui": {
                "url": "http://127.0.0.1:2",
                "adapter": "comfyui",
                "vram_resident_mib": 9000,
            },
            "voice": {
                "url": "http://127.0.0.1:3",
                "health": {"path": "/h"},
                "paths": {"tts": {"path": "/tts"}},
                "vram_resident_mib": 2000,
                "unload": {"path": "/unload"},
                "load": {"path": "/load"},
            },
        }
    )


def test_size_is_the_largest_of_declared_measured_and_peak() -> None:
    registry = two()
    comfy = registry["comfyui"]
    assert comfy.size_mib == 9000
    comfy.reported_resident_mib = 9500
    comfy.note_resident_mib(9500)
    assert comfy.size_mib == 9500
    comfy.reported_resident_mib = 100
    assert comfy.size_mib == 9500  # the peak stays
    comfy.measured_resident_mib = 11000
    assert comfy.size_mib == 11000


def test_a_consumer_declaring_nothing_gets_room_made_once_it_was_measured() -> None:
    ollama = two()["ollama"]
    ollama.believed_loaded = False
    assert why_no_room_needed(ollama) == "target declares no VRAM size"
    ollama.note_resident_mib(6000)
    assert why_no_room_needed(ollama) is None
    assert ollama.size_mib == 6000


def test_a_server_busy_with_foreign_work_is_the_last_resort() -> None:
    registry = two()
    for state in registry:
        state.believed_loaded = True
        state.reported_loaded = True
    registry["comfyui"].busy_elsewhere = True
    ranked = rank_candidates(registry.config, "ollama", list(registry))
    assert [c.name for c in ranked if c.eligible] == ["voice", "comfyui"]
    registry["comfyui"].busy_elsewhere = False
    ranked = rank_candidates(registry.config, "ollama", list(registry))
    assert [c.name for c in ranked if c.eligible] == ["comfyui", "voice"]  # name order
