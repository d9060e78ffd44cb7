"""
What the daemon knows about each consumer right now.

Configuration says what a consumer *is*; the registry says what it is *doing*:
whether its last health probe passed, whether we believe its model is on the card,
how much memory it was measured to hold, when it last finished a job.  The
scheduler's decisions and ``/v1/status`` both read this one place.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping

import attrs
from twisted.logger import Logger

from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.state.gpu import GpuReading
from mgpumanager.state.holding import RELEASED_KEPT, Holder, ReleasedHolder, release_rule

log = Logger()

#: A consumer's processes on this host, when known (the attributor's map).
PidsOf = Callable[[str], frozenset[int]]

#: The time and the card's used MiB now (None without a reading).
CardNow = Callable[[], tuple[float, int | None]]

#: Share of its declared VRAM a consumer's processes must hold to count as loaded.
RESIDENT_SHARE = 0.5


@attrs.frozen
class ModelResidency:
    """One model a server holds on the card (Ollama's ``/api/ps``)."""

    name: str
    size_vram_mib: int
    expires_at: str | None = None


@attrs.define
class ConsumerState:
    """
    The live state of one consumer.  Mutable, and only ever touched from the
    reactor thread.

    ``healthy`` is ``None`` until the first probe completes: a consumer never
    probed is tried rather than refused.
    """

    config: ConsumerConfig
    #: Our own bookkeeping: loaded at start, or by us since, and not unloaded by us.
    believed_loaded: bool
    healthy: bool | None = None
    last_probe: float | None = None
    last_error: str = ""
    #: What the consumer's own health answer said, when it says (cleared by
    #: our own loads and unloads, which it may not have seen yet).
    reported_loaded: bool | None = None
    reported_resident_mib: int | None = None
    #: What NVML attributes to the consumer's processes, when we can tell: on
    #: the card where they hold most (on one card: on that card).
    measured_resident_mib: int | None = None
    #: What they hold on each card read, by card number, when we can tell.
    measured_by_card: Mapping[int, int] | None = None
    measured_at: float | None = None
    peak_resident_mib: int = 0
    #: The models it says it holds, for servers that hold several (Ollama).
    models: tuple[ModelResidency, ...] | None = None
    #: Its own queue holds work that did not come through us (ComfyUI).
    busy_elsewhere: bool = False
    active: int = 0
    total_requests: int = 0
    last_used: float | None = None
    load_count: int = 0
    unload_count: int = 0
    #: When we last loaded or unloaded it, and how many times we have: a probe
    #: report from before the latest change is stale.
    lifecycle_changed_at: float = 0.0
    lifecycle_changes: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def resident(self) -> bool:
        """
        The verdict on whether the model is on the card.  The card itself is the best witness:
        when NVML attributes memory to the consumer's processes, holding at
        least half its declared size means loaded, whatever anyone says.  Next
        comes the consumer's own report, then our bookkeeping, which can only
        guess (a crash, a manual restart).
        """
        declared = self.config.vram_resident_mib
        measured = self.measured_resident_mib
        # A measurement from before our latest load or unload describes the past.
        fresh = self.measured_at is not None and self.measured_at > self.lifecycle_changed_at
        if measured is not None and fresh and declared > 0:
            return measured >= RESIDENT_SHARE * declared
        if self.reported_loaded is not None:
            return self.reported_loaded
        return self.believed_loaded

    @property
    def gpu_resident_mib(self) -> int:
        """Best knowledge of what it holds: measured, else reported, else declared."""
        if self.measured_resident_mib is not None:
            return self.measured_resident_mib
        if self.reported_resident_mib is not None:
            return self.reported_resident_mib
        return self.config.vram_resident_mib if self.resident else 0

    @property
    def gpu_resident_mib_by_card(self) -> dict[int, int]:
        """
        Best knowledge of what it holds on each of its cards (and on any other
        card where its processes were measured holding memory).  On one card,
        ``{card: gpu_resident_mib}``.  Unmeasured on several cards, its
        declared size on each while it is resident: a server's own report is
        one number that cannot be split between cards.
        """
        measured = self.measured_by_card
        if measured is not None and self.measured_resident_mib is not None:
            by_card = {card: measured.get(card, 0) for card in self.config.cards}
            by_card.update((card, mib) for card, mib in measured.items() if mib > 0)
            return by_card
        cards = self.config.cards
        if len(cards) == 1:
            return {cards[0]: self.gpu_resident_mib}
        resident = self.resident
        return {card: self.config.vram_mib_on(card) if resident else 0 for card in cards}

    @property
    def size_mib(self) -> int:
        """
        What it takes on the card, as a victim and as a target: the largest
        of its declared size, what it holds now and the most it ever held.
        A declaration of 0 stops meaning "never make room" once it has run.
        """
        now = self.measured_resident_mib or self.reported_resident_mib or 0
        return max(self.config.vram_resident_mib, now, self.peak_resident_mib)

    @property
    def restartable(self) -> bool:
        """
        A consumer whose systemd unit we stopped is expected to fail its
        probes; the scheduler starts it again, so it is not refused as down.
        """
        return self.config.systemd_unit is not None and not self.resident

    def size_on(self, card: int) -> int:
        """
        What it takes on ``card``, as a victim and as a target: :attr:`size_mib`
        when it uses that card alone; else the larger of its declared size there
        and what it was measured holding there.
        """
        cards = self.config.cards
        if card not in cards:
            return 0
        if len(cards) == 1:
            return self.size_mib
        measured = self.measured_by_card.get(card, 0) if self.measured_by_card else 0
        return max(self.config.vram_mib_on(card), measured)

    def mark_loaded(self, loaded: bool, now: float) -> None:
        """Record our own load/unload; a stale report must not contradict it."""
        self.believed_loaded = loaded
        self.lifecycle_changed_at = now
        self.lifecycle_changes += 1
        self.reported_loaded = None
        self.reported_resident_mib = None
        self.models = None

    def note_resident_mib(self, mib: int) -> None:
        self.peak_resident_mib = max(self.peak_resident_mib, mib)

class Registry:
    """
    All consumers' states, by name, in name order; and the holders of memory
    that a reload removed.

    :param pids_of: a consumer's processes, so that a removed one's memory is
        seen to go; none known by default.
    :param card_now: the time and the card's used MiB now (None without a
        reading): where a removed holder without processes starts counting
        the card's drop.
    """

    def __init__(
        self,
        config: Config,
        pids_of: PidsOf | None = None,
        card_now: CardNow | None = None,
    ) -> None:
        self.config = config
        self._pids_of = pids_of or _no_pids
        self._card_now = card_now or _no_card
        self._states = {
            name: _fresh_state(consumer) for name, consumer in config.consumers.items()
        }
        self.holders: dict[str, Holder] = {}
        #: The latest holders let go, and by which rule, newest last.
        self.released_holders: deque[ReleasedHolder] = deque(maxlen=RELEASED_KEPT)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded configuration (see :meth:`replace_consumers`), and log the removals."""
        now, card_used_mib = self._card_now()
        for name in self.replace_consumers(config, self._pids_of, now, card_used_mib):
            holder = self.holders.get(name)
            log.info(
                "reload removed consumer {consumer}{held}",
                consumer=name,
                held="" if holder is None else
                f"; its {holder.size_mib} MiB count in the budget until the card shows them gone",
            )

    def replace_consumers(
        self,
        config: Config,
        pids_of: PidsOf,
        now: float = 0.0,
        card_used_mib: int | None = None,
    ) -> list[str]:
        """
        Take a reloaded configuration; return the consumers it removed.  A
        consumer that stays keeps its residency and counters unless its
        ``url`` or ``adapter`` changed (then it is another server); a removed
        one that is resident becomes a :class:`Holder`.

        :param now: when, for the holders' verify timeout.
        :param card_used_mib: the card's used memory now, if a reading has it:
            where a holder without processes starts counting the drop.
        """
        states: dict[str, ConsumerState] = {}
        for name, consumer in config.consumers.items():
            old = self._states.get(name)
            if old is None or (old.config.url, old.config.adapter) != (
                consumer.url,
                consumer.adapter,
            ):
                states[name] = _fresh_state(consumer)
            else:
                old.config = consumer
                states[name] = old
        removed = [name for name in self._states if name not in states]
        for name in removed:
            state = self._states[name]
            if state.resident and state.size_mib > 0:
                self.holders[name] = Holder(
                    name, state.size_mib, pids_of(name), now, card_used_mib,
                    frozenset(state.config.cards),
                )
        self.config = config
        self._states = states
        return removed

    @property
    def held_elsewhere_mib(self) -> int:
        """Memory the budget must count that no consumer of ours holds."""
        return sum(holder.size_mib for holder in self.holders.values())

    def held_elsewhere_on(self, card: int) -> int:
        """What :attr:`held_elsewhere_mib` holds on ``card``."""
        return sum(holder.size_mib for holder in self.holders.values() if card in holder.cards)

    def release_holders(self, processes: Mapping[int, int], now: float = 0.0) -> list[str]:
        """
        Forget the holders whose processes the card (``processes``: MiB by
        pid, from NVML) shows holding under 5 % of their memory; return them.
        """
        reading = GpuReading("", 0, 0, 0, processes)
        return [
            holder.name
            for holder, _ in self.settle_holders(reading, now, verify_timeout=math.inf)
        ]

    def settle_holders(
        self, reading: GpuReading | None, now: float, verify_timeout: float
    ) -> list[tuple[Holder, str]]:
        """
        Forget the holders the card (``reading``, None after a failed read)
        shows gone, or whose verify timeout passed; return each with the rule
        that let it go (:func:`~mgpumanager.state.holding.release_rule`).
        """
        released = []
        for holder in list(self.holders.values()):
            if holder.card_used_mib is None and reading is not None and not holder.pids:
                # No reading at the removal: the first one since is the baseline.
                holder = self.holders[holder.name] = attrs.evolve(
                    holder, card_used_mib=reading.used_mib
                )
            rule = release_rule(holder, reading, now, verify_timeout)
            if rule is not None:
                del self.holders[holder.name]
                self.released_holders.append(
                    ReleasedHolder(holder.name, holder.size_mib, rule, now)
                )
                released.append((holder, rule))
        return released

    def __getitem__(self, name: str) -> ConsumerState:
        return self._states[name]

    def __contains__(self, name: object) -> bool:
        return name in self._states

    def __iter__(self) -> Iterator[ConsumerState]:
        return iter(self._states.values())



def _no_pids(name: str) -> frozenset[int]:
    return frozenset()


def _fresh_state(consumer: ConsumerConfig) -> ConsumerState:
    return ConsumerState(config=consumer, believed_loaded=consumer.initially_resident())


def _no_card() -> tuple[float, int | None]:
    return 0.0, None
