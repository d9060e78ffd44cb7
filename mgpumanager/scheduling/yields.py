"""
Cards yielded to guests: a game, a 3D app or someone's training run wants a
card's memory for a while.

A yield holds the card as a job would (:class:`~mgpumanager.scheduling.holds.CardHolds`): it
waits for the job running on the card to end, never interrupting it, then
unloads every consumer resident on the card, each verified, and only then is
the card the guest's.  Until it resumes, jobs that need the card wait in the
queue (their queue timeouts still apply) while other cards go on.  A yield
with ``seconds`` ends by itself; one for the guests the card's samples show
(``reason: guest``) ends when they leave (:mod:`mgpumanager.scheduling.reclaim`).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.common.errors import YIELD_GIVEN_UP, ApiError
from mgpumanager.config.document import Config
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.scheduler import GpuScheduler

log = Logger()


@attrs.frozen
class Yielded:
    """A card held for a guest: why, since when, and until when (None: until resumed)."""

    reason: str
    since: float
    until: float | None
    #: Yielded by the daemon itself for the guests it saw, not by a person.
    auto: bool = False


class CardYields:
    """
    Every card's yield: held, being taken, or none.

    :param free_mib: a card's free memory now, as the latest sample says
        (None without NVML), for the yield's answer.
    """

    def __init__(
        self,
        config: Config,
        scheduler: GpuScheduler,
        lifecycle: Lifecycle,
        clock: IReactorTime,
        free_mib: Callable[[int], int | None] = lambda card: None,
    ) -> None:
        self._cards = config.card_indexes
        self._scheduler = scheduler
        self._lifecycle = lifecycle
        self._clock = clock
        self._free_mib = free_mib
        self._held: dict[int, Yielded] = {}
        self._taking: dict[int, Deferred[Yielded]] = {}
        self._waiting: dict[int, list[Deferred[Yielded]]] = {}
        self._timers: dict[int, IDelayedCall] = {}

    def of(self, card: int) -> Yielded | None:
        """The card's yield, once held."""
        return self._held.get(card)

    def all_yielded(self) -> bool:
        """Whether every managed card is held for guests (the host can take no job)."""
        return bool(self._cards) and all(card in self._held for card in self._cards)

    def free_mib(self, card: int) -> int | None:
        return self._free_mib(card)

    def reconfigure(self, config: Config) -> None:
        """Manage a reloaded configuration's cards; a card it drops is given back."""
        self._cards = config.card_indexes
        for card in list(self._held):
            if card not in self._cards:
                self.resume(card, "the card is no longer managed")

    def yield_card(
        self, card: int, seconds: float | None = None, reason: str = "", auto: bool = False
    ) -> Deferred[Yielded]:
        """
        Hold ``card`` for a guest; fires once it is (see the module), with the
        yield.  Asked again while held: the same yield, with the new end when
        ``seconds`` is given.  Cancelling it gives up waiting, not the yield;
        a yield resumed before it was held fails its askers with
        ``yield_given_up``.
        """
        held = self._held.get(card)
        if held is not None:
            if seconds is not None:
                held = self._held[card] = attrs.evolve(held, until=self._clock.seconds() + seconds)
                self._scheduler.holds.held_until(card, held.until)
                self._end_after(card, seconds)
            return succeed(held)
        # A Deferred of its own for each asker: one that stops waiting (its
        # client left) gives up waiting, not the yield, which others may be
        # waiting for too; resume gives a yield up.  Registered first: taking
        # the card can be over at once (nothing runs on it, nothing to unload).
        asker: Deferred[Yielded] = Deferred()
        self._waiting.setdefault(card, []).append(asker)
        if card not in self._taking:
            taking = self._taking[card] = Deferred.fromCoroutine(
                self._take(card, seconds, reason or "yielded", auto)
            )
            taking.addBoth(self._taken, card)
        return asker

    async def _take(self, card: int, seconds: float | None, reason: str, auto: bool) -> Yielded:
        since = self._clock.seconds()
        log.info("yielding card {card} ({reason}): waiting for its running job", card=card,
                 reason=reason)
        await self._scheduler.holds.hold(card)
        try:
            unloaded = await self._lifecycle.clear_card(card, f"yield: {reason}")
        except BaseException:
            self._scheduler.holds.release(card)
            raise
        now = self._clock.seconds()
        held = Yielded(reason, now, None if seconds is None else now + seconds, auto)
        self._held[card] = held
        self._scheduler.holds.held_until(card, held.until)
        if seconds is not None:
            self._end_after(card, seconds)
        outcome = f"held for the guest after {now - since:.1f} s"
        if unloaded:
            outcome += f"; unloaded {', '.join(unloaded)}"
        self._lifecycle.record("yield", card, reason, outcome)
        log.info("card {card} is yielded ({reason}): {outcome}", card=card, reason=reason,
                 outcome=outcome)
        return held

    def _taken(self, result: Yielded | Failure, card: int) -> None:
        self._taking.pop(card, None)
        if isinstance(result, Failure) and result.check(CancelledError):
            result = Failure(ApiError(
                YIELD_GIVEN_UP, f"card {card} was resumed before it was held for the guest"
            ))
        for asker in self._waiting.pop(card, []):
            if asker.called:
                continue
            if isinstance(result, Failure):
                asker.errback(result)
            else:
                asker.callback(result)

    def resume(self, card: int, why: str = "resumed") -> bool:
        """
        Give the card back to the jobs (a yield still being taken is given
        up); whether there was anything to give back.
        """
        taking = self._taking.pop(card, None)
        if taking is not None:
            taking.cancel()
            return True
        held = self._held.pop(card, None)
        if held is None:
            return False
        timer = self._timers.pop(card, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._scheduler.holds.given_back(card)
        self._scheduler.holds.release(card)
        self._lifecycle.record("resume", card, why, f"yielded for "
                               f"{self._clock.seconds() - held.since:.0f} s ({held.reason})")
        log.info("card {card} is back to the jobs ({why})", card=card, why=why)
        return True

    def _end_after(self, card: int, seconds: float) -> None:
        timer = self._timers.pop(card, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[card] = self._clock.callLater(
            seconds, self.resume, card, f"its {seconds:g} s are over"
        )
