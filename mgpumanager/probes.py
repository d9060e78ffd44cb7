"""
Health probes: call every consumer's health route on a timer.

A consumer whose last probe failed is refused fast instead of making a client
wait for a connect timeout; a consumer that reports ``loaded`` or
``gpu_resident_mib`` in its health answer corrects our bookkeeping (it knows
better than we do after a crash or a manual restart).  Each consumer is probed
independently: one that hangs its health route delays no one else's probe.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.bodies import read_body
from mgpumanager.deadline import TimedOut, within
from mgpumanager.errors import describe_connection_error
from mgpumanager.registry import ConsumerState, Registry

log = Logger()

#: A health answer larger than this is not parsed for state; it is still healthy.
MAX_HEALTH_BODY = 64 * 1024


class HealthProber:
    """
    :param client: a treq ``HTTPClient`` (or ``StubTreq`` in tests).
    :param clock: bounds each probe by ``timeout`` seconds and drives the loop.
    """

    def __init__(
        self,
        registry: Registry,
        client: Any,
        clock: IReactorTime,
        interval: float,
        timeout: float,
    ) -> None:
        self._registry = registry
        self._client = client
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._in_flight: dict[str, list[Deferred[bool]]] = {}
        self._loop = LoopingCall(self.probe_all)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

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
        pending = within(
            Deferred.fromCoroutine(self._probe(state)), self._timeout, self._clock, "health probe"
        )
        pending.addCallbacks(
            lambda answer: self._record(state, started, answer, None),
            lambda failure: self._record(state, started, None, failure),
        )
        return joined

    async def _probe(self, state: ConsumerState) -> dict[str, Any] | None:
        route = state.config.health
        response = await self._client.request(
            route.method,
            state.config.url + route.path,
            unbuffered=True,
            allow_redirects=False,
        )
        body = await read_body(response, MAX_HEALTH_BODY)
        if not 200 <= response.code < 300:
            raise ProbeFailed(f"health {route.path} answered HTTP {response.code}")
        if body is None:
            return None
        try:
            answer = json.loads(body)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def _record(
        self,
        state: ConsumerState,
        started: tuple[int, int, int],
        answer: dict[str, Any] | None,
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
                _apply_report(state, answer)
        else:
            error = _describe_failure(failure.value)
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
    """The consumer answered its health route, but not with success."""


def _apply_report(state: ConsumerState, answer: dict[str, Any]) -> None:
    loaded = answer.get("loaded")
    if isinstance(loaded, bool):
        state.reported_loaded = loaded
    resident = answer.get("gpu_resident_mib")
    if isinstance(resident, int) and not isinstance(resident, bool) and resident >= 0:
        state.reported_resident_mib = resident
        state.note_resident_mib(resident)


def _describe_failure(error: BaseException | None) -> str:
    if isinstance(error, TimedOut):
        return str(error)
    return describe_connection_error(error or Exception("unknown"))
