"""
Tests for :mod:`mgpumanager.state.gpu`: what NVML says becomes MiB and a per-process map;
no NVML, an NVML error or a hung driver becomes the sample's ``err`` and never stops
the loop; subscribers see every sample; ``gpu_status`` is the ``gpu`` object of
``/v1/status``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from mgpumanager.simulate.nvml import NVML_ERROR_GPU_IS_LOST, SimulatedNvmlError
from mgpumanager.state.gpu import MIB, GpuReading, GpuSample, GpuSampler
from mgpumanager.web.status import gpu_status
from tests.support import EPOCH, assert_no_result, success_result_of

INTERVAL = 2.0
TIMEOUT = 5.0


class FakeNvml:
    """
    The slice of ``pynvml`` the sampler uses, answering as told: raw values
    (a name in bytes, sizes off the MiB, usage NVML hides, a pid listed twice)
    that :mod:`mgpumanager.simulate.nvml` never gives, and its errors.
    """

    NVMLError = SimulatedNvmlError

    def __init__(self) -> None:
        self.name: str | bytes = b"NVIDIA GeForce RTX 4090"
        self.memory = SimpleNamespace(
            total=24564 * MIB, used=8963 * MIB + 12345, free=15601 * MIB
        )
        self.processes: list[Any] = []
        self.init_error: Exception | None = None
        self.processes_error: Exception | None = None
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        assert index == 0
        return "handle-0"

    def nvmlDeviceGetName(self, handle: object) -> str | bytes:
        return self.name

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> Any:
        return self.memory

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[Any]:
        if self.processes_error is not None:
            raise self.processes_error
        return self.processes


def process(pid: int, used: int | None) -> Any:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def _sync(call: Callable[[], GpuReading]) -> Deferred[GpuReading]:
    return maybeDeferred(call)


def sampler_for(
    load: Callable[[], Any],
    clock: Clock | None = None,
    run_blocking: Callable[[Callable[[], GpuReading]], Deferred[GpuReading]] = _sync,
) -> GpuSampler:
    if clock is None:
        clock = Clock()
        clock.advance(EPOCH)
    return GpuSampler(
        load_nvml=load, run_blocking=run_blocking, clock=clock, interval=INTERVAL,
        timeout=TIMEOUT,
    )


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml()


def test_a_reading_is_in_mib_with_memory_per_process(nvml: FakeNvml) -> None:
    nvml.processes = [
        process(100, 2048 * MIB),
        process(200, None),
        process(100, 512 * MIB),
        process(300, 1000 * MIB),
        # NVML_VALUE_NOT_AVAILABLE: usage hidden from us.
        process(400, 2**64 - 1),
    ]
    sampler = sampler_for(lambda: nvml)

    sample = success_result_of(sampler.sample())

    reading = sample.reading
    assert reading is not None
    assert (reading.total_mib, reading.used_mib, reading.free_mib) == (24564, 8963, 15601)
    assert reading.name == "NVIDIA GeForce RTX 4090"
    assert dict(reading.processes) == {100: 2560, 300: 1000}
    assert sample.err == ""
    assert sample.time == EPOCH
    assert sampler.latest is sample
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_a_name_already_text_is_kept(nvml: FakeNvml) -> None:
    nvml.name = "NVIDIA H100"
    sample = success_result_of(sampler_for(lambda: nvml).sample())
    assert sample.reading is not None
    assert sample.reading.name == "NVIDIA H100"


def test_a_process_list_error_still_gives_the_memory_reading(nvml: FakeNvml) -> None:
    nvml.processes_error = SimulatedNvmlError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    sample = success_result_of(sampler_for(lambda: nvml).sample())
    assert sample.reading is not None
    assert sample.reading.free_mib == 15601
    assert dict(sample.reading.processes) == {}


def test_an_nvml_error_is_recorded_not_raised_and_the_loop_goes_on(nvml: FakeNvml) -> None:
    nvml.init_error = SimulatedNvmlError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    clock = Clock()
    sampler = sampler_for(lambda: nvml, clock)
    sampler.start()
    try:
        first = sampler.latest
        assert first.err == "NVML Shared Library Not Found"
        assert first.reading is None
        assert first.free_mib is None

        clock.advance(INTERVAL)
        clock.advance(INTERVAL)
        assert sampler.samples_taken == 3
        assert nvml.inits == 3

        nvml.init_error = None
        clock.advance(INTERVAL)
        assert sampler.latest.err == ""
        assert sampler.latest.free_mib == 15601
    finally:
        sampler.stop()


def test_a_missing_pynvml_module_is_a_sample_error() -> None:
    def load() -> Any:
        raise ImportError("No module named 'pynvml'")

    sample = success_result_of(sampler_for(load).sample())

    assert sample.reading is None
    assert "pynvml" in sample.err


class Hung:
    """A ``run_blocking`` whose reads never come back."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, call: Callable[[], GpuReading]) -> Deferred[GpuReading]:
        self.calls += 1
        return Deferred()


