"""
One simulated GPU card whose memory several simulated servers share.

The card is the one thing the simulated servers have in common, exactly as on a real
host: each server allocates its model on it without knowing about the others, so a
mixed workload sent to them directly runs out of memory the way PyTorch does.  The
card can mirror its state into a small JSON file (:mod:`mgpumanager.simulate.card_state`)
so that another process, the daemon among them, can watch it like NVML.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

from twisted.logger import Logger

from mgpumanager.simulate.card_state import (
    DEFAULT_CARD_NAME,
    CardState,
    ProcessUsage,
    write_state_file,
)

log = Logger()

_PID_BASE = 4000
_PID_SPAN = 60000


class CudaOutOfMemory(Exception):
    """
    An allocation did not fit on the card.

    ``str()`` reads like PyTorch's ``torch.cuda.OutOfMemoryError`` so that whoever
    reads a simulated server's error sees what a real one would have said.
    """

    def __init__(
        self, requested_mib: int, total_mib: int, free_mib: int, device: int = 0
    ) -> None:
        self.requested_mib = requested_mib
        self.total_mib = total_mib
        self.free_mib = free_mib
        self.device = device
        super().__init__(
            f"CUDA out of memory. Tried to allocate {requested_mib} MiB "
            f"(GPU {device}; {total_mib} MiB total capacity; {free_mib} MiB free)"
        )


class PidBook:
    """
    The fake process ids of the owners of memory, shared by the cards of one
    host: a server on two cards is one process, and NVML lists it with one pid
    on each.
    """

    def __init__(self) -> None:
        self._pids: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()

    def register(self, owner: str, pid: int, name: str | None = None) -> None:
        """
        :param name: the process name NVML gives for ``pid``, when it is not
            ``owner`` itself (a guest named by whoever started it).
        """
        with self._lock:
            taken = {p for o, p in self._pids.items() if o != owner}
            if pid in taken:
                raise ValueError(f"pid {pid} is already registered to another owner")
            self._pids[owner] = pid
            if name is not None:
                self._names[owner] = name

    def name_of(self, owner: str) -> str:
        """The process name registered for ``owner``, or ``""``: the owner's own."""
        with self._lock:
            return self._names.get(owner, "")

    def pid_of(self, owner: str) -> int:
        """Registered, or derived from the name so that two processes reading agree on it."""
        with self._lock:
            pid = self._pids.get(owner)
            if pid is None:
                taken = set(self._pids.values())
                pid = _PID_BASE + zlib.crc32(owner.encode("utf-8")) % _PID_SPAN
                while pid in taken:
                    pid += 1
                self._pids[owner] = pid
            return pid


class SimulatedCard:
    """
    The memory of one GPU, handed out to named owners.

    :param total_mib: the card's capacity.
    :param state_path: where to mirror the state as JSON after every change, or
        ``None`` to keep it in this process only.
    :param name: what ``nvmlDeviceGetName`` answers.
    :param uuid: what ``nvmlDeviceGetUUID`` answers.
    :param index: its NVML index, for the out-of-memory message.
    :param pids: the process ids, shared with the host's other cards.
    :param on_change: called after every change (the host's several-card file).

    Counters for tests and demos: ``oom_count`` (allocations refused),
    ``peak_used_mib`` (the most ever in use at once).
    """

    def __init__(
        self,
        total_mib: int,
        state_path: str | None = None,
        name: str = DEFAULT_CARD_NAME,
        *,
        uuid: str = "",
        index: int = 0,
        pids: PidBook | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if total_mib <= 0:
            raise ValueError(f"total_mib must be positive, not {total_mib}")
        self.total_mib = total_mib
        self.state_path = state_path
        self.name = name
        self.uuid = uuid
        self.index = index
        self.oom_count = 0
        self.peak_used_mib = 0
        self._held: dict[str, int] = {}
        self._pids = pids if pids is not None else PidBook()
        self._on_change = on_change
        # The daemon's sampler reads the card from a thread when both share a process.
        self._lock = threading.Lock()
        # Written once up front: a state path that cannot be written is a setup
        # mistake, better raised now than logged on every allocation.
        if state_path is not None:
            write_state_file(state_path, self.snapshot().to_json(), ".card-")

    @property
    def used_mib(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib

    def held_by(self, owner: str) -> int:
        """How much ``owner`` holds now, 0 when nothing."""
        with self._lock:
            return self._held.get(owner, 0)

    def register(self, owner: str, pid: int) -> None:
        """Give ``owner`` the process id NVML will report for it."""
        self._pids.register(owner, pid)

    def pid_of(self, owner: str) -> int:
        """
        The fake process id of ``owner``: registered, or derived from the name so
        that two processes reading the same card agree on it.
        """
        return self._pids.pid_of(owner)

    def allocate(self, owner: str, mib: int, *, counted: bool = True) -> None:
        """
        Hand ``mib`` more MiB to ``owner``.

        :param counted: whether a refusal counts in ``oom_count``, which says that
            a server ran out of memory; a guest's refusal is none of the daemon's doing.
        :raises CudaOutOfMemory: when it does not fit; nothing changes then.
        """
        if mib < 0:
            raise ValueError(f"cannot allocate a negative size ({mib} MiB)")
        with self._lock:
            used = sum(self._held.values())
            if used + mib > self.total_mib:
                if counted:
                    self.oom_count += 1
                error = CudaOutOfMemory(mib, self.total_mib, self.total_mib - used, self.index)
            else:
                error = None
                self._pids.pid_of(owner)
                self._held[owner] = self._held.get(owner, 0) + mib
                self.peak_used_mib = max(self.peak_used_mib, used + mib)
        if error is not None:
            log.info(
                "{owner} ran out of memory asking for {mib} MiB ({free} MiB free)",
                owner=owner,
                mib=mib,
                free=error.free_mib,
            )
            raise error
        log.debug("{owner} allocated {mib} MiB", owner=owner, mib=mib)
        self._changed()

    def give_back(self, owner: str, mib: int) -> None:
        """Take back ``mib`` of what ``owner`` holds: an allocation on several cards undone."""
        with self._lock:
            left = self._held.get(owner, 0) - mib
            if left > 0:
                self._held[owner] = left
            else:
                self._held.pop(owner, None)
        self._changed()

    def release(self, owner: str) -> int:
        """Free everything ``owner`` holds; return how many MiB came back."""
        with self._lock:
            freed = self._held.pop(owner, 0)
        if freed:
            log.debug("{owner} released {mib} MiB", owner=owner, mib=freed)
            self._changed()
        return freed

    def processes(self) -> list[tuple[int, int]]:
        """``(pid, used_mib)`` of every owner holding memory, as NVML lists them."""
        return [(p.pid, p.used_mib) for p in self.snapshot().processes]

    def snapshot(self) -> CardState:
        """The whole state at one instant."""
        with self._lock:
            processes = tuple(
                ProcessUsage(self._pids.pid_of(owner), owner, mib, self._pids.name_of(owner))
                for owner, mib in sorted(self._held.items())
                if mib > 0
            )
            return CardState(
                name=self.name,
                total_mib=self.total_mib,
                used_mib=sum(self._held.values()),
                processes=processes,
                uuid=self.uuid,
            )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
        if self.state_path is None:
            return
        try:
            write_state_file(self.state_path, self.snapshot().to_json(), ".card-")
        except OSError:
            # The card itself changed; failing the allocation because a mirror file
            # could not be written would simulate a fault no real GPU has.
            log.failure("could not write the card state to {path}", path=self.state_path)
