"""
The scheduler's queue: the waiting jobs by id (so in arrival order), each with
the Deferred it starts on and its timeout, and the bookkeeping a start does to
the others (those it went ahead of have been bypassed once more).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from mgpumanager.scheduling.cards import CardsOf, one_card
from mgpumanager.scheduling.queued import QueuedJob, run_precedence


@attrs.define
class Waiter:
    """A queued job: its public view, the Deferred it starts on, its timeout."""

    view: QueuedJob
    granted: Deferred[None]
    timer: IDelayedCall | None = None


class WaitingRoom:
    """The waiting jobs, in arrival order."""

    def __init__(self) -> None:
        self._waiters: dict[int, Waiter] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._waiters.values()))

    def add(self, waiter: Waiter) -> None:
        self._waiters[waiter.view.id] = waiter

    def leave(self, job_id: int) -> Waiter:
        """Take a waiter out, with its timeout."""
        waiter = self._waiters.pop(job_id)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        return waiter

    def leave_consumers(self, consumers: Collection[str]) -> list[Waiter]:
        """Take out every waiter of ``consumers`` (a reload removed them), in arrival order."""
        return [
            self.leave(job_id)
            for job_id, waiter in list(self._waiters.items())
            if waiter.view.consumer in consumers
        ]

    def views(self) -> list[QueuedJob]:
        return [waiter.view for waiter in self._waiters.values()]

    def started(self, chosen: QueuedJob, cards_of: CardsOf = one_card) -> tuple[int, ...]:
        """
        ``chosen`` got the GPU: every waiting job that comes before it in
        (class, priority, arrival) order has been bypassed once more, if it
        competes for one of its cards (a job on another card lost nothing).
        Returns those of its own class and priority, the ones whose turn it took.
        """
        cards = set(cards_of(chosen.consumer))
        # Asked once a consumer: 63 jobs waiting are a handful of consumers.
        competes: dict[str, bool] = {}
        ahead_of = []
        place = run_precedence(chosen)
        for other in self._waiters.values():
            if run_precedence(other.view) >= place:
                continue
            consumer = other.view.consumer
            if consumer not in competes:
                competes[consumer] = not cards.isdisjoint(cards_of(consumer))
            if competes[consumer]:
                other.view = attrs.evolve(other.view, bypassed=other.view.bypassed + 1)
                if (other.view.job_class, other.view.priority) == (
                        chosen.job_class, chosen.priority):
                    ahead_of.append(other.view.id)
        return tuple(ahead_of)

    def oldest_arrival(self) -> float | None:
        return min((w.view.arrived for w in self._waiters.values()), default=None)
