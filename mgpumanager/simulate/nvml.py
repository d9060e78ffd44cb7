"""
A stand-in for the ``pynvml`` module that reads simulated cards.

The daemon's GPU sampler takes its NVML module as a constructor argument; handing it a
:class:`SimulatedNvml` instead of ``pynvml`` lets the whole daemon run against the
simulated host, in the same process (card objects) or another one (the cards' JSON
state file).  Cards are found by NVML index (their position) or by uuid.  Only the
names the sampler needs exist, with ``pynvml``'s semantics: sizes in bytes, calls
before ``nvmlInit`` fail with ``Uninitialized``, and errors are
:class:`pynvml.NVMLError` subclasses so an ``except pynvml.NVMLError`` still catches
them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
import pynvml

from mgpumanager.simulate.card import SimulatedCard
from mgpumanager.simulate.card_state import CardState, read_cards_state

_MIB = 1024 * 1024
# What NVML reports for gpuInstanceId/computeInstanceId on a card without MIG.
_NO_INSTANCE = 0xFFFFFFFF

NVML_ERROR_UNINITIALIZED: int = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT
NVML_ERROR_DRIVER_NOT_LOADED: int = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NVML_ERROR_GPU_IS_LOST: int = pynvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_NOT_FOUND: int = pynvml.NVML_ERROR_NOT_FOUND


class SimulatedNvmlError(pynvml.NVMLError):  # type: ignore[misc]
    """
    An NVML failure of the simulated card.

    Like ``pynvml.NVMLError`` it carries the NVML code in ``value``; it also says
    *why* (which state file), since a simulated failure is usually a setup mistake.
    """

    value: int

    def __new__(cls, value: int, detail: str = "") -> SimulatedNvmlError:
        # pynvml's __new__ would swap in its own per-code subclass and lose ours.
        error: SimulatedNvmlError = Exception.__new__(cls)
        error.value = value
        return error

    def __init__(self, value: int, detail: str = "") -> None:
        Exception.__init__(self, value, detail)
        self.value = value
        self.detail = detail

    def __str__(self) -> str:
        text = str(pynvml.NVMLError._errcode_to_string.get(self.value, "Unknown Error"))
        return f"{text}: {self.detail}" if self.detail else text

    # pynvml defines __eq__ (so instances are unhashable); Failure and logging do not
    # need that, and a hashable exception is the less surprising one.
    __hash__ = Exception.__hash__


@attrs.frozen
class DeviceHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns: opaque to the caller."""

    index: int


@attrs.frozen
class MemoryInfo:
    """``nvmlDeviceGetMemoryInfo``'s answer, in bytes like ``c_nvmlMemory_t``."""

    total: int
    free: int
    used: int


@attrs.frozen
class ProcessInfo:
    """One entry of ``nvmlDeviceGetComputeRunningProcesses``, like ``c_nvmlProcessInfo_t``."""

    # camelCase because these are pynvml's field names, which the sampler reads.
    pid: int
    usedGpuMemory: int
    gpuInstanceId: int = _NO_INSTANCE
    computeInstanceId: int = _NO_INSTANCE


class SimulatedNvml:
    """
    The subset of ``pynvml`` the daemon uses, answering for simulated cards.

    :param source: the card, the cards in NVML order, or the path of the JSON
        state file a :class:`SimulatedCard` (or a host's
        :class:`~mgpumanager.simulate.cards.CardBank`) writes in another process.
        The file is read on every call, since the cards change under us.
    """

    NVMLError: type[Exception] = SimulatedNvmlError

    def __init__(
        self, source: SimulatedCard | Sequence[SimulatedCard] | str | os.PathLike[str]
    ) -> None:
        self._cards: tuple[SimulatedCard, ...] | None = None
        self._path: str | None = None
        if isinstance(source, SimulatedCard):
            self._cards = (source,)
        elif isinstance(source, str | os.PathLike):
            self._path = os.fspath(source)
        else:
            self._cards = tuple(source)
        self._init_count = 0

    # The method names are pynvml's own, hence camelCase.
    def nvmlInit(self) -> None:
        # Like the real library, init fails when there is no card to talk to.
        self._states(NVML_ERROR_DRIVER_NOT_LOADED)
        self._init_count += 1

    def nvmlShutdown(self) -> None:
        self._require_init()
        self._init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return len(self._states(NVML_ERROR_GPU_IS_LOST))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> DeviceHandle:
        self._require_init()
        if not 0 <= index < len(self._states(NVML_ERROR_GPU_IS_LOST)):
            raise SimulatedNvmlError(NVML_ERROR_INVALID_ARGUMENT, f"no GPU at index {index}")
        return DeviceHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> DeviceHandle:
        self._require_init()
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, state in enumerate(self._states(NVML_ERROR_GPU_IS_LOST)):
            if state.uuid and state.uuid == wanted:
                return DeviceHandle(index)
        raise SimulatedNvmlError(NVML_ERROR_NOT_FOUND, f"no GPU with uuid {wanted}")

    def nvmlDeviceGetUUID(self, handle: DeviceHandle) -> str:
        return self._device_state(handle).uuid

    def nvmlDeviceGetName(self, handle: DeviceHandle) -> str:
        return self._device_state(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: DeviceHandle, version: Any = None) -> MemoryInfo:
        state = self._device_state(handle)
        return MemoryInfo(
            total=state.total_mib * _MIB,
            free=state.free_mib * _MIB,
            used=state.used_mib * _MIB,
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: DeviceHandle) -> list[ProcessInfo]:
        state = self._device_state(handle)
        return [ProcessInfo(pid=p.pid, usedGpuMemory=p.used_mib * _MIB) for p in state.processes]

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        """
        The name of a process on any card: a server's own name, or the name a
        guest was given, so that a reader can say who the guest is.
        """
        self._require_init()
        for state in self._states(NVML_ERROR_GPU_IS_LOST):
            for process in state.processes:
                if process.pid == pid:
                    return process.process_name
        raise SimulatedNvmlError(NVML_ERROR_NOT_FOUND, f"no process {pid} on any GPU")

    def _require_init(self) -> None:
        if self._init_count <= 0:
            raise SimulatedNvmlError(NVML_ERROR_UNINITIALIZED)

    def _device_state(self, handle: DeviceHandle) -> CardState:
        self._require_init()
        # Once initialised, a card that vanishes is a lost GPU, not a missing driver.
        states = self._states(NVML_ERROR_GPU_IS_LOST)
        if not isinstance(handle, DeviceHandle) or not 0 <= handle.index < len(states):
            raise SimulatedNvmlError(NVML_ERROR_INVALID_ARGUMENT, f"bad handle {handle!r}")
        return states[handle.index]

    def _states(self, code: int) -> list[CardState]:
        if self._cards is not None:
            return [card.snapshot() for card in self._cards]
        assert self._path is not None
        try:
            return read_cards_state(self._path)
        except (OSError, ValueError) as e:
            raise SimulatedNvmlError(code, f"simulated card state {self._path}: {e}") from None
