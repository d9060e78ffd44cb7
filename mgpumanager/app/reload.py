"""
Reload on SIGHUP: re-read the configuration file and apply it without a restart.

An operator edits ``consumers.yaml`` and runs ``systemctl reload mgpumanager``
(the unit's ``ExecReload`` sends SIGHUP).  A file that does not validate changes
nothing: the daemon logs the one-line error and keeps the configuration it has.
A valid one takes effect everywhere but the main ``listen`` address (a port the
clients are already connected to; that needs a restart, and the log says so),
without touching a running job: every part of the daemon that depends on
configuration takes the new one, in a set order, through
:class:`~mgpumanager.app.reloading.ConfigTakers`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from mgpumanager.app.reloading import ConfigTakers
from mgpumanager.config.document import Config, ConfigError
from mgpumanager.consumers.adapters import load_resolved_config

log = Logger()


class Reloader(Service):
    """
    Reads the file again on :meth:`reload` and hands a valid result to the
    takers.  It keeps the configuration it last applied only to know which
    file to read and which ``listen`` address the daemon is bound to; no
    component reads it from here.

    :param config: the configuration the daemon started with.
    :param reactor: where SIGHUP's work is scheduled (a signal handler must
        not touch the daemon's state itself).
    :param takers: every component that takes a new configuration, in order.
    :param load: reads and validates the file (:func:`load_resolved_config`).
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactorFromThreads,
        takers: ConfigTakers,
        load: Callable[[str], Config] = load_resolved_config,
    ) -> None:
        self._applied = config
        self._reactor = reactor
        self._takers = takers
        self._load = load
        self._previous_handler: Any = None
        self.reloads = 0
        self.failed_reloads = 0

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        """
        Re-read the file the current configuration came from and apply it;
        fires with whether it was applied.  Never fails.
        """
        source = self._applied.source
        try:
            new = self._load(source)
        except ConfigError as e:
            self.failed_reloads += 1
            log.error("reload refused, the configuration is unchanged: {error}", error=str(e))
            return Deferred.fromCoroutine(_false())
        if new.listen != self._applied.listen:
            log.warn(
                "reload: listen changed from {old} to {new}; that takes a restart, "
                "the daemon keeps listening on {old}",
                old=str(self._applied.listen),
                new=str(new.listen),
            )
            new = attrs.evolve(new, listen=self._applied.listen)
        self._applied = new
        self.reloads += 1
        return Deferred.fromCoroutine(self._apply(new))

    async def _apply(self, new: Config) -> bool:
        await self._takers.apply(new)
        log.info(
            "reloaded {source}: {n} consumer(s)", source=new.source, n=len(new.consumers)
        )
        return True


async def _false() -> bool:
    return False
