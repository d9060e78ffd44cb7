"""
Consumer lifecycle: make room on the job's cards, then load the job's consumer
(the load itself is :mod:`~mgpumanager.scheduling.loading`'s).

Runs as the scheduler's ``prepare`` step, so always with the job's card locks
held: no consumer is ever unloaded while a job runs on one of its cards.  Each
eviction is verified on every card the victim used: an unload route answering
200 is not proof that the memory came back (CUDA frees it when the process's
context goes), so we watch NVML until it does (:mod:`~mgpumanager.scheduling.verify`),
and refuse to load anything on top of memory that never returned.  Jobs on
different cards may prepare at the same time; their making of room takes turns,
so two of them never unload the same consumer (one on both their cards) at once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mgpumanager.common.errors import UNLOAD_FAILED, ApiError
from mgpumanager.config.document import Config
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.scheduling.eviction import (
    Candidate,
    Fit,
    pick_victim,
    plan_step,
    rank_candidates,
    why_no_room_needed,
)
from mgpumanager.scheduling.loading import HealthCheck, Loader
from mgpumanager.scheduling.telemetry import (
    FAILED,
    NO_TELEMETRY,
    NOT_VERIFIED,
    UNLOADED,
    Telemetry,
)
from mgpumanager.scheduling.verify import held_before_unload, wait_for_memory_back
from mgpumanager.state.gpu import GpuSample, GpuSampler
from mgpumanager.state.registry import ConsumerState, Registry

log = Logger()

#: How many eviction decisions ``/v1/status`` keeps.
DECISIONS_KEPT = 20


class PidLookup(Protocol):
    """The processes on this host that belong to a consumer, when known."""

    def pids_of(self, name: str) -> frozenset[int]: ...


@attrs.define
class Decision:
    """One make-room step, kept for ``/v1/status`` and logged."""

    time: float
    target: str
    fit: Fit
    candidates: list[Candidate]
    victim: str | None
    outcome: str = "pending"
    unload_ms: int | None = None
    recovery_ms: int | None = None
    recovered_mib: int | None = None
    #: "evict" for a make-room step; "timeout" for work given up on (the
    #: scheduler's own log adds "pick" entries beside these).
    type: str = "evict"
    #: The card the step made room on (None: no card, a timeout).
    card: int | None = None


class Lifecycle:
    """
    :param control: calls load and unload routes, and ``systemctl`` for
        consumers with a systemd unit.
    :param health_check: probes a consumer (after ``systemctl start``).
    :param pids: maps consumers to their processes, for per-process checks.
    :param telemetry: told of each unload, eviction and load.
    :param adapters: each consumer's adapter (how to unload it).
    """

    def __init__(
        self,
        config: Config,
        registry: Registry,
        sampler: GpuSampler,
        control: ConsumerControl,
        clock: IReactorTime,
        health_check: HealthCheck,
        pids: PidLookup,
        telemetry: Telemetry = NO_TELEMETRY,
        adapters: Adapters | None = None,
    ) -> None:
        self._config = config
        self._adapters = adapters if adapters is not None else Adapters(config)
        self._registry = registry
        self._sampler = sampler
        self._control = control
        self._clock = clock
        self._pids = pids
        self._telemetry = telemetry
        self._loader = Loader(config, control, clock, health_check, telemetry)
        self.evictions = 0
        self.failed_unloads = 0
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=DECISIONS_KEPT)
        self._making_room = DeferredLock()

    def reconfigure(self, config: Config) -> None:
        """Work to a reloaded configuration from the next step on."""
        self._config = config
        self._loader.reconfigure(config)

    @property
    def loads(self) -> int:
        """Loads that succeeded, for ``/v1/status``."""
        return self._loader.loads

    @property
    def failed_loads(self) -> int:
        """Loads whose route or unit failed, for ``/v1/status``."""
        return self._loader.failed_loads

    def prepare(self, name: str) -> Deferred[None] | None:
        """
        The scheduler's ``prepare`` step: make room for ``name``, then load it.
        None when it is loaded already, as for nearly every job: nothing to
        wait for, so the job starts in the same call.
        """
        state = self._registry[name]
        if state.resident:
            return None
        return Deferred.fromCoroutine(self._prepare(state))

    async def _prepare(self, state: ConsumerState) -> None:
        if why_no_room_needed(state) is None:
            await self._making_room.acquire()
            try:
                await self._make_room(state)
            finally:
                self._making_room.release()
        if not state.resident:
            await self._loader.load(state)

    async def _make_room(self, target: ConsumerState) -> None:
        """
        Carry out :func:`~mgpumanager.scheduling.eviction.plan_step` on each of
        the target's cards until it stops there.
        """
        evicted: list[str] = []
        # One view of the consumers for the whole step, whatever a reload does
        # meanwhile: the plan never names a consumer it cannot find.
        config = self._config
        states = {state.name: state for state in self._registry}
        for card in target.config.cards:
            if not await self._make_room_on(card, target, config, states, evicted):
                return

    async def _make_room_on(
        self,
        card: int,
        target: ConsumerState,
        config: Config,
        states: dict[str, ConsumerState],
        evicted: list[str],
    ) -> bool:
        """Make room on one card; whether to go on to the target's next card."""
        while True:
            samples = await self._sampler.sample_cards()
            sample = samples.get(card, GpuSample())
            if why_no_room_needed(target) is not None:
                return False  # the fresh sample shows it loaded after all
            step = plan_step(
                config, list(states.values()), target, sample, evicted,
                self._registry.held_elsewhere_on(card), self._adapters, card,
            )
            if step.fit.fits:
                return True
            decision = Decision(
                time=self._clock.seconds(),
                target=target.name,
                fit=step.fit,
                candidates=step.candidates,
                victim=step.victim.name if step.victim else None,
                card=card,
            )
            self.decisions.append(decision)
            if step.victim is None:
                decision.outcome = f"{step.stop}; proceeding"
                log.warn(
                    "{target} may not fit ({why}) and {outcome}",
                    target=target.name,
                    why=step.fit.why,
                    outcome=decision.outcome,
                )
                return True
            log.info(
                "evicting {victim} for {target}: {why}",
                victim=step.victim.name,
                target=target.name,
                why=step.fit.why,
            )
            await self._evict(states[step.victim.name], samples, decision)
            evicted.append(step.victim.name)

    async def _evict(
        self, victim: ConsumerState, before: Mapping[int, GpuSample], decision: Decision
    ) -> None:
        started = self._clock.seconds()
        pids = self._pids.pids_of(victim.name)
        sizes = held_before_unload(victim)
        try:
            timeout = self._config.lifecycle.unload_timeout_seconds
            adapter = self._adapters.of(victim.config)
            await adapter.unload(self._control, victim, self._clock, timeout)
        except ControlFailed as e:
            self._telemetry.evicted(victim.name, FAILED)
            self._unload_failed(victim, decision, f"unloading {victim.name} failed: {e}")
        except CancelledError:
            decision.outcome = "cancelled during the unload"
            raise
        self.evictions += 1
        victim.unload_count += 1
        victim.mark_loaded(False, self._clock.seconds())
        unloaded = self._clock.seconds()
        decision.unload_ms = round((unloaded - started) * 1000)
        self._telemetry.unloaded(victim.name, unloaded - started)
        try:
            recovered = await wait_for_memory_back(
                self._sampler, self._clock, self._config.lifecycle, sizes, before, pids
            )
        except CancelledError:
            decision.outcome = "unloaded; cancelled while waiting for the memory"
            raise
        decision.recovery_ms = round((self._clock.seconds() - unloaded) * 1000)
        if recovered is False:
            # Its memory is still on the card: as far as making room goes, it is
            # still loaded, so no retry loads anything on top of it.
            victim.mark_loaded(True, self._clock.seconds())
            self._telemetry.evicted(victim.name, FAILED)
            self._unload_failed(
                victim,
                decision,
                f"unloaded {victim.name}, but its memory did not come back within "
                f"{self._config.lifecycle.verify_timeout_seconds:g} s",
            )
        decision.recovered_mib = recovered if isinstance(recovered, int) else None
        self._telemetry.evicted(victim.name, UNLOADED if recovered is not None else NOT_VERIFIED)
        decision.outcome = "unloaded" + ("" if recovered is not None else " (settled, no NVML)")
        log.info(
            "evicted {victim} for {target} in {unload_ms} ms, memory back after "
            "{recovery_ms} ms",
            victim=victim.name,
            target=decision.target,
            unload_ms=decision.unload_ms,
            recovery_ms=decision.recovery_ms,
        )

    async def clear_card(
        self,
        card: int,
        why: str,
        enough: Callable[[GpuSample], bool] = lambda sample: False,
        kind: str = "yield",
    ) -> list[str]:
        """
        Unload the consumers resident on ``card``, least recently used first,
        each verified on every card it uses, until none is left or ``enough``
        holds for the card's fresh sample; the consumers unloaded.  For a yield
        to a guest or a reclaim of memory; the caller holds the card's lock.

        :param kind: the decisions' ``type``.
        :raises ApiError: ``unload_failed``, as a job's making of room would.
        """
        unloaded: list[str] = []
        await self._making_room.acquire()
        try:
            states = {state.name: state for state in self._registry}
            while True:
                samples = await self._sampler.sample_cards()
                sample = samples.get(card, GpuSample())
                if enough(sample):
                    break
                candidates = rank_candidates(
                    self._config, "", states.values(), unloaded, self._adapters, card
                )
                victim = pick_victim(candidates)
                if victim is None:
                    break
                fit = Fit(False, "skip", 0, sample.free_mib, why)
                decision = Decision(self._clock.seconds(), f"card {card}", fit, candidates,
                                    victim.name, type=kind, card=card)
                self.decisions.append(decision)
                log.info("{kind} on card {card}: unloading {victim} ({why})",
                         kind=kind, card=card, victim=victim.name, why=why)
                await self._evict(states[victim.name], samples, decision)
                unloaded.append(victim.name)
        finally:
            self._making_room.release()
        return unloaded

    def record(self, kind: str, card: int, why: str, outcome: str) -> None:
        """A card-wide step for the decision log (a yield, a resume)."""
        self.decisions.append(
            Decision(self._clock.seconds(), f"card {card}", Fit(True, "skip", 0, None, why), [],
                     None, outcome=outcome, type=kind, card=card)
        )

    def record_timeout(self, consumer: str, work: str, seconds: float) -> None:
        """A job held the GPU for its consumer's whole completion timeout: say so."""
        why = f"{work} still running after {seconds:g} s: deleted from the queue and interrupted"
        log.warn("{consumer}: {why}", consumer=consumer, why=why)
        self.decisions.append(
            Decision(
                time=self._clock.seconds(),
                target=consumer,
                fit=Fit(False, "skip", 0, None, why),
                candidates=[],
                victim=None,
                outcome="timeout",
                type="timeout",
            )
        )

    def _unload_failed(self, victim: ConsumerState, decision: Decision, message: str) -> None:
        self.failed_unloads += 1
        decision.outcome = message
        log.error("{message}; nothing is loaded on top of it", message=message)
        raise ApiError(UNLOAD_FAILED, message, victim.name)
