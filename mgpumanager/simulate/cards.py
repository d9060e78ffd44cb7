"""
A simulated host with several cards, and a server that sits on more than one of them.

A server on several cards is one process whose model is split over its cards
(CUDA_VISIBLE_DEVICES=0,1): it holds its model's size on each of them, and a load
that does not fit on one of them fails with that card's out-of-memory error and
holds nothing anywhere.  :class:`CardSpan` gives such a server its cards as one, so
the servers need not know how many cards they sit on; a server on one card gets the
:class:`~mgpumanager.simulate.card.SimulatedCard` itself.

:class:`CardBank` is the host's cards.  With one card its state file is exactly the
one-card file; with several, it holds ``{"cards": [...]}``, each card's state in
NVML order, which :class:`~mgpumanager.simulate.nvml.SimulatedNvml` reads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

from twisted.logger import Logger

from mgpumanager.simulate.card import CudaOutOfMemory, PidBook, SimulatedCard
from mgpumanager.simulate.card_state import CardState, write_state_file

log = Logger()


class CardMemory(Protocol):
    """What a simulated server uses of its card (or of its cards, as one)."""

    @property
    def free_mib(self) -> int: ...
    def held_by(self, owner: str) -> int: ...
    def allocate(self, owner: str, mib: int) -> None: ...
    def release(self, owner: str) -> int: ...
    def snapshot(self) -> CardState: ...


def card_uuid(index: int) -> str:
    """The uuid of the simulated card at ``index``: stable, so a config may name it."""
    return f"GPU-51a1a7ed-0000-4000-8000-{index:012d}"


class CardSpan:
    """Several cards as one for a server on all of them."""

    def __init__(self, cards: Sequence[SimulatedCard]) -> None:
        if not cards:
            raise ValueError("a server needs at least one card")
        self.cards = tuple(cards)

    @property
    def free_mib(self) -> int:
        """What fits on every card: a split model needs its share on each."""
        return min(card.free_mib for card in self.cards)

    def held_by(self, owner: str) -> int:
        return max(card.held_by(owner) for card in self.cards)

    def allocate(self, owner: str, mib: int) -> None:
        """
        ``mib`` more on each card, or nothing anywhere.

        :raises CudaOutOfMemory: the first card it did not fit on (that card
            counts it).
        """
        done: list[SimulatedCard] = []
        try:
            for card in self.cards:
                card.allocate(owner, mib)
                done.append(card)
        except CudaOutOfMemory:
            for card in done:
                card.give_back(owner, mib)
            raise

    def release(self, owner: str) -> int:
        return max(card.release(owner) for card in self.cards)

    def snapshot(self) -> CardState:
        """The first of its cards: what the server sees as its device 0."""
        return self.cards[0].snapshot()


class CardBank:
    """
    The cards of one simulated host, NVML index = position, sharing one book of
    process ids.

    :param sizes: each card's MiB.
    :param state_path: where to keep the cards' state for a reader in another
        process, or ``None``.
    :param uuids: the uuid of a card, by index, where a configuration names
        one; the others get :func:`card_uuid`.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        state_path: str | None = None,
        uuids: Mapping[int, str] | None = None,
    ) -> None:
        if not sizes:
            raise ValueError("a host needs at least one card")
        self.pids = PidBook()
        self.state_path = state_path
        self._lock = threading.Lock()
        several = len(sizes) > 1
        self.cards = [
            SimulatedCard(
                mib,
                state_path=None if several else state_path,
                uuid=(uuids or {}).get(index, card_uuid(index)),
                index=index,
                pids=self.pids,
                on_change=self._write if several else None,
            )
            for index, mib in enumerate(sizes)
        ]
        if several and state_path is not None:
            # Written once up front, like a card's own file: a bad path fails now.
            self._write_file()

    def register(self, owner: str, pid: int) -> None:
        self.pids.register(owner, pid)

    def memory_for(self, indexes: Sequence[int]) -> CardMemory:
        """The memory of a server on the cards at ``indexes``."""
        for index in indexes:
            if not 0 <= index < len(self.cards):
                raise ValueError(f"no simulated card {index} (the host has {len(self.cards)})")
        chosen = [self.cards[index] for index in indexes]
        return chosen[0] if len(chosen) == 1 else CardSpan(chosen)

    @property
    def oom_count(self) -> int:
        return sum(card.oom_count for card in self.cards)

    def _write(self) -> None:
        try:
            self._write_file()
        except OSError:
            log.failure("could not write the cards' state to {path}", path=self.state_path)

    def _write_file(self) -> None:
        if self.state_path is None:
            return
        document = {"cards": [card.snapshot().to_json() for card in self.cards]}
        with self._lock:
            write_state_file(self.state_path, document, ".cards-")
