"""
Loading a consumer once room is made for it: its ``load`` route, or
``systemctl start`` of its unit and then its health route until it answers.
A consumer with neither cold-starts on its first request, so loading it is a
no-op here.

Kept apart from making room: a load changes no other consumer, verifies
nothing on the card, and takes no turn with other jobs' evictions.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mgpumanager.common.errors import LOAD_FAILED, ApiError
from mgpumanager.config.document import Config
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.scheduling.telemetry import NO_TELEMETRY, Telemetry
from mgpumanager.state.registry import ConsumerState

log = Logger()


class HealthCheck(Protocol):
    """Probes a consumer now; fires with whether it answered healthy."""

    def __call__(self, name: str) -> Deferred[bool]: ...


class Loader:
    """
    Loads consumers and counts the loads for ``/v1/status``.

    :param control: calls load routes, and ``systemctl`` for consumers with a
        systemd unit.
    :param health_check: probes a consumer after ``systemctl start``.
    :param telemetry: told of each load.
    """

    def __init__(
        self,
        config: Config,
        control: ConsumerControl,
        clock: IReactorTime,
        health_check: HealthCheck,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._config = config
        self._control = control
        self._clock = clock
        self._health_check = health_check
        self._telemetry = telemetry
        self.loads = 0
        self.failed_loads = 0

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded configuration's timeouts from the next load on."""
        self._config = config

    async def load(self, state: ConsumerState) -> None:
        """
        Load ``state``'s consumer and mark it resident.

        :raises ApiError: ``load_failed``, when its route or unit failed.
        """
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
            await deferLater(self._clock, self._config.lifecycle.verify_interval_seconds)
