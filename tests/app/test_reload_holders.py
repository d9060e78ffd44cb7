"""
A consumer a reload removed while resident: status shows the memory it still
holds, and the GPU sampler's subscriber forgets it once the card shows its
processes holding (almost) nothing; or, when its processes were never known,
once the card's used memory dropped by 75 % of its size, or the verify timeout
passed.  Status names the rule that let it go.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from mgpumanager.app.reloading import holder_release
from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.simulate.card import SimulatedCard
from mgpumanager.simulate.nvml import SimulatedNvml
from mgpumanager.state.gpu import GpuReading, GpuSample, GpuSampler
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import holders_status, released_holders_status


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


# A removed consumer whose processes were never attributed: only the card's
# used memory, read through NVML (here the simulated card), can show it gone.

EPOCH = 1_800_000_000.0


class _Host:
    """A card with llm's 8000 MiB on it, sampled with a Clock, and llm removed by a reload."""

    def __init__(self, sample_first: bool = True) -> None:
        self.card = SimulatedCard(16384)
        self.card.allocate("llm", 8000)
        self.card.allocate("voice", 3000)
        self.clock = Clock()
        self.clock.advance(EPOCH)
        nvml = SimulatedNvml(self.card)
        self.sampler = GpuSampler(
            load_nvml=lambda: nvml, run_blocking=_now, clock=self.clock, interval=1.0,
            timeout=1.0,
        )
        self.registry = Registry(_with_timeout(voice=_entry(9001, 3000), llm=_entry(9002, 8000)))
        self.sampler.subscribe(holder_release(self.registry))
        if sample_first:
            self.sampler.sample()
        latest = self.sampler.latest
        # What the reload does: the card's used memory then is the baseline.
        self.registry.replace_consumers(
            _with_timeout(voice=_entry(9001, 3000)),
            lambda name: frozenset(),
            now=self.sampler.now(),
            card_used_mib=None if latest.reading is None else latest.reading.used_mib,
        )

    def sample_after(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sampler.sample()


def _now(call: Any) -> Deferred[GpuReading]:
    return maybeDeferred(call)


def _with_timeout(**consumers: dict[str, Any]) -> Config:
    return parse_config({"gpu": {"total_mib": 16384}, "consumers": consumers,
                         "lifecycle": {"verify_timeout_seconds": 10}})


def test_a_holder_without_processes_leaves_once_the_card_dropped_by_75_percent() -> None:
    host = _Host()
    assert host.registry.held_elsewhere_mib == 8000

    host.card.release("llm")
    host.card.allocate("desktop", 1900)  # net drop 6100 MiB >= 75 % of 8000
    host.sample_after(1.0)

    assert host.registry.holders == {}
    assert host.registry.held_elsewhere_mib == 0
    [released] = released_holders_status(host.registry)
    assert released["name"] == "llm" and released["size_mib"] == 8000
    assert released["rule"] == "card_dropped"


def test_a_drop_short_of_75_percent_keeps_it_until_the_verify_timeout() -> None:
    warnings: list[str] = []

    def record(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    observe = cast(ILogObserver, record)
    globalLogPublisher.addObserver(observe)
    try:
        host = _Host()
        host.card.release("llm")
        host.card.allocate("desktop", 2100)  # net drop 5900 MiB < 6000
        host.sample_after(1.0)
        assert holders_status(host.registry) == [{"name": "llm", "size_mib": 8000}]
        host.sample_after(8.5)  # 9.5 s since the removal
        assert host.registry.held_elsewhere_mib == 8000

        host.sample_after(0.5)
    finally:
        globalLogPublisher.removeObserver(observe)

    assert host.registry.holders == {}
    assert [r["rule"] for r in released_holders_status(host.registry)] == ["verify_timeout"]
    assert any("llm" in line and "never showed" in line for line in warnings), warnings


def test_without_a_reading_at_the_removal_the_first_reading_since_is_the_baseline() -> None:
    host = _Host(sample_first=False)
    [holder] = host.registry.holders.values()
    assert holder.card_used_mib is None

    host.sample_after(1.0)  # llm still on the card: 11000 used, the baseline
    assert host.registry.holders["llm"].card_used_mib == 11000
    host.card.release("llm")
    host.sample_after(1.0)

    assert [r["rule"] for r in released_holders_status(host.registry)] == ["card_dropped"]


def test_a_holder_with_processes_keeps_the_processes_rule_and_no_timeout() -> None:
    registry = Registry(_with_timeout(voice=_entry(9001, 3000), llm=_entry(9002, 8000)))
    registry.replace_consumers(_with_timeout(voice=_entry(9001, 3000)),
                         lambda name: frozenset({4242}), now=EPOCH, card_used_mib=11000)
    on_sample = holder_release(registry)
    # The card fell a lot, but llm's own process still holds its memory.
    on_sample(GpuSample(time=EPOCH + 60, reading=GpuReading("card", 16384, 8000, 8384,
                                                            {4242: 8000})))
    assert registry.held_elsewhere_mib == 8000
    on_sample(_sample({4242: 0}))
    assert [r["rule"] for r in released_holders_status(registry)] == ["processes_gone"]
