"""
Health probes: call every consumer's health route on a timer.

A consumer whose last probe failed is refused fast instead of making a client
wait for a connect timeout; a consumer that reports ``loaded`` or
``gpu_resident_mib`` in its health answer corrects our bookkeeping (it knows
better than we do after a crash or a manual restart).  Each consumer is probed
independently: one that hangs its health route delays no one else's probe.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.common.answers import JsonObject
from mgpumanager.common.periodic import Periodic
from mgpumanager.config.document import Config
from mgpumanager.consumers.adapters.base import Observation
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.state.registry import ConsumerState, Registry

log = Logger()

#: A health answer larger than this is not parsed for state; it is still healthy.
MAX_HEALTH_BODY = 64 * 1024


class HealthProber(Periodic):
    """
    :param control: calls the health routes, each within ``timeout`` seconds.
    :param clock: drives the loop and dates the probes.
    """

    def __init__(
        self,
        registry: Registry,
        control: ConsumerControl,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        adapters: Adapters | None = None,
    ) -> None:
        self._registry = registry
        self._adapters = adapters if adapters is not None else Adapters(registry.config)
        self._control = control
        self._clock = clock
        self._timeout = timeout
        self._in_flight: dict[str, list[Deferred[bool]]] = {}
        Periodic.__init__(self, self.probe_all, clock, interval)

    def reconfigure(self, config: Config) -> None:
        """Probe at the reloaded interval, each probe within the reloaded timeout."""
        self._timeout = config.probes.timeout_seconds
        self.set_interval(config.probes.interval_seconds)


    def probe_all(self) -> None:
        """
        Start a probe of every consumer not already being probed.  Returns at
        once, so the loop's rhythm never waits for a slow consumer.
        """
        for state in self._registry:
            if state.name not in self._in_flight:
                self.probe(state.name)

    def probe(self, name: str) -> Deferred[bool]:
        """
        Probe one consumer now (or join the probe under way); fires with
        whether it is healthy.  Never fails.
        """
        joined: Deferred[bool] = Deferred()
        waiters = self._in_flight.get(name)
        if waiters is not None:
            waiters.append(joined)
            return joined
        self._in_flight[name] = [joined]
        state = self._registry[name]
        started = state.lifecycle_changes, state.total_requests, state.active
        pending = Deferred.fromCoroutine(self._probe(state))
        pending.addCallbacks(
            lambda answer: self._record(state, started, answer, None),
            lambda failure: self._record(state, started, None, failure),
        )
        return joined

    async def _probe(self, state: ConsumerState) -> tuple[JsonObject | None, Observation | None]:
        route = state.config.health
        # Adapter defaults are applied at start-up: every consumer has one.
        assert route is not None, f"{state.name} has no health route"
        try:
            code, answer = await self._control.get_json(
                state.config, route.method, route.path, self._timeout, MAX_HEALTH_BODY
            )
        except ControlFailed as e:
            if e.timed_out:
                raise ProbeFailed(f"health probe timed out after {self._timeout:g} s") from None
            raise ProbeFailed(e.cause) from None
        if not 200 <= code < 300:
            raise ProbeFailed(f"health {route.path} answered HTTP {code}")
        adapter = self._adapters.of(state.config)
        try:
            observed = await adapter.observe(self._control, state.config, answer, self._timeout)
        except ControlFailed as e:
            # Healthy, but it would not say what it holds: keep what we knew.
            log.warn("{consumer}: {error}", consumer=state.name, error=e.message)
            observed = None
        return answer, observed

    def _record(
        self,
        state: ConsumerState,
        started: tuple[int, int, int],
        answer: tuple[JsonObject | None, Observation | None] | None,
        failure: Failure | None,
    ) -> None:
        state.last_probe = self._clock.seconds()
        healthy = failure is None
        if failure is None:
            if state.healthy is False:
                log.info("consumer {consumer} is healthy again", consumer=state.name)
            state.last_error = ""
            # A report is about a moment; it is kept only if that moment was a
            # quiet one: no load or unload since, no job running or started
            # meanwhile (a lazily loading consumer says "not loaded" mid-job).
            quiet = (state.lifecycle_changes, state.total_requests, 0)
            if answer is not None and started == quiet and state.active == 0:
                health, observed = answer
                if health is not None:
                    _apply_report(state, health)
                if observed is not None:
                    _apply_observation(state, observed)
        else:
            error = str(failure.value)
            if state.restartable:
                error = f"unit stopped to free the GPU ({error})"
            elif state.healthy is not False:
                log.warn(
                    "consumer {consumer} failed its health probe: {error}",
                    consumer=state.name,
                    error=error,
                )
            state.last_error = error
        state.healthy = healthy
        for waiter in self._in_flight.pop(state.name, []):
            waiter.callback(healthy)


class ProbeFailed(Exception):
    """The health probe failed; the message says how, without naming the call."""


def _apply_report(state: ConsumerState, answer: JsonObject) -> None:
    loaded = answer.get("loaded")
    if isinstance(loaded, bool):
        state.reported_loaded = loaded
    resident = answer.get("gpu_resident_mib")
    if isinstance(resident, int) and not isinstance(resident, bool) and resident >= 0:
        state.reported_resident_mib = resident
        state.note_resident_mib(resident)


def _apply_observation(state: ConsumerState, observed: Observation) -> None:
    """What the server's adapter read of its residency: it knows better than we do."""
    if observed.resident is not None:
        state.reported_loaded = observed.resident
    if observed.measured_mib is not None:
        state.reported_resident_mib = observed.measured_mib
        state.note_resident_mib(observed.measured_mib)
    if observed.models is not None:
        state.models = observed.models
    if observed.busy is not None:
        state.busy_elsewhere = observed.busy
