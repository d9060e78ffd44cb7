"""
Who takes a reloaded configuration, and in which order.

The :class:`~mgpumanager.app.reload.Reloader` knows *when* a new configuration
arrives; :class:`ConfigTakers` knows *who* depends on it: every component that
reads configuration, each registered once by ``app.service.build`` and each
taking the new :class:`~mgpumanager.config.document.Config` through the one
:class:`~mgpumanager.config.configured.Configured` interface.  A component that
is not registered here keeps the old configuration, which is why a test walks
the built daemon for any reference to an old one after a reload.

The order is the order of registration, and ``build`` writes it down: the
consumers first (their adapters, then the registry, so that every later step
asks about consumers that exist), the scheduler next (its waiting jobs of
removed consumers are answered before anything could pick them), then
everything that reads settings at each step or request, and the per-server
ports last, as opening one is the only step that can fail half-way, and
everything else is in place by then.
"""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from mgpumanager.config.configured import Configured
from mgpumanager.config.document import Config
from mgpumanager.state.gpu import GpuSample, SampleSink
from mgpumanager.state.holding import VERIFY_TIMEOUT
from mgpumanager.state.registry import Registry

log = Logger()


class ConfigTakers:
    """Every component that takes a new configuration, in the order it takes it."""

    def __init__(self) -> None:
        self._takers: list[tuple[str, Configured]] = []

    def add(self, name: str, taker: Configured) -> None:
        """
        Give ``taker`` every new configuration, after those added before it.

        :param name: what the log calls it if taking one fails.
        """
        self._takers.append((name, taker))

    @property
    def names(self) -> list[str]:
        """The takers' names, in order."""
        return [name for name, _ in self._takers]

    async def apply(self, config: Config) -> None:
        """
        Give ``config`` to every taker in order.  One that fails is logged and
        the others still take it: half a reload beats none.
        """
        for name, taker in self._takers:
            try:
                await maybeDeferred(taker.reconfigure, config)
            except Exception:
                log.failure("reload: {taker} could not take the new configuration in full",
                            taker=name)


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
