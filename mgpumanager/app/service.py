"""
The daemon as a service: every component built and wired to the others.

This is the only place objects are constructed and handed to each other, so
the rest of the package can take its collaborators (reactor, HTTP client, NVML
module) as arguments and be tested with stand-ins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent

from mgpumanager.app.daemon import ManagerService, NvmlThread, ServiceLoop, load_pynvml
from mgpumanager.app.reload import Reloader
from mgpumanager.app.reloading import ConfigTakers, holder_release
from mgpumanager.common.exposure import endpoint_is_loopback
from mgpumanager.config.configured import PerConfig
from mgpumanager.config.document import Config
from mgpumanager.consumers.adapters import load_resolved_config
from mgpumanager.consumers.adapters.following import Completions
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.consumers.commands import CommandResult, run_command
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.consumers.probes import HealthProber
from mgpumanager.relay.endpoints import ReusedEndpoints
from mgpumanager.relay.headers import reuse_for
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.relay.tunnel import WebSocketTunnels
from mgpumanager.relay.twisted_private import (
    ParsedOnceAgent,
    ReusePool,
    fail_start_on_listen_error,
    quiet_connections,
)
from mgpumanager.scheduling.choosing import PolicyChooser
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.policy import make_policy
from mgpumanager.scheduling.reclaim import GuestKeeper
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.yields import CardYields
from mgpumanager.state.attribution import ConsumerPids, PidMap, ProcessAttributor
from mgpumanager.state.gpu import GpuReading, GpuSampler
from mgpumanager.state.guests import GuestWatch, process_name
from mgpumanager.state.registry import Registry
from mgpumanager.web.agent import AgentPort, scheduler_load
from mgpumanager.web.api import ManagerApp
from mgpumanager.web.card_routes import CardRoutes
from mgpumanager.web.guard import Guard
from mgpumanager.web.jobs import GpuJobs
from mgpumanager.web.limits import idle_limit
from mgpumanager.web.metrics import Metrics
from mgpumanager.web.openai_routes import OpenAIRoutes
from mgpumanager.web.passthrough import Passthrough
from mgpumanager.web.ports import ConsumerPorts
from mgpumanager.web.routing import RouteTable
from mgpumanager.web.site import ManagerSite

log = Logger()

#: An NVML read that takes longer than this is treated as a hung driver.
NVML_TIMEOUT_SECONDS = 5.0
#: How long we wait for a consumer to accept a TCP connection.
CONNECT_TIMEOUT_SECONDS = 5.0


@attrs.frozen
class StandIns:
    """
    What replaces the real host's parts when the daemon runs against a
    simulated one: the NVML module, the consumer-to-process map, the
    ``systemctl`` command, and services to run alongside (the simulated host).
    """

    load_nvml: Callable[[], Any]
    find_pids: Callable[[], PidMap] | None = None
    systemctl: tuple[str, ...] | None = None
    services: tuple[IService, ...] = ()
    #: A process's name (the simulated card knows its guests' names).
    process_name: Callable[[int], str] | None = None


def build(
    config: Config, listen: str | None, reactor: Any, stand_ins: StandIns | None = None
) -> ManagerService:
    """Build and wire every component of the daemon."""
    config = _with_stand_ins(config, stand_ins)
    idle_limits = PerConfig(config, idle_limit)
    pool = ReusePool(reactor, reuse_for, idle_limits)
    quiet_connections(pool)
    pool.maxPersistentPerHost = 8
    agents: dict[float, Agent] = {}

    def agent_for_timeout(seconds: float) -> Agent:
        if seconds not in agents:
            agents[seconds] = ParsedOnceAgent.usingEndpointFactory(
                reactor, ReusedEndpoints(reactor, seconds), pool=pool
            )
        return agents[seconds]

    # Probes and lifecycle calls use treq; each is bounded by its own timeout.
    http_client = HTTPClient(agent_for_timeout(CONNECT_TIMEOUT_SECONDS))

    # The attributor knows the processes a removed consumer leaves on the card,
    # the sampler how much the card held when it was removed.
    registry = Registry(
        config,
        pids_of=lambda name: attributor.pids_of(name),
        card_now=lambda: (sampler.now(), sampler.latest_used_mib()),
    )
    adapters = Adapters(config)
    nvml_threads = ThreadPool(minthreads=0, maxthreads=1, name="mgpumanager-nvml")

    def run_blocking(call: Any) -> Deferred[GpuReading]:
        return deferToThreadPool(reactor, nvml_threads, call)

    sampler = GpuSampler(
        load_nvml=stand_ins.load_nvml if stand_ins else load_pynvml,
        run_blocking=run_blocking,
        clock=reactor,
        interval=config.gpu.poll_interval_seconds,
        timeout=NVML_TIMEOUT_SECONDS,
        cards=config.cards,
    )
    def run(argv: Sequence[str], timeout: float) -> Deferred[CommandResult]:
        return run_command(reactor, reactor, argv, timeout)

    control = ConsumerControl(http_client, reactor, run, config.lifecycle.systemctl)
    prober = HealthProber(
        registry,
        control,
        reactor,
        interval=config.probes.interval_seconds,
        timeout=config.probes.timeout_seconds,
        adapters=adapters,
    )
    consumer_pids = ConsumerPids(config)
    pids: Callable[[], PidMap] = consumer_pids
    if stand_ins is not None and stand_ins.find_pids is not None:
        pids = stand_ins.find_pids
    attributor = ProcessAttributor(registry, pids, deferToThread, reactor)
    sampler.subscribe_cards(attributor.on_cards)
    sampler.subscribe(holder_release(registry))
    guests = GuestWatch(registry, attributor.pids_of, {os.getpid()}, _process_name(stand_ins))
    sampler.subscribe_cards(guests.on_cards)

    metrics = Metrics(reactor)
    lifecycle = Lifecycle(
        config, registry, sampler, control, reactor, prober.probe, attributor, metrics, adapters
    )
    def needs_swap(name: str) -> bool:
        # The dry run's verdict (dry_run_plan(...).needs_swap) without running
        # it at every pick: a loaded consumer needs no room and no load, and
        # one that is not loaded needs at least its load.
        return not registry[name].resident

    def cards_of(name: str) -> tuple[int, ...]:
        # A consumer a reload removed keeps the cards it had until its jobs end.
        return registry[name].config.cards if name in registry else ()


    chooser = PolicyChooser(make_policy(config.scheduling), needs_swap, cards_of=cards_of)
    scheduler = GpuScheduler(
        reactor,
        registry,
        lifecycle.prepare,
        queue=config.queue,
        telemetry=metrics,
        chooser=chooser,
        scheduling=config.scheduling,
        cards_of=cards_of,
    )
    proxy = ConsumerProxy(
        lambda consumer: agent_for_timeout(consumer.timeouts.connect_seconds),
        reactor,
        drop_authorization=config.auth_token is not None,
    )
    description = listen or config.listen.endpoint_description()
    loopback = endpoint_is_loopback(description)
    yields = CardYields(config, scheduler, lifecycle, reactor, free_mib=sampler.free_mib_on)
    keeper = GuestKeeper(config, registry, guests, yields, scheduler, lifecycle, reactor)
    sampler.subscribe_cards(keeper.on_cards)
    completions = Completions(control, reactor, lifecycle.record_timeout, adapters)
    jobs = GpuJobs(registry, scheduler, proxy, metrics, completions)
    app = ManagerApp(
        config, registry, scheduler, proxy, sampler, lifecycle, reactor, listen, jobs, metrics,
        adapters, guests, yields,
    )
    cards = CardRoutes(config, yields)
    tunnels = WebSocketTunnels(reactor, drop_authorization=config.auth_token is not None)
    passthrough = Passthrough(config, jobs, proxy, tunnels, adapters)
    openai = OpenAIRoutes(config, jobs, control, config.probes.timeout_seconds)
    routes = RouteTable([app, openai, passthrough, cards], config)
    guard = Guard(config, loopback, routes)
    site = ManagerSite(routes.resource, routes.body_limit, guard, routes.error_shape)
    endpoint = serverFromString(reactor, description)
    http = StreamServerEndpointService(endpoint, site)
    fail_start_on_listen_error(http)

    ports = ConsumerPorts(config, passthrough, reactor, endpoint_is_loopback)
    service = ManagerService(
        (http, ports), scheduler, pool, reactor, config.shutdown_grace_seconds
    )
    agent = AgentPort(
        config,
        scheduler_load(scheduler, lambda: service.stopping, yields.all_yielded),
        reactor,
        endpoint_is_loopback,
    )
    # Who takes a reloaded configuration, in this order (see app.reloading):
    takers = ConfigTakers()
    # the consumers, and their waiting jobs when they are gone: their adapters
    # first, then the registry, so every later step asks about consumers that
    # exist; the policy before the scheduler, whose pick after refusing
    # removed consumers' jobs follows it;
    takers.add("adapters", adapters)
    takers.add("registry", registry)
    takers.add("chooser", chooser)
    takers.add("scheduler", scheduler)
    # what the daemon does on its own: make room, load, probe, sample, attribute;
    takers.add("lifecycle", lifecycle)
    takers.add("yields", yields)
    takers.add("guest keeper", keeper)
    takers.add("control", control)
    takers.add("prober", prober)
    takers.add("sampler", sampler)
    takers.add("consumer pids", consumer_pids)
    takers.add("pool idle limits", idle_limits)
    # what each request reads on its way in, and the shutdown grace;
    takers.add("guard", guard)
    takers.add("routes", routes)
    takers.add("app", app)
    takers.add("passthrough", passthrough)
    takers.add("openai routes", openai)
    takers.add("card routes", cards)
    takers.add("proxy", proxy)
    takers.add("tunnels", tunnels)
    takers.add("service", service)
    # the per-server ports last: opening one is the only step that can fail
    # half-way, and everything else is in place by then.
    takers.add("ports", ports)
    takers.add("agent port", agent)
    reloader = Reloader(
        config,
        reactor,
        takers,
        load=lambda path: _with_stand_ins(load_resolved_config(path), stand_ins),
    )
    reloader.setServiceParent(service)
    for extra in stand_ins.services if stand_ins else ():
        extra.setServiceParent(service)
    NvmlThread(nvml_threads).setServiceParent(service)
    ServiceLoop(sampler).setServiceParent(service)
    ServiceLoop(prober).setServiceParent(service)
    ServiceLoop(app.events).setServiceParent(service)
    http.setServiceParent(service)
    ports.setServiceParent(service)
    agent.setServiceParent(service)
    if not loopback:
        log.warn(
            "listening on {listen}, which is not loopback only: anyone who can reach it "
            "can use the GPU{hint}",
            listen=description,
            hint="" if config.auth_token else " (consider auth.token_file)",
        )
    return service


def _with_stand_ins(config: Config, stand_ins: StandIns | None) -> Config:
    """The configuration with a simulated host's ``systemctl`` in place of the file's."""
    if stand_ins is None or stand_ins.systemctl is None:
        return config
    return attrs.evolve(
        config, lifecycle=attrs.evolve(config.lifecycle, systemctl=stand_ins.systemctl)
    )


def _process_name(stand_ins: StandIns | None) -> Callable[[int], str]:
    """How guests are named: by the stand-in host that ran them, else by this host."""
    if stand_ins is not None and stand_ins.process_name is not None:
        named = stand_ins.process_name

        def name_of(pid: int) -> str:
            try:
                return named(pid)
            except Exception:
                return f"pid {pid}"

        return name_of
    return process_name
