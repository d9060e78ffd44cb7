"""
Tests for the sampler on several cards: every managed card read in one read, by NVML
index or uuid, each with its uuid and processes; ``latest`` and ``sample()`` stay the
first managed card's; a card that fails alone is that card's error; the cards NVML
lists beyond the managed ones are counted and logged once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mgpumanager.config.cards import CardConfig
from mgpumanager.simulate.card import SimulatedCard
from mgpumanager.simulate.nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    DeviceHandle,
    SimulatedNvml,
    SimulatedNvmlError,
)
from mgpumanager.state.gpu import GpuSample, GpuSampler
from mgpumanager.state.reading import CardsReading, read_cards
from tests.support import EPOCH, success_result_of


def device(uuid: str, total_mib: int, processes: dict[int, int]) -> SimulatedCard:
    """A card whose processes (pid: MiB) hold all of its used memory."""
    card = SimulatedCard(total_mib, name="NVIDIA GeForce RTX 3090", uuid=uuid)
    for pid, mib in processes.items():
        card.register(f"process {pid}", pid)
        card.allocate(f"process {pid}", mib)
    return card


class Cards(SimulatedNvml):
    """:mod:`mgpumanager.simulate.nvml` over several cards, counting its inits."""

    def __init__(self, *devices: SimulatedCard) -> None:
        super().__init__(devices)
        self.devices = devices
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        super().nvmlInit()

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> DeviceHandle:
        try:
            return super().nvmlDeviceGetHandleByUUID(uuid)
        except SimulatedNvmlError as error:
            # As the real library says it: the code alone, not the simulation's detail.
            raise SimulatedNvmlError(error.value) from None


UUID_0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
UUID_1 = "GPU-11111111-aaaa-bbbb-cccc-111111111111"
UUID_2 = "GPU-22222222-aaaa-bbbb-cccc-222222222222"


@pytest.fixture
def nvml() -> Cards:
    return Cards(
        device(UUID_0, 24576, {100: 6000}),
        device(UUID_1, 24576, {200: 9000, 300: 500}),
    )


@pytest.fixture
def capture_log() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _sync(call: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(call)


def sampler_for(
    nvml: Any, cards: tuple[CardConfig, ...], run_blocking: Any = _sync
) -> GpuSampler:
    clock = Clock()
    clock.advance(EPOCH)
    return GpuSampler(
        load_nvml=lambda: nvml,
        run_blocking=run_blocking,
        clock=clock,
        interval=2.0,
        timeout=5.0,
        cards=cards,
    )


TWO = (CardConfig(index=0), CardConfig(index=1))


def test_every_card_is_read_in_one_read(nvml: Cards) -> None:
    sampler = sampler_for(nvml, TWO)

    samples = success_result_of(sampler.sample_cards())

    assert list(samples) == [0, 1]
    first, second = samples[0].reading, samples[1].reading
    assert first is not None and second is not None
    assert (first.uuid, first.used_mib, dict(first.processes)) == (UUID_0, 6000, {100: 6000})
    assert (second.uuid, second.free_mib) == (UUID_1, 24576 - 9500)
    assert dict(second.processes) == {200: 9000, 300: 500}
    assert second.name == "NVIDIA GeForce RTX 3090"
    assert samples[1].time == EPOCH
    assert nvml.inits == 1
    assert sampler.latest is samples[0]
    assert sampler.latest_by_card == samples


def test_latest_and_sample_are_the_first_managed_card(nvml: Cards) -> None:
    sampler = sampler_for(nvml, (CardConfig(index=1), CardConfig(index=0)))

    sample = success_result_of(sampler.sample())

    assert sample.reading is not None and sample.reading.uuid == UUID_1
    assert sampler.latest is sample
    assert list(sampler.latest_by_card) == [1, 0]


def test_a_card_named_by_uuid_is_found_by_it(nvml: Cards) -> None:
    cards = (CardConfig(index=0, uuid=UUID_1), CardConfig(index=1, uuid=UUID_0))
    sampler = sampler_for(nvml, cards)

    samples = success_result_of(sampler.sample_cards())

    assert samples[0].reading is not None and samples[0].reading.used_mib == 9500
    assert samples[1].reading is not None and dict(samples[1].reading.processes) == {100: 6000}


def test_a_card_that_fails_alone_is_that_cards_error(nvml: Cards) -> None:
    sampler = sampler_for(nvml, (CardConfig(index=0), CardConfig(index=1, uuid=UUID_2)))

    samples = success_result_of(sampler.sample_cards())

    assert samples[0].reading is not None and samples[0].err == ""
    assert samples[1] == GpuSample(time=EPOCH, err="Not Found")


def test_a_failed_init_is_every_cards_error(nvml: Cards) -> None:
    def broken() -> None:
        raise SimulatedNvmlError(NVML_ERROR_DRIVER_NOT_LOADED)

    nvml.nvmlInit = broken  # type: ignore[method-assign]
    sampler = sampler_for(nvml, TWO)

    samples = success_result_of(sampler.sample_cards())

    assert [s.err for s in samples.values()] == ["Driver Not Loaded"] * 2


def test_a_hung_read_times_out_on_every_card(nvml: Cards) -> None:
    clock = Clock()
    sampler = GpuSampler(
        load_nvml=lambda: nvml, run_blocking=lambda call: Deferred(), clock=clock,
        interval=2.0, timeout=5.0, cards=TWO,
    )
    waiting = sampler.sample_cards()
    clock.advance(5)
    samples = success_result_of(waiting)
    assert all("timed out" in s.err for s in samples.values())


def test_subscribers_get_the_first_card_or_every_card(nvml: Cards) -> None:
    sampler = sampler_for(nvml, TWO)
    seen: list[object] = []
    sampler.subscribe(seen.append)
    sampler.subscribe_cards(lambda samples: seen.append(dict(samples)))

    success_result_of(sampler.sample())

    assert seen == [sampler.latest, dict(sampler.latest_by_card)]


def test_unmanaged_cards_are_counted_and_logged_once(
    nvml: Cards, capture_log: list[dict[str, Any]]
) -> None:
    nvml = Cards(*nvml.devices, device(UUID_2, 8192, {}))
    sampler = sampler_for(nvml, (CardConfig(index=0),))

    success_result_of(sampler.sample())
    success_result_of(sampler.sample())

    assert sampler.unmanaged_cards == 2
    told = [e for e in capture_log if "not managed" in e.get("log_format", "")]
    assert len(told) == 1
    assert (told[0]["count"], told[0]["unmanaged"]) == (3, 2)


def test_every_managed_card_means_none_unmanaged(nvml: Cards) -> None:
    sampler = sampler_for(nvml, TWO)
    success_result_of(sampler.sample())
    assert sampler.unmanaged_cards == 0


def test_without_a_device_count_nothing_is_counted(nvml: Cards) -> None:
    reading = read_cards(_WithoutCount(nvml), TWO)  # type: ignore[arg-type]
    assert isinstance(reading, CardsReading) and reading.device_count is None
    assert set(reading.cards) == {0, 1}


class _WithoutCount:
    """An NVML without ``nvmlDeviceGetCount`` (and without uuids): an older stand-in."""

    def __init__(self, inner: Cards) -> None:
        self._inner = inner
        self.NVMLError = SimulatedNvmlError

    def __getattr__(self, name: str) -> Any:
        if name in ("nvmlDeviceGetCount", "nvmlDeviceGetUUID"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_set_cards_keeps_the_samples_of_cards_that_stay(nvml: Cards) -> None:
    sampler = sampler_for(nvml, TWO)
    success_result_of(sampler.sample())
    kept = sampler.latest_by_card[1]

    sampler.set_cards((CardConfig(index=1),))

    assert dict(sampler.latest_by_card) == {1: kept}
    assert sampler.latest is kept


def test_the_latest_sample_can_be_set_for_the_first_card(nvml: Cards) -> None:
    sampler = sampler_for(nvml, TWO)
    sample = GpuSample(time=1.0, err="x")
    sampler.latest = sample
    assert sampler.latest_by_card[0] is sample
    assert sampler.latest_by_card[1] == GpuSample()