def test_a_hung_read_times_out_and_is_not_joined_by_another() -> None:
    clock = Clock()
    hung = Hung()
    sampler = sampler_for(lambda: FakeNvml(), clock, hung)

    first = sampler.sample()
    clock.advance(TIMEOUT / 2)
    second = sampler.sample()
    assert hung.calls == 1
    assert_no_result(first)

    clock.advance(TIMEOUT / 2)
    sample = success_result_of(first)
    assert success_result_of(second) is sample
    assert sample.reading is None
    assert sample.err
    assert sample.time == TIMEOUT


def test_a_hung_read_says_it_timed_out() -> None:
    clock = Clock()
    sampler = sampler_for(lambda: FakeNvml(), clock, Hung())

    pending = sampler.sample()
    clock.advance(TIMEOUT)

    assert "timed out" in success_result_of(pending).err


@pytest.mark.logged_errors_expected
def test_every_subscriber_gets_each_sample_and_a_failing_one_is_only_logged(
    nvml: FakeNvml, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    sampler = sampler_for(lambda: nvml)
    seen: list[GpuSample] = []

    def broken(sample: GpuSample) -> None:
        raise RuntimeError("subscriber bug")

    def record(sample: GpuSample) -> None:
        seen.append(sample)

    sampler.subscribe(broken)
    sampler.subscribe(record)

    first = success_result_of(sampler.sample())
    nvml.init_error = SimulatedNvmlError(NVML_ERROR_GPU_IS_LOST)
    second = success_result_of(sampler.sample())

    assert seen == [first, second]
    assert second.err == "GPU is lost"
    assert sampler.latest is second
    assert len(fail_on_logged_errors) == 2


READING = GpuReading(name="NVIDIA GeForce RTX 4090", total_mib=24564, used_mib=8963,
                     free_mib=15601)


def test_status_prefers_the_configured_total() -> None:
    status = gpu_status(GpuSample(time=EPOCH + 0.25, reading=READING), 24576, 1024)

    assert status["total_mib"] == 24576
    assert (status["used_mib"], status["free_mib"]) == (8963, 15601)
    assert status["reserved_mib"] == 1024
    assert status["last_sample"] == "2026-05-15T10:00:00.250Z"
    assert "err" not in status


def test_status_falls_back_to_nvmls_total() -> None:
    status = gpu_status(GpuSample(time=EPOCH, reading=READING), None, 512)
    assert status["total_mib"] == 24564
    assert status["reserved_mib"] == 512


def test_status_of_a_failed_sample_carries_the_error() -> None:
    status = gpu_status(GpuSample(time=EPOCH, err="NVML Shared Library Not Found"), 24576, 1024)

    assert status["err"] == "NVML Shared Library Not Found"
    assert status["total_mib"] == 24576
    assert status["used_mib"] is None
    assert status["free_mib"] is None
    assert status["last_sample"] == "2026-05-15T10:00:00.000Z"


def test_status_before_the_first_sample_has_no_time_and_no_error() -> None:
    status = gpu_status(GpuSample(), None, 1024)
    assert status["last_sample"] is None
    assert status["total_mib"] is None
    assert "err" not in status


def test_times_are_rfc3339_utc_with_milliseconds() -> None:
    from mgpumanager.common import times

    assert times.rfc3339(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert times.rfc3339(None) is None
