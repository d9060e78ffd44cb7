"""
The twistd plugin's options and service: the only place objects are built and
wired to each other.

``twistd -n mgpumanager --config config/consumers.yaml`` runs the daemon in the
foreground.  A bad configuration stops it before anything listens, with one line
naming the file and key.
"""

from __future__ import annotations

import sys
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from mgpumanager.api import ManagerApp
from mgpumanager.config import Config, ConfigError, load_config
from mgpumanager.gpu import GpuReading, GpuSampler
from mgpumanager.probes import HealthProber
from mgpumanager.proxy import ConsumerProxy
from mgpumanager.registry import Registry
from mgpumanager.scheduler import GpuScheduler

log = Logger()

#: An NVML read that takes longer than this is treated as a hung driver.
NVML_TIMEOUT_SECONDS = 5.0
#: How long we wait for a consumer to accept a TCP connection.
CONNECT_TIMEOUT_SECONDS = 5.0


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = (
        "Run mgpumanager: one HTTP facade (POST /v1/tts, /v1/stt, /v1/llm, /v1/image) "
        "in front of several inference servers, with one global GPU lock, VRAM-aware "
        "eviction and a live GET /v1/status."
    )
    optParameters = [
        ["config", "c", "config/consumers.yaml", "The consumers.yaml file to run."],
        [
            "listen",
            "l",
            None,
            "A Twisted server endpoint overriding the file's listen address, "
            "e.g. tcp:8770:interface=127.0.0.1",
        ],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded_config"] = load_config(self["config"])
        except ConfigError as e:
            # One clear line and a non-zero exit; the usage text would bury it.
            print(f"mgpumanager: {e}", file=sys.stderr)
            raise SystemExit(2) from None


def load_pynvml() -> Any:
    """Imported in the sampler's thread: a missing library is just a sample error."""
    import pynvml

    return pynvml


class _QuietClientFactory(_HTTP11ClientFactory):
    """One log line per upstream connection is noise, not information."""

    noisy = False


class _Loop(Service):
    """Adapts a component with ``start()``/``stop()`` to a service."""

    def __init__(self, component: Any) -> None:
        self._component = component

    def startService(self) -> None:
        super().startService()
        self._component.start()

    def stopService(self) -> None:
        super().stopService()
        self._component.stop()


class _ThreadPoolService(Service):
    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()


class ManagerService(MultiService):
    """
    The whole daemon.  Stops gracefully: no new connections, queued jobs
    answered ``shutting_down``, running jobs given ``grace`` seconds to finish,
    then everything else.
    """

    def __init__(
        self,
        http: IService,
        scheduler: GpuScheduler,
        pool: HTTPConnectionPool,
        clock: Any,
        grace: float,
    ) -> None:
        super().__init__()
        self._http = http
        self._scheduler = scheduler
        self._pool = pool
        self._clock = clock
        self._grace = grace

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        log.info("stopping: no new connections; queued jobs are refused")
        await self._http.stopService()  # type: ignore[misc]
        self._scheduler.close()
        idle = self._scheduler.when_idle()
        if self._scheduler.in_flight:
            log.info("waiting up to {grace} s for {n} running job(s)",
                     grace=self._grace, n=self._scheduler.in_flight)
            idle.addTimeout(self._grace, self._clock)
            try:
                await idle
            except Exception:
                log.warn("grace period over: aborting {n} running job(s)",
                         n=self._scheduler.in_flight)
                self._scheduler.abort_running()
        others = [s for s in reversed(list(self)) if s is not self._http]
        await DeferredList([maybeDeferred(s.stopService) for s in others])
        Service.stopService(self)
        await self._pool.closeCachedConnections()
        # twistd re-raises the signal that stopped it, so a clean stop would
        # end as "killed by SIGTERM"; a graceful stop is a success: exit 0.
        if getattr(self._clock, "_exitSignal", None) is not None:
            self._clock._exitSignal = None


def build(config: Config, listen: str | None, reactor: Any) -> ManagerService:
    """Build and wire every component of the daemon."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 8
    agent = Agent(reactor, connectTimeout=CONNECT_TIMEOUT_SECONDS, pool=pool)
    http_client = HTTPClient(agent)

    registry = Registry(config)
    nvml_threads = ThreadPool(minthreads=0, maxthreads=1, name="mgpumanager-nvml")

    def run_blocking(call: Any) -> Deferred[GpuReading]:
        return deferToThreadPool(reactor, nvml_threads, call)

    sampler = GpuSampler(
        load_nvml=load_pynvml,
        run_blocking=run_blocking,
        clock=reactor,
        interval=config.gpu.poll_interval_seconds,
        timeout=NVML_TIMEOUT_SECONDS,
    )
    prober = HealthProber(
        registry,
        http_client,
        reactor,
        interval=config.probes.interval_seconds,
        timeout=config.probes.timeout_seconds,
    )
    scheduler = GpuScheduler(reactor, registry)
    app = ManagerApp(config, registry, scheduler, ConsumerProxy(agent), sampler, reactor)
    site = Site(app.resource())
    site.displayTracebacks = False
    endpoint = serverFromString(reactor, listen or config.listen.endpoint_description())
    http = StreamServerEndpointService(endpoint, site)
    http._raiseSynchronously = True

    service = ManagerService(http, scheduler, pool, reactor, config.shutdown_grace_seconds)
    _ThreadPoolService(nvml_threads).setServiceParent(service)
    _Loop(sampler).setServiceParent(service)
    _Loop(prober).setServiceParent(service)
    http.setServiceParent(service)
    if not config.listen.is_loopback() and listen is None:
        log.warn("listening on {listen}, which is not loopback: anyone who can reach it "
                 "can use the GPU", listen=str(config.listen))
    return service


def makeService(options: Options) -> ManagerService:
    from twisted.internet import reactor

    return build(options["loaded_config"], options["listen"], reactor)
