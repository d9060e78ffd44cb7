"""
A consumer a reload removed while resident: status shows the memory it still
holds, and the GPU sampler's subscriber forgets it once the card shows its
processes holding (almost) nothing.
"""

from __future__ import annotations

from typing import Any

from mgpumanager.app.reloading import holder_release
from mgpumanager.config.document import Config, parse_config
from mgpumanager.state.gpu import GpuReading, GpuSample
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import holders_status


def _config(**consumers: dict[str, Any]) -> Config:
    return parse_config({"gpu": {"total_mib": 16384}, "consumers": consumers})


def _entry(port: int, mib: int) -> dict[str, Any]:
    return {"url": f"http://127.0.0.1:{port}", "health": {"path": "/health"},
            "vram_resident_mib": mib, "unload": {"path": "/unload"}, "load": {"path": "/load"}}


def _sample(processes: dict[int, int]) -> GpuSample:
    used = sum(processes.values())
    return GpuSample(time=5.0, reading=GpuReading("card", 16384, used, 16384 - used, processes))


def test_a_removed_consumers_memory_shows_in_status_until_the_card_shows_it_gone() -> None:
    registry = Registry(_config(voice=_entry(9001, 3000), llm=_entry(9002, 8000)))
    registry.replace_consumers(_config(voice=_entry(9001, 3000)),
                               lambda name: frozenset({4242}) if name == "llm" else frozenset())
    on_sample = holder_release(registry)
    assert holders_status(registry) == [{"name": "llm", "size_mib": 8000}]

    on_sample(_sample({4242: 7800}))
    on_sample(GpuSample(time=6.0, err="NVML read timed out"))
    assert holders_status(registry) == [{"name": "llm", "size_mib": 8000}]

    on_sample(_sample({4242: 0, 5555: 3000}))
    assert holders_status(registry) == []
    assert registry.held_elsewhere_mib == 0
