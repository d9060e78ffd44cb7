"""
One blocking NVML read of the managed cards, turned into MiB and a map of processes.

Every card is read in the same read, between one ``nvmlInit`` and its
``nvmlShutdown``, so that the cards' numbers describe one instant and a wedged
driver costs one stuck thread, not one per card.  A card that fails on its own
(a uuid no card has, a card fallen off the bus) is that card's error; the others
are still read.  Runs in a thread, never on the reactor (see
:mod:`mgpumanager.state.gpu`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import attrs

from mgpumanager.config.cards import CardConfig

MIB = 1024 * 1024

#: What ``nvmlDeviceGetHandleByIndex`` returns: opaque, and of a different type in
#: each implementation (a ctypes pointer in pynvml), so the sampler only passes it on.
NvmlHandle = Any


@attrs.frozen
class GpuReading:
    """What one NVML read returned about one card, in MiB."""

    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    #: pid -> MiB, for the processes NVML reports on the card.
    processes: Mapping[int, int] = attrs.field(factory=lambda: MappingProxyType({}))
    #: The card's uuid, "" when NVML does not say.
    uuid: str = ""


@attrs.frozen
class CardsReading:
    """
    One read of every managed card: each card's reading or what went wrong with
    it, by card number, and how many cards NVML lists (``None``: it did not say).
    """

    cards: Mapping[int, GpuReading | str]
    device_count: int | None = None


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
    """
    The part of the ``pynvml`` module the sampler cannot do without (or a
    stand-in for it).  ``nvmlDeviceGetCount``, ``nvmlDeviceGetUUID`` and
    ``nvmlDeviceGetHandleByUUID`` are used where the module has them: a card
    named by uuid needs the last.
    """

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
    One blocking NVML read of the device at ``device_index``.  Runs in a thread;
    raises whatever NVML raises (the sampler turns it into ``err``).
    """
    nvml.nvmlInit()
    try:
        return read_device(nvml, nvml.nvmlDeviceGetHandleByIndex(device_index))
    finally:
        nvml.nvmlShutdown()


def read_cards(nvml: Nvml, cards: Sequence[CardConfig]) -> CardsReading:
    """
    One blocking NVML read of every card in ``cards``.  Raises what NVML's
    initialisation raises (no driver: no card can be read); a card that fails
    alone carries its error text instead of a reading.
    """
    nvml.nvmlInit()
    try:
        found: dict[int, GpuReading | str] = {}
        for card in cards:
            try:
                found[card.index] = read_device(nvml, _handle(nvml, card), card.uuid)
            except Exception as e:
                found[card.index] = describe(e)
        return CardsReading(MappingProxyType(found), _device_count(nvml))
    finally:
        nvml.nvmlShutdown()


def read_device(nvml: Nvml, handle: NvmlHandle, uuid: str | None = None) -> GpuReading:
    """Read one device's name, memory and processes (NVML already initialised)."""
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = _text(nvml.nvmlDeviceGetName(handle))
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
    if uuid is None:
        uuid = _optional(nvml, "nvmlDeviceGetUUID", handle)
    return GpuReading(
        name=name,
        total_mib=memory.total // MIB,
        used_mib=memory.used // MIB,
        free_mib=memory.free // MIB,
        processes=MappingProxyType(processes),
        uuid=_text(uuid) if uuid is not None else "",
    )


def describe(error: BaseException) -> str:
    """The text of an error as a sample carries it: its message, else its type."""
    text = str(error).strip()
    return text if text else type(error).__name__


def _handle(nvml: Nvml, card: CardConfig) -> NvmlHandle:
    if card.uuid is None:
        return nvml.nvmlDeviceGetHandleByIndex(card.index)
    by_uuid = getattr(nvml, "nvmlDeviceGetHandleByUUID", None)
    if by_uuid is None:
        raise LookupError(f"this NVML cannot find a card by uuid ({card.uuid})")
    return by_uuid(card.uuid)


def _device_count(nvml: Nvml) -> int | None:
    count = _optional(nvml, "nvmlDeviceGetCount")
    return count if isinstance(count, int) else None


def _optional(nvml: Nvml, function: str, *args: Any) -> Any:
    # Old drivers, and stand-ins that only answer what the one-card sampler asked.
    call = getattr(nvml, function, None)
    if call is None:
        return None
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
