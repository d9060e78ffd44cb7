"""
The daemon's objects as :func:`mgpumanager.app.service.build` wires them, for
the in-memory tests: built on a ``MemoryReactorClock`` (nothing listens, and
time moves only when a test advances it), never started, with the few
collaborators that would reach the host replaced by the test's fakes:

- the ``pynvml`` the sampler reads, and the thread its reads run in;
- the HTTP client of the control calls and the health probes;
- what runs ``systemctl``;
- the lookup of each consumer's processes;
- the lifecycle's wait for a started consumer (the prober's probe in the daemon);
- the proxy that relays a job's exchange.

Everything else is the daemon's own, wired to the rest as it is in production.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from mgpumanager.app import service
from mgpumanager.app.daemon import ManagerService
from mgpumanager.app.reloading import ConfigTakers
from mgpumanager.config.document import Config
from mgpumanager.consumers.commands import CommandResult
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.consumers.probes import HealthProber
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.reclaim import GuestKeeper
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.yields import CardYields
from mgpumanager.state.gpu import GpuSampler
from mgpumanager.state.guests import GuestWatch
from mgpumanager.state.registry import Registry
from mgpumanager.web.api import ManagerApp
from mgpumanager.web.routing import RouteTable
from tests.fakes import static_pids


def _never(read: Callable[[], Any]) -> Deferred[Any]:
    return Deferred()


@attrs.frozen
class Fakes:
    """
    What replaces the host-facing parts of the built daemon.  ``None`` leaves a
    part as :func:`~mgpumanager.app.service.build` makes it (its HTTP client, for
    one, never connects on a memory reactor).
    """

    #: The ``pynvml`` the sampler reads.
    nvml: Any = None
    #: How an NVML read runs (in the daemon: in the NVML thread); by default it
    #: never finishes.
    nvml_reads: Callable[[Callable[[], Any]], Deferred[Any]] = _never
    #: The treq-like client of the control calls and health probes.
    client: Any = None
    #: What runs ``systemctl``: the argv and its time limit.
    commands: Callable[[Sequence[str], float], Deferred[CommandResult]] | None = None
    #: Each consumer's processes, fixed (in the daemon: found in ``/proc``, refreshed).
    pids: dict[str, frozenset[int]] | None = None
    #: The lifecycle's health check (in the daemon: the prober's probe).
    health_check: Callable[[str], Deferred[bool]] | None = None
    #: The relay of each job's exchange.
    proxy: Any = None


@attrs.frozen
class Built:
    """One built daemon: its clock, its service, and its parts."""

    clock: MemoryReactorClock
    daemon: ManagerService
    #: Every part by the name it takes a reload under, and ``"guests"``.
    parts: Mapping[str, Any]
    registry: Registry
    scheduler: GpuScheduler
    lifecycle: Lifecycle
    sampler: GpuSampler
    prober: HealthProber
    yields: CardYields
    guests: GuestWatch
    keeper: GuestKeeper
    app: ManagerApp
    routes: RouteTable


def clock_at(seconds: float) -> MemoryReactorClock:
    """A memory reactor whose clock reads ``seconds``."""
    clock = MemoryReactorClock()
    clock.advance(seconds)
    return clock


def build(
    config: Config, fakes: Fakes | None = None, clock: MemoryReactorClock | None = None
) -> Built:
    """
    The daemon :func:`~mgpumanager.app.service.build` wires for ``config`` on
    ``clock`` (a fresh one at 0 if not given), with ``fakes`` in place of its
    host-facing parts.
    """
    fakes = fakes if fakes is not None else Fakes()
    clock = clock if clock is not None else clock_at(0)
    parts: dict[str, Any] = {}
    with _faked(fakes, parts):
        stand_ins = service.StandIns(
            load_nvml=lambda: fakes.nvml, process_name=lambda pid: f"pid {pid}"
        )
        daemon = service.build(config, None, clock, stand_ins)
    return Built(
        clock, daemon, parts, parts["registry"], parts["scheduler"], parts["lifecycle"],
        parts["sampler"], parts["prober"], parts["yields"], parts["guests"],
        parts["guest keeper"], parts["app"], parts["routes"],
    )


@contextmanager
def _faked(fakes: Fakes, parts: dict[str, Any]) -> Iterator[None]:
    """
    ``app.service`` with the fakes handed in where it makes the parts that use
    them (build's own closures look their names up again later, when they are
    build's again), noting each part it makes.
    """

    class Noted(ConfigTakers):
        def add(self, name: str, taker: Any) -> None:
            super().add(name, taker)
            parts[name] = taker

    def sampler(**kwargs: Any) -> GpuSampler:
        return GpuSampler(**{**kwargs, "run_blocking": fakes.nvml_reads})

    def guests(*args: Any) -> GuestWatch:
        made = parts["guests"] = GuestWatch(*args)
        return made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "ConfigTakers", Noted)
        patch.setattr(service, "GpuSampler", sampler)
        patch.setattr(service, "GuestWatch", guests)
        if fakes.client is not None:
            client = fakes.client
            patch.setattr(service, "HTTPClient", lambda agent: client)
        if fakes.commands is not None:
            commands = fakes.commands
            patch.setattr(
                service,
                "ConsumerControl",
                lambda client, clock, run, systemctl: ConsumerControl(
                    client, clock, commands, systemctl
                ),
            )
        if fakes.pids is not None:
            pids = fakes.pids
            patch.setattr(service, "ProcessAttributor", lambda *args: static_pids(pids))
        if fakes.health_check is not None:
            check = fakes.health_check
            patch.setattr(
                service, "HealthProber", lambda *args, **kwargs: SimpleNamespace(probe=check)
            )
        if fakes.proxy is not None:
            proxy = fakes.proxy
            patch.setattr(service, "ConsumerProxy", lambda *args, **kwargs: proxy)
        yield
