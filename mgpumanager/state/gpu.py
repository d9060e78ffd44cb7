"""
The GPU sampler: what NVML says about the managed cards, read off the reactor thread.

NVML calls block.  They are fast on a healthy driver, but a wedged driver can hang
them for minutes, and a daemon whose reactor is stuck in ``nvmlDeviceGetMemoryInfo``
answers nothing, ``/healthz`` included.  So every read runs in a dedicated
one-thread pool, bounded by a timeout; a read still stuck when the next tick comes
is not joined by another.  Without NVML (no driver, no card, no library) the sample
carries the error and the scheduler falls back to its budget.

Every managed card is read in the same read (:func:`~mgpumanager.state.reading.read_cards`).
The first managed card is *the* card of the one-card daemon: ``latest``, ``sample()`` and
``subscribe()`` are about it alone, so everything written for one card reads the same
values as before; ``latest_by_card``, ``sample_cards()`` and ``subscribe_cards()`` are
about every card.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mgpumanager.common.periodic import Periodic
from mgpumanager.config.cards import CardConfig
from mgpumanager.config.document import Config
from mgpumanager.state.reading import (
    MIB,
    CardsReading,
    GpuReading,
    Nvml,
    describe,
    read_cards,
    read_nvml,
)

__all__ = [
    "MIB",
    "BlockingRunner",
    "CardsSink",
    "GpuReading",
    "GpuSample",
    "GpuSampler",
    "Nvml",
    "NvmlTimeout",
    "SampleSink",
    "read_nvml",
]

log = Logger()

#: Runs a blocking callable somewhere off the reactor and fires with its result.
BlockingRunner = Callable[[Callable[[], Any]], "Deferred[Any]"]


class SampleSink(Protocol):
    """Anyone who wants every new sample (the registry, to attribute memory)."""

    def __call__(self, sample: GpuSample) -> None: ...


class CardsSink(Protocol):
    """Anyone who wants every new sample of every card, by card number."""

    def __call__(self, samples: Mapping[int, GpuSample]) -> None: ...


@attrs.frozen
class GpuSample:
    """
    The latest sampler result: a reading, an error, or (before the first tick)
    neither.  ``time`` is the POSIX time the read finished.
    """

    time: float | None = None
    reading: GpuReading | None = None
    err: str = ""

    @property
    def free_mib(self) -> int | None:
        return None if self.reading is None else self.reading.free_mib


class NvmlTimeout(Exception):
    """An NVML read did not return in time: a hung driver, most likely."""


class GpuSampler(Periodic):
    """
    Samples the managed cards every ``interval`` seconds and keeps the latest result.

    :param load_nvml: returns the ``pynvml`` module (or a stand-in); called in the
        worker thread, so an import failure is just another sample error.
    :param run_blocking: runs a blocking callable off the reactor
        (``deferToThreadPool`` over a one-thread pool in the daemon).
    :param clock: the reactor's time, for the loop and the read timeout.
    :param cards: the managed cards (``Config.cards``); by default the card at
        ``device_index`` alone.
    """

    def __init__(
        self,
        load_nvml: Callable[[], Nvml],
        run_blocking: BlockingRunner,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        device_index: int = 0,
        cards: Sequence[CardConfig] | None = None,
    ) -> None:
        self._load_nvml = load_nvml
        self._run_blocking = run_blocking
        self._clock = clock
        self._timeout = timeout
        self._cards: tuple[CardConfig, ...] = ()
        self._by_card: dict[int, GpuSample] = {}
        self._pending: Deferred[CardsReading] | None = None
        self._timer: IDelayedCall | None = None
        self._hung = False
        self._sinks: list[tuple[Callable[[Any], None], bool]] = []
        self._waiters: list[tuple[Deferred[Any], bool]] = []
        #: Cards NVML lists that the configuration does not manage.
        self.unmanaged_cards = 0
        self._told_unmanaged = False
        self.samples_taken = 0
        self.set_cards(cards if cards is not None else (CardConfig(index=device_index),))
        Periodic.__init__(self, self.sample, clock, interval)

    @property
    def cards(self) -> tuple[CardConfig, ...]:
        """The cards each read reads, the first one first."""
        return self._cards

    @property
    def latest(self) -> GpuSample:
        """The latest sample of the first managed card."""
        return self._by_card[self._cards[0].index]

    @latest.setter
    def latest(self, sample: GpuSample) -> None:
        self._by_card = {**self._by_card, self._cards[0].index: sample}

    @property
    def latest_by_card(self) -> Mapping[int, GpuSample]:
        """The latest sample of every managed card, by card number, in the file's order."""
        return MappingProxyType(self._by_card)

    def set_cards(self, cards: Sequence[CardConfig]) -> None:
        """
        Read ``cards`` from the next read on (a reload); a card that stays keeps
        its latest sample until then, a new one starts with none.
        """
        if not cards:
            raise ValueError("a sampler needs at least one card")
        self._cards = tuple(cards)
        self._by_card = {
            card.index: self._by_card.get(card.index, GpuSample()) for card in self._cards
        }

    def now(self) -> float:
        """The time on the clock that stamps the samples."""
        return self._clock.seconds()

    def free_mib_on(self, card: int) -> int | None:
        """A card's free memory in its latest sample, None without a reading."""
        sample = self.latest_by_card.get(card)
        return None if sample is None else sample.free_mib

    def latest_used_mib(self) -> int | None:
        """The card's used memory in the latest sample, None without a reading."""
        reading = self.latest.reading
        return None if reading is None else reading.used_mib

    def reconfigure(self, config: Config) -> None:
        """Sample the reloaded cards at the reloaded ``gpu.poll_interval_seconds``."""
        self.set_cards(config.cards)
        self.set_interval(config.gpu.poll_interval_seconds)

    def subscribe(self, sink: SampleSink) -> None:
        """Call ``sink`` with every new sample of the first managed card."""
        self._sinks.append((sink, False))

    def subscribe_cards(self, sink: CardsSink) -> None:
        """Call ``sink`` with every new sample of every card, by card number."""
        self._sinks.append((sink, True))

    def sample(self) -> Deferred[GpuSample]:
        """
        Take one sample now (the loop calls this; so does the scheduler when
        it waits for an unloaded consumer's memory to come back) and fire with
        the first managed card's.  Never fails.

        A read still under way is shared rather than joined by another; a read
        stuck past the timeout is reported as an error sample, and until its
        thread comes back, further samples answer at once with that error
        instead of queueing behind it.
        """
        return self._wait(per_card=False)

    def sample_cards(self) -> Deferred[Mapping[int, GpuSample]]:
        """Like :meth:`sample`, firing with every card's sample by card number."""
        return self._wait(per_card=True)

    def _wait(self, per_card: bool) -> Deferred[Any]:
        waiter: Deferred[Any] = Deferred()
        self._waiters.append((waiter, per_card))
        if self._pending is None:
            # The timer first: a read that returns at once must find it to cancel.
            self._timer = self._clock.callLater(self._timeout, self._timed_out)
            pending = self._run_blocking(self._read)
            if not pending.called:
                self._pending = pending
            pending.addCallbacks(
                self._read_returned, lambda failure: self._read_returned(failure.value)
            )
        elif self._hung:
            self._flush_waiters()
        return waiter

    def _read_returned(self, outcome: CardsReading | BaseException) -> None:
        # Clear first: a waiter answered below may ask for the next sample at once.
        self._pending = None
        self._hung = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._record(outcome)

    def _timed_out(self) -> None:
        self._timer = None
        self._hung = True
        self._record(NvmlTimeout(f"NVML read timed out after {self._timeout:g} s"))

    def _read(self) -> CardsReading:
        return read_cards(self._load_nvml(), self._cards)

    def _record(self, outcome: CardsReading | BaseException) -> None:
        now = self._clock.seconds()
        if isinstance(outcome, CardsReading):
            self._count_unmanaged(outcome.device_count)
        by_card: dict[int, GpuSample] = {}
        for card in self._cards:
            found = (
                outcome.cards.get(card.index, "not read")
                if isinstance(outcome, CardsReading)
                else describe(outcome)
            )
            before = self._by_card.get(card.index, GpuSample())
            if isinstance(found, GpuReading):
                by_card[card.index] = GpuSample(time=now, reading=found)
                continue
            if not before.err:
                if card is self._cards[0]:
                    log.warn("GPU sampling failed: {err}", err=found)
                else:
                    log.warn("GPU sampling of card {card} failed: {err}", card=card.index,
                             err=found)
            by_card[card.index] = GpuSample(time=now, err=found)
        self._by_card = by_card
        self.samples_taken += 1
        for sink, per_card in self._sinks:
            try:
                sink(self.latest_by_card if per_card else self.latest)
            except Exception:
                log.failure("GPU sample subscriber failed")
        self._flush_waiters()

    def _count_unmanaged(self, device_count: int | None) -> None:
        if device_count is None:
            return
        self.unmanaged_cards = max(0, device_count - len(self._cards))
        if self.unmanaged_cards and not self._told_unmanaged:
            self._told_unmanaged = True
            log.info(
                "NVML lists {count} cards and {unmanaged} of them are not managed "
                "(name them in gpus to manage them)",
                count=device_count,
                unmanaged=self.unmanaged_cards,
            )

    def _flush_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter, per_card in waiters:
            waiter.callback(self.latest_by_card if per_card else self.latest)
