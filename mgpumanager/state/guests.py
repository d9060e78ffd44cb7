"""
Guests on the cards: processes NVML sees on a managed card that belong to no
consumer and are not the daemon (a desktop, a game, a training run).  They
are found afresh in every sample; without NVML none can be seen.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import attrs
import psutil

from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.registry import Registry

#: How many process names are remembered (a guest keeps its pid while it runs).
NAMES_KEPT = 256


@attrs.frozen
class Guest:
    """One guest process: its pid, its name, the MiB it holds on the card."""

    pid: int
    name: str
    mib: int


def process_name(pid: int) -> str:
    """A process's name on this host, or ``pid N`` when it cannot be read."""
    try:
        return str(psutil.Process(pid).name())
    except (psutil.Error, OSError):
        return f"pid {pid}"


class GuestWatch:
    """
    Each card's guests, from each sample of every card.

    :param pids_of: a consumer's processes, as attributed (see
        :class:`~mgpumanager.state.attribution.ProcessAttributor`).
    :param own_pids: the daemon's own processes.
    :param name_of: a process's name.
    """

    def __init__(
        self,
        registry: Registry,
        pids_of: Callable[[str], frozenset[int]],
        own_pids: Collection[int],
        name_of: Callable[[int], str] = process_name,
    ) -> None:
        self._registry = registry
        self._pids_of = pids_of
        self._own = frozenset(own_pids)
        self._name_of = name_of
        self._names: dict[int, str] = {}
        self._by_card: dict[int, tuple[Guest, ...]] = {}
        #: Whether the latest samples could see processes at all (NVML answered).
        self.visible = False

    def on(self, card: int) -> tuple[Guest, ...]:
        """The guests on ``card`` in the latest sample, most memory first."""
        return self._by_card.get(card, ())

    def mib_on(self, card: int) -> int:
        """What the guests hold on ``card``."""
        return sum(guest.mib for guest in self.on(card))

    def on_cards(self, samples: Mapping[int, GpuSample]) -> None:
        """A sampler subscriber: find every card's guests in its new sample."""
        ours = set(self._own)
        for state in self._registry:
            ours |= self._pids_of(state.name)
        for holder in self._registry.holders.values():
            ours |= holder.pids
        self.visible = any(sample.reading is not None for sample in samples.values())
        for card, sample in samples.items():
            reading = sample.reading
            processes = reading.processes if reading is not None else {}
            guests = [
                Guest(pid, self._name(pid), mib)
                for pid, mib in processes.items()
                if pid not in ours and mib > 0
            ]
            self._by_card[card] = tuple(sorted(guests, key=lambda g: (-g.mib, g.pid)))

    def _name(self, pid: int) -> str:
        name = self._names.get(pid)
        if name is None:
            if len(self._names) >= NAMES_KEPT:
                self._names.clear()
            name = self._names[pid] = self._name_of(pid)
        return name
