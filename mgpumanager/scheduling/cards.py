"""
One ``DeferredLock`` per card, and which waiting jobs may start on the cards
that are free.

A job needs the lock of every card its consumer uses and takes them all at
once, only when all are free: it never holds one while waiting for another,
so two jobs can never each hold a card the other needs (no deadlock).  Going
down the policy's order, a job that cannot start reserves its cards: no job
after it may start on them, so a two-card job is not starved by a stream of
one-card jobs on either of its cards.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

from twisted.internet.defer import DeferredLock

from mgpumanager.scheduling.queued import QueuedJob

#: The cards a consumer's jobs need, by consumer name.
CardsOf = Callable[[str], Collection[int]]


def one_card(consumer: str) -> Collection[int]:
    """Every consumer on card 0: a one-card host."""
    return (0,)


class CardLocks:
    """The cards' locks, made as cards are first asked about."""

    def __init__(self) -> None:
        self._locks: dict[int, DeferredLock] = {}

    def _lock(self, card: int) -> DeferredLock:
        lock = self._locks.get(card)
        if lock is None:
            lock = self._locks[card] = DeferredLock()
        return lock

    def free(self, cards: Iterable[int]) -> bool:
        """Whether every one of ``cards`` is free."""
        return not any(self._lock(card).locked for card in cards)

    def busy(self) -> frozenset[int]:
        """The cards a job holds now."""
        return frozenset(card for card, lock in self._locks.items() if lock.locked)

    def take(self, cards: Iterable[int]) -> None:
        """Take every one of ``cards``; each must be free (see :meth:`free`)."""
        for card in cards:
            acquired = self._lock(card).acquire()
            assert acquired.called, "a card's lock is only ever taken here, when it is free"

    def release(self, cards: Iterable[int]) -> None:
        for card in cards:
            self._lock(card).release()


def startable(
    order: Sequence[QueuedJob], cards_of: CardsOf, busy: Collection[int]
) -> list[QueuedJob]:
    """
    The jobs of ``order`` (the policy's run order) that may start now: all
    their cards free, and none reserved by a job before them that cannot.
    """
    reserved = set(busy)
    ready = []
    for job in order:
        cards = cards_of(job.consumer)
        if reserved.isdisjoint(cards):
            ready.append(job)
        else:
            reserved.update(cards)
    return ready
