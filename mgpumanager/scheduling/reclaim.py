"""
What the daemon does on its own about guests on a card, from every sample:

- **reclaim** (``guest_headroom_mib``): while a card's free memory is below the
  headroom and guests hold memory on it, idle consumers on that card are
  unloaded, least recently used first, until it is not or none is left;
  taking the card like a job, so never under a running one;
- **auto-yield** (``yield_to_guests_mib``): when guests hold at least that much
  on a card in two consecutive samples, the card is yielded with reason
  ``guest``, until they hold less for ``yield_cooldown_seconds``.

Both need NVML to see guests; without it they are off, and the log says so once.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.config.cards import CardConfig
from mgpumanager.config.document import Config
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.yields import CardYields
from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.guests import GuestWatch
from mgpumanager.state.registry import Registry

log = Logger()

#: Samples in a row with guests over ``yield_to_guests_mib`` before a card is yielded.
SAMPLES_OVER = 2


class GuestKeeper:
    """Reclaim and auto-yield, per card (see the module)."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        guests: GuestWatch,
        yields: CardYields,
        scheduler: GpuScheduler,
        lifecycle: Lifecycle,
        clock: IReactorTime,
    ) -> None:
        self._config = config
        self._registry = registry
        self._guests = guests
        self._yields = yields
        self._scheduler = scheduler
        self._lifecycle = lifecycle
        self._clock = clock
        self._over: dict[int, int] = {}
        self._below_since: dict[int, float] = {}
        self._reclaiming: set[int] = set()
        self._auto_yielding: set[int] = set()
        self._said_off = False

    def reconfigure(self, config: Config) -> None:
        """Follow the reloaded thresholds from the next sample on."""
        self._config = config

    def on_cards(self, samples: Mapping[int, GpuSample]) -> None:
        """A sampler subscriber; never raises (it runs in the sampler's loop)."""
        try:
            self._on_cards(samples)
        except Exception:
            log.failure("acting on the cards' guests failed")

    def _on_cards(self, samples: Mapping[int, GpuSample]) -> None:
        wanted = [c for c in self._config.cards
                  if c.settings.guest_headroom_mib > 0 or c.settings.yield_to_guests_mib > 0]
        if not wanted:
            return
        if not self._guests.visible:
            if not self._said_off:
                self._said_off = True
                log.warn("reclaim and auto-yield are off: without NVML no guest on a card "
                         "can be seen (a yield asked for still works)")
            return
        now = self._clock.seconds()
        for card in wanted:
            sample = samples.get(card.index)
            if sample is None or sample.reading is None:
                continue
            guest_mib = self._guests.mib_on(card.index)
            self._auto_yield(card, guest_mib, now)
            self._reclaim(card, sample, guest_mib)

    def _auto_yield(self, card: CardConfig, guest_mib: int, now: float) -> None:
        threshold = card.settings.yield_to_guests_mib
        if threshold <= 0:
            return
        index = card.index
        if guest_mib >= threshold:
            self._below_since.pop(index, None)
            self._over[index] = self._over.get(index, 0) + 1
            if (self._over[index] >= SAMPLES_OVER and self._yields.of(index) is None
                    and index not in self._auto_yielding):
                self._auto_yielding.add(index)
                log.info("guests hold {mib} MiB on card {card}: yielding it to them",
                         mib=guest_mib, card=index)
                asked = self._yields.yield_card(index, reason="guest", auto=True)
                asked.addBoth(self._auto_yielded, index)
            return
        self._over[index] = 0
        held = self._yields.of(index)
        if held is None or not held.auto:
            return
        since = self._below_since.setdefault(index, now)
        if now - since >= card.settings.yield_cooldown_seconds:
            del self._below_since[index]
            self._yields.resume(index, f"its guests hold under {threshold} MiB")

    def _auto_yielded(self, result: object, card: int) -> None:
        self._auto_yielding.discard(card)
        if isinstance(result, Failure):
            log.failure("yielding card {card} to its guests failed", result, card=card)

    def _reclaim(self, card: CardConfig, sample: GpuSample, guest_mib: int) -> None:
        headroom = card.settings.guest_headroom_mib
        reading = sample.reading
        index = card.index
        if (headroom <= 0 or guest_mib <= 0 or reading is None or reading.free_mib >= headroom
                or index in self._reclaiming or self._yields.of(index) is not None
                or not self._idle_on(index)):
            return
        self._reclaiming.add(index)
        done = Deferred.fromCoroutine(self._reclaim_card(index, headroom))
        done.addErrback(lambda failure: log.failure(
            "reclaiming card {card} for its guests failed", failure, card=index))

    def _idle_on(self, card: int) -> bool:
        """Whether any consumer on ``card`` could be unloaded now."""
        return any(
            state.resident and card in state.config.cards and not state.active
            and not state.config.vram_managed
            for state in self._registry
        )

    async def _reclaim_card(self, card: int, headroom: int) -> None:
        why = f"guests hold memory and free is under the {headroom} MiB headroom"

        def enough(sample: GpuSample) -> bool:
            reading = sample.reading
            return (reading is None or reading.free_mib >= headroom
                    or self._guests.mib_on(card) == 0)

        try:
            await self._scheduler.holds.hold(card)
            try:
                await self._lifecycle.clear_card(card, why, enough, kind="reclaim")
            finally:
                self._scheduler.holds.release(card)
        finally:
            self._reclaiming.discard(card)
