"""
The GPU sampler: what NVML says about the card, read off the reactor thread.

NVML calls block.  They are fast on a healthy driver, but a wedged driver can hang
them for minutes, and a daemon whose reactor is stuck in ``nvmlDeviceGetMemoryInfo``
answers nothing, ``/healthz`` included.  So every read runs in a dedicated
one-thread pool, bounded by a timeout; a read still stuck when the next tick comes
is not joined by another.  Without NVML (no driver, no card, no library) the sample
carries the error and the scheduler falls back to its budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mgpumanager.common.periodic import Periodic
from mgpumanager.config.document import Config

log = Logger()

MIB = 1024 * 1024

#: Runs a blocking callable somewhere off the reactor and fires with its result.
BlockingRunner = Callable[[Callable[[], "GpuReading"]], "Deferred[GpuReading]"]


class SampleSink(Protocol):
    """Anyone who wants every new sample (the registry, to attribute memory)."""

    def __call__(self, sample: GpuSample) -> None: ...


@attrs.frozen
class GpuReading:
    """What one NVML read returned, in MiB."""

    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    #: pid -> MiB, for the processes NVML reports on the card.
    processes: Mapping[int, int] = attrs.field(factory=lambda: MappingProxyType({}))


@attrs.frozen
class GpuSample:
    """
    The latest sampler result: a reading, an error, or (before the first tick)
    neither.  ``time`` is the POSIX time the read finished.
    """

    time: float | None = None
    reading: GpuReading | None = None
    err: str = ""

    @property
    def free_mib(self) -> int | None:
        return None if self.reading is None else self.reading.free_mib

#: What ``nvmlDeviceGetHandleByIndex`` returns: opaque, and of a different type in
#: each implementation (a ctypes pointer in pynvml), so the sampler only passes it on.
NvmlHandle = Any


class NvmlMemory(Protocol):
    """``nvmlDeviceGetMemoryInfo``'s answer, in bytes."""

    @property
    def total(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def free(self) -> int: ...


class NvmlProcess(Protocol):
    """One entry of ``nvmlDeviceGetComputeRunningProcesses``."""

    @property
    def pid(self) -> int: ...
    @property
    def usedGpuMemory(self) -> int | None: ...


class Nvml(Protocol):
    """The part of the ``pynvml`` module the sampler calls (or a stand-in for it)."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> NvmlHandle: ...
    def nvmlDeviceGetName(self, handle: NvmlHandle) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: NvmlHandle) -> NvmlMemory: ...
    def nvmlDeviceGetComputeRunningProcesses(
        self, handle: NvmlHandle
    ) -> Sequence[NvmlProcess]: ...


def read_nvml(nvml: Nvml, device_index: int = 0) -> GpuReading:
    """
    One blocking NVML read of a device.  Runs in a thread; raises whatever
    NVML raises (the sampler turns it into ``err``).
    """
    nvml.nvmlInit()
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        processes: dict[int, int] = {}
        try:
                running: Sequence[NvmlProcess] = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            running = ()
        for process in running:
            used = process.usedGpuMemory
            # NVML reports None (or a sentinel) when it may not see a process's usage.
            if isinstance(used, int) and 0 <= used < 1 << 60:
                processes[int(process.pid)] = processes.get(int(process.pid), 0) + used // MIB
        return GpuReading(
            name=str(name),
            total_mib=memory.total // MIB,
            used_mib=memory.used // MIB,
            free_mib=memory.free // MIB,
            processes=MappingProxyType(processes),
        )
    finally:
        nvml.nvmlShutdown()


class NvmlTimeout(Exception):
    """An NVML read did not return in time: a hung driver, most likely."""


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    name = type(error).__name__
    return text if text else name


class GpuSampler(Periodic):
    """
    Samples the card every ``interval`` seconds and keeps the latest result.

    :param load_nvml: returns the ``pynvml`` module (or a stand-in); called in the
        worker thread, so an import failure is just another sample error.
    :param run_blocking: runs a blocking callable off the reactor
        (``deferToThreadPool`` over a one-thread pool in the daemon).
    :param clock: the reactor's time, for the loop and the read timeout.
    """

    def __init__(
        self,
        load_nvml: Callable[[], Nvml],
        run_blocking: BlockingRunner,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        device_index: int = 0,
    ) -> None:
        self._load_nvml = load_nvml
        self._run_blocking = run_blocking
        self._clock = clock
        self._timeout = timeout
        self._device_index = device_index
        self._pending: Deferred[GpuReading] | None = None
        self._timer: IDelayedCall | None = None
        self._hung = False
        self._sinks: list[SampleSink] = []
        self._waiters: list[Deferred[GpuSample]] = []
        self.latest = GpuSample()
        self.samples_taken = 0
        Periodic.__init__(self, self.sample, clock, interval)

    def now(self) -> float:
        """The time on the clock that stamps the samples."""
        return self._clock.seconds()

    def latest_used_mib(self) -> int | None:
        """The card's used memory in the latest sample, None without a reading."""
        reading = self.latest.reading
        return None if reading is None else reading.used_mib

    def reconfigure(self, config: Config) -> None:
        """Sample at the reloaded ``gpu.poll_interval_seconds``."""
        self.set_interval(config.gpu.poll_interval_seconds)

    def subscribe(self, sink: SampleSink) -> None:
        """Call ``sink`` with every new sample."""
        self._sinks.append(sink)


    def sample(self) -> Deferred[GpuSample]:
        """
        Take one sample now (the loop calls this; so does the scheduler when
        it waits for an unloaded consumer's memory to come back).  Never fails.

        A read still under way is shared rather than joined by another; a read
        stuck past the timeout is reported as an error sample, and until its
        thread comes back, further samples answer at once with that error
        instead of queueing behind it.
        """
        waiter: Deferred[GpuSample] = Deferred()
        self._waiters.append(waiter)
        if self._pending is None:
            # The timer first: a read that returns at once must find it to cancel.
            self._timer = self._clock.callLater(self._timeout, self._timed_out)
            pending = self._run_blocking(self._read)
            if not pending.called:
                self._pending = pending
            pending.addCallbacks(
                self._read_returned, lambda failure: self._read_returned(failure.value)
            )
        elif self._hung:
            self._flush_waiters()
        return waiter

    def _read_returned(self, outcome: GpuReading | BaseException) -> None:
        # Clear first: a waiter answered below may ask for the next sample at once.
        self._pending = None
        self._hung = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._record(outcome)

    def _timed_out(self) -> None:
        self._timer = None
        self._hung = True
        self._record(NvmlTimeout(f"NVML read timed out after {self._timeout:g} s"))

    def _read(self) -> GpuReading:
        return read_nvml(self._load_nvml(), self._device_index)

    def _record(self, outcome: GpuReading | BaseException) -> None:
        now = self._clock.seconds()
        if isinstance(outcome, GpuReading):
            self.latest = GpuSample(time=now, reading=outcome)
        else:
            if not self.latest.err:
                log.warn("GPU sampling failed: {err}", err=_describe(outcome))
            self.latest = GpuSample(time=now, err=_describe(outcome))
        self.samples_taken += 1
        for sink in self._sinks:
            try:
                sink(self.latest)
            except Exception:
                log.failure("GPU sample subscriber failed")
        self._flush_waiters()

    def _flush_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.latest)
