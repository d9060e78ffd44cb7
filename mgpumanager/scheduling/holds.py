"""
Cards held by someone who is not a job: a yield to a guest, a reclaim of
memory.  A hold takes the card's lock as a job would: after the job running on
it ends, ahead of every waiting job, and no waiting job starts on the card
meanwhile nor until it is released.  The queue's ETAs count a hold's end when
it has one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, KeysView

import attrs
from twisted.internet.defer import Deferred

from mgpumanager.scheduling.cards import CardLocks
from mgpumanager.scheduling.queued import QueueEntry


class CardHolds:
    """
    The holds on a scheduler's cards.

    :param cards: the scheduler's card locks.
    :param dispatch: the scheduler's dispatch, run when a hold changes.
    """

    def __init__(self, cards: CardLocks, dispatch: Callable[[], None]) -> None:
        self._cards = cards
        self._dispatch = dispatch
        #: Cards asked for, with who waits, in the order they asked.
        self._asked: dict[int, list[Deferred[None]]] = {}
        #: Cards held for guests, and until when (None: until given back).
        self._until: dict[int, float | None] = {}

    @property
    def asked(self) -> KeysView[int]:
        """The cards someone waits to hold: no job may start on them."""
        return self._asked.keys()

    def hold(self, card: int) -> Deferred[None]:
        """
        Hold ``card``; fires once it is held.  Cancelling it before then gives
        up.  Several holders of one card hold it in turn, in the order they asked.
        """

        def give_up(_: Deferred[None]) -> None:
            waiting = self._asked.get(card, [])
            if held in waiting:
                waiting.remove(held)
            if not waiting:
                self._asked.pop(card, None)
            self._dispatch()

        held: Deferred[None] = Deferred(give_up)
        self._asked.setdefault(card, []).append(held)
        self._dispatch()
        return held

    def release(self, card: int) -> None:
        """Give back a held card: jobs may start on it again."""
        self._cards.release([card])
        self._dispatch()

    def serve(self) -> None:
        """Hand every card asked for that is free to the first who asked."""
        for card, waiting in list(self._asked.items()):
            if self._cards.free([card]):
                held = waiting.pop(0)
                if not waiting:
                    del self._asked[card]
                self._cards.take([card])
                held.callback(None)

    def held_until(self, card: int, until: float | None) -> None:
        """A card is held for a guest until ``until`` (None: until given back)."""
        self._until[card] = until

    def given_back(self, card: int) -> None:
        self._until.pop(card, None)

    def eta_after(self, entry: QueueEntry, cards: Collection[int], now: float) -> QueueEntry:
        """A queue entry that needs ``cards``, starting no sooner than their holds end."""
        held = [self._until[card] for card in cards if card in self._until]
        if not held:
            return entry
        if None in held or entry.eta_seconds is None:
            return attrs.evolve(entry, eta_seconds=None)
        ends = max(until for until in held if until is not None) - now
        return attrs.evolve(entry, eta_seconds=round(max(entry.eta_seconds, ends), 1))

    def __bool__(self) -> bool:
        return bool(self._asked) or bool(self._until)
