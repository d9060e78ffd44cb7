"""
The daemon's own services: the whole daemon with its graceful stop, the NVML
thread, and the adapter that runs a component's ``start``/``stop`` with it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool

from mgpumanager.config.document import Config
from mgpumanager.relay.twisted_private import forget_exit_signal
from mgpumanager.scheduling.scheduler import GpuScheduler

log = Logger()


def load_pynvml() -> Any:
    """Imported in the sampler's thread: a missing library is just a sample error."""
    import pynvml

    return pynvml


class ServiceLoop(Service):
    """Adapts a component with ``start()``/``stop()`` to a service."""

    def __init__(self, component: Any) -> None:
        self._component = component

    def startService(self) -> None:
        super().startService()
        self._component.start()

    def stopService(self) -> None:
        super().stopService()
        self._component.stop()


class NvmlThread(Service):
    """
    The NVML thread.  A read stuck in a wedged driver never returns, and
    joining its thread would hang the shutdown; the thread is a daemon thread,
    so it is left behind and dies with the process.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool
        pool.threadFactory = partial(threading.Thread, daemon=True)  # type: ignore[assignment]

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        if self._pool.working:
            log.warn("an NVML read is still stuck in the driver; not waiting for it")
            return
        self._pool.stop()


class ManagerService(MultiService):
    """
    The whole daemon.  Stops gracefully: no new connections on any port,
    queued jobs answered ``shutting_down``, running jobs given ``grace`` seconds
    to finish, then everything else.

    :param listeners: every service that accepts connections: the main port,
        and the consumers' own ports.
    """

    def __init__(
        self,
        listeners: Sequence[IService],
        scheduler: GpuScheduler,
        pool: HTTPConnectionPool,
        clock: Any,
        grace: float,
    ) -> None:
        super().__init__()
        self._listeners = listeners
        self._scheduler = scheduler
        self._pool = pool
        self._clock = clock
        #: How long running jobs may finish after SIGTERM (a reload may change it).
        self.grace = grace
        #: From SIGTERM on (HAProxy's agent check answers ``drain``).
        self.stopping = False
        #: The log observer offered to twistd's application (see :meth:`setServiceParent`).
        self.log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        """
        twistd makes its application for the plugin and hands it here before
        it picks its log observer; that pick takes the application's
        ``ILogObserver`` component when it has one, as a ``.tac`` file would
        set.  A plugin has no other way to offer one, so the daemon's own
        (:attr:`log_observer`, set where twistd would write text to standard
        output) is offered here.
        """
        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        # What is loaded by now (modules, the configuration, the routes)
        # lives as long as the daemon: out of the cyclic collector's sight,
        # its oldest generation no longer walks all of it every few
        # thousand jobs.  What start-up left in cycles goes first.
        gc.collect()
        gc.freeze()

    def reconfigure(self, config: Config) -> None:
        """Give running jobs the reloaded ``shutdown_grace_seconds`` at the next stop."""
        self.grace = config.shutdown_grace_seconds

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        log.info("stopping: no new connections; queued jobs are refused")
        await DeferredList([maybeDeferred(s.stopService) for s in self._listeners])
        self._scheduler.close()
        idle = self._scheduler.when_idle()
        if self._scheduler.in_flight:
            log.info("waiting up to {grace} s for {n} running job(s)",
                     grace=self.grace, n=self._scheduler.in_flight)
            idle.addTimeout(self.grace, self._clock)
            try:
                await idle
            except Exception:
                log.warn("grace period over: aborting {n} running job(s)",
                         n=self._scheduler.in_flight)
                self._scheduler.abort_running()
        others = [s for s in reversed(list(self)) if s not in self._listeners]
        await DeferredList([maybeDeferred(s.stopService) for s in others])
        Service.stopService(self)
        await self._pool.closeCachedConnections()
        # A graceful stop is a success: exit 0, not "killed by SIGTERM".
        forget_exit_signal(self._clock)
        gc.unfreeze()
