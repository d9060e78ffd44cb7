"""
Consumer lifecycle: make room on the card, then load the job's consumer.

Runs as the scheduler's ``prepare`` step, so always with the GPU lock held: no
consumer is ever unloaded while any job runs.  Each eviction is verified: an
unload route answering 200 is not proof that the memory came back (CUDA frees
it when the process's context goes), so we watch NVML until it does, and refuse
to load anything on top of memory that never returned.
"""

from __future__ import annotations

import collections
from typing import Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mgpumanager.common.errors import LOAD_FAILED, UNLOAD_FAILED, ApiError
from mgpumanager.config.document import Config
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.scheduling.eviction import Candidate, Fit, plan_step, why_no_room_needed
from mgpumanager.scheduling.telemetry import (
    FAILED,
    NO_TELEMETRY,
    NOT_VERIFIED,
    UNLOADED,
    Telemetry,
)
from mgpumanager.state.gpu import GpuSample, GpuSampler
from mgpumanager.state.registry import ConsumerState, Registry

log = Logger()

#: How many eviction decisions ``/v1/status`` keeps.
DECISIONS_KEPT = 20
#: An unload counts as verified once this share of the victim's memory is back...
RECOVERED_SHARE = 0.75
#: ...or once its own processes hold less than this share of it.
LEFTOVER_SHARE = 0.05


class HealthCheck(Protocol):
    """Probes a consumer now; fires with whether it answered healthy."""

    def __call__(self, name: str) -> Deferred[bool]: ...


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
        self._health_check = health_check
        self._pids = pids
        self._telemetry = telemetry
        self.evictions = 0
        self.failed_unloads = 0
        self.loads = 0
        self.failed_loads = 0
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=DECISIONS_KEPT)

    def reconfigure(self, config: Config) -> None:
        """Work to a reloaded configuration from the next step on."""
        self._config = config

    async def prepare(self, name: str) -> None:
        """The scheduler's ``prepare`` step: make room for ``name``, then load it."""
        state = self._registry[name]
        if why_no_room_needed(state) is None:
            await self._make_room(state)
        if not state.resident:
            await self._load(state)

    async def _make_room(self, target: ConsumerState) -> None:
        """Carry out :func:`~mgpumanager.scheduling.eviction.plan_step` until it stops."""
        evicted: list[str] = []
        # One view of the consumers for the whole step, whatever a reload does
        # meanwhile: the plan never names a consumer it cannot find.
        config = self._config
        states = {state.name: state for state in self._registry}
        while True:
            sample = await self._sampler.sample()
            if why_no_room_needed(target) is not None:
                return  # the fresh sample shows it loaded after all
            step = plan_step(
                config, list(states.values()), target, sample, evicted,
                self._registry.held_elsewhere_mib, self._adapters,
            )
            if step.fit.fits:
                return
            decision = Decision(
                time=self._clock.seconds(),
                target=target.name,
                fit=step.fit,
                candidates=step.candidates,
                victim=step.victim.name if step.victim else None,
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
                return
            log.info(
                "evicting {victim} for {target}: {why}",
                victim=step.victim.name,
                target=target.name,
                why=step.fit.why,
            )
            await self._evict(states[step.victim.name], sample, decision)
            evicted.append(step.victim.name)

    async def _evict(self, victim: ConsumerState, before: GpuSample, decision: Decision) -> None:
        started = self._clock.seconds()
        pids = self._pids.pids_of(victim.name)
        # What it held just before: the memory that must come back.  Not its
        # size (the most it ever held): a server that once held more would
        # never seem to give enough back.
        size = (
            victim.measured_resident_mib
            or victim.reported_resident_mib
            or victim.config.vram_resident_mib
            or victim.size_mib
        )
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
            recovered = await self._await_memory_back(size, before, pids)
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

    async def _await_memory_back(
        self, declared: int, before: GpuSample, pids: frozenset[int]
    ) -> int | bool | None:
        """
        Poll the card until the victim's memory is back: the recovered MiB,
        ``False`` if it never came back in time, ``None`` without NVML (after
        a fixed settle).
        """
        lifecycle = self._config.lifecycle
        baseline = before.reading
        if baseline is None:
            await self._sleep(lifecycle.settle_seconds)
            return None
        held_before = sum(baseline.processes.get(pid, 0) for pid in pids)
        deadline = self._clock.seconds() + lifecycle.verify_timeout_seconds
        while True:
            sample = await self._sampler.sample()
            reading = sample.reading
            if reading is not None:
                recovered = reading.free_mib - baseline.free_mib
                if recovered >= RECOVERED_SHARE * declared:
                    return max(recovered, 0)
                if held_before > 0:
                    # NVML sees the victim's own processes: trust that directly.
                    held_now = sum(reading.processes.get(pid, 0) for pid in pids)
                    if held_now < LEFTOVER_SHARE * max(declared, held_before):
                        return max(recovered, 0)
            if self._clock.seconds() >= deadline:
                return False
            await self._sleep(lifecycle.verify_interval_seconds)

    async def _load(self, state: ConsumerState) -> None:
        config = state.config
        lifecycle = self._config.lifecycle
        started = self._clock.seconds()
        try:
            timeout = lifecycle.load_timeout_seconds
            if config.load is not None:
                await self._control.call_route(config, config.load, timeout)
            elif config.systemd_unit is not None:
                deadline = self._clock.seconds() + timeout
                await self._control.systemctl("start", config.systemd_unit, timeout)
                await self._until_healthy(state.name, deadline)
        except ControlFailed as e:
            self.failed_loads += 1
            message = f"loading {state.name} failed: {e}"
            log.error("{message}", message=message)
            self._assume_loading(state)
            raise ApiError(LOAD_FAILED, message, state.name) from None
        except CancelledError:
            self._assume_loading(state)
            raise
        # With neither route nor unit the consumer cold-starts on the request.
        self.loads += 1
        self._telemetry.loaded(state.name, self._clock.seconds() - started)
        state.load_count += 1
        state.mark_loaded(True, self._clock.seconds())

    def _assume_loading(self, state: ConsumerState) -> None:
        """
        A load that failed or was abandoned may still be going on (systemd
        keeps starting the unit, a server keeps loading after our request is
        cut): count the consumer as loaded, so the next job unloads it rather
        than loads something on top of it.
        """
        if state.config.load is not None or state.config.systemd_unit is not None:
            state.mark_loaded(True, self._clock.seconds())

    async def _until_healthy(self, name: str, deadline: float) -> None:
        while not await self._health_check(name):
            if self._clock.seconds() >= deadline:
                raise ControlFailed("started, but never answered its health route")
            await self._sleep(self._config.lifecycle.verify_interval_seconds)

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self._clock, seconds, lambda: None)
