"""
What a reload changes, and in which order.

The :class:`~mgpumanager.app.reload.Reloader` knows *when* a new configuration
arrives; this module knows *who* holds configuration.  The order matters:
the registry first (so the consumers every later step asks about exist), the
scheduler next (its waiting jobs of removed consumers are answered before
anything could pick them), then everything that reads settings at each step or
request, and the per-server ports last, as opening one is the only step that
can fail half-way, and everything else is in place by then.
"""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.logger import Logger

from mgpumanager.app.reload import Reloader
from mgpumanager.config.document import Config
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.consumers.probes import HealthProber
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.attribution import ProcessAttributor
from mgpumanager.state.gpu import GpuSample, GpuSampler, SampleSink
from mgpumanager.state.holding import VERIFY_TIMEOUT
from mgpumanager.state.registry import Registry
from mgpumanager.web.guard import Guard
from mgpumanager.web.openai_routes import OpenAIRoutes
from mgpumanager.web.passthrough import Passthrough
from mgpumanager.web.ports import ConsumerPorts

log = Logger()


class _Reconfigurable(Protocol):
    def reconfigure(self, config: Config) -> None: ...


class _Authorizing(Protocol):
    drop_authorization: bool


class _Graceful(Protocol):
    grace: float


@attrs.frozen
class ReloadTargets:
    """Every built component that holds a piece of the configuration."""

    registry: Registry
    attributor: ProcessAttributor
    scheduler: GpuScheduler
    lifecycle: Lifecycle
    control: ConsumerControl
    prober: HealthProber
    sampler: GpuSampler
    guard: Guard
    app: _Reconfigurable
    routes: _Reconfigurable
    passthrough: Passthrough
    openai: OpenAIRoutes
    relays: tuple[_Authorizing, ...]
    service: _Graceful
    ports: ConsumerPorts

    def consumers(self, config: Config) -> None:
        """The consumers: states kept or renewed, removed ones' waiting jobs refused."""
        latest = self.sampler.latest
        removed = self.registry.reconfigure(
            config,
            self.attributor.pids_of,
            now=self.sampler.now(),
            card_used_mib=None if latest.reading is None else latest.reading.used_mib,
        )
        self.scheduler.reconfigure(config.queue, config.scheduling, removed)
        for name in removed:
            holder = self.registry.holders.get(name)
            log.info(
                "reload removed consumer {consumer}{held}",
                consumer=name,
                held="" if holder is None else
                f"; its {holder.size_mib} MiB count in the budget until the card shows them gone",
            )

    def operations(self, config: Config) -> None:
        """What the daemon does on its own: make room, load, probe, sample."""
        self.lifecycle.reconfigure(config)
        self.control.systemctl_command = tuple(config.lifecycle.systemctl)
        self.prober.set_timeout(config.probes.timeout_seconds)
        self.prober.set_interval(config.probes.interval_seconds)
        self.sampler.set_interval(config.gpu.poll_interval_seconds)

    def doors(self, config: Config) -> None:
        """What each request reads on its way in: guard, routes, relays, shutdown grace."""
        self.guard.reconfigure(config)
        self.app.reconfigure(config)
        self.routes.reconfigure(config)
        self.passthrough.reconfigure(config)
        self.openai.reconfigure(config, config.probes.timeout_seconds)
        for relay in self.relays:
            relay.drop_authorization = config.auth_token is not None
        self.service.grace = config.shutdown_grace_seconds

    def register(self, reloader: Reloader) -> None:
        """Have ``reloader`` apply every new configuration to these, in order."""
        reloader.on_reload(self.consumers)
        reloader.on_reload(self.operations)
        reloader.on_reload(self.doors)
        reloader.on_reload(self.ports.apply)


def holder_release(registry: Registry) -> SampleSink:
    """
    A sampler subscriber that forgets a removed consumer's memory once the
    card shows it gone, or once the verify timeout passed for one whose
    processes were never known (:mod:`mgpumanager.state.holding`), so the budget
    stops counting it.
    """

    def on_sample(sample: GpuSample) -> None:
        if not registry.holders or sample.time is None:
            return
        timeout = registry.config.lifecycle.verify_timeout_seconds
        for holder, rule in registry.settle_holders(sample.reading, sample.time, timeout):
            if rule == VERIFY_TIMEOUT:
                log.warn(
                    "removed consumer {consumer}: the card never showed its {size} MiB "
                    "go within {timeout} s; they leave the budget all the same",
                    consumer=holder.name,
                    size=holder.size_mib,
                    timeout=timeout,
                )
            else:
                log.info(
                    "removed consumer {consumer} no longer holds memory on the card ({rule})",
                    consumer=holder.name,
                    rule=rule,
                )

    return on_sample
