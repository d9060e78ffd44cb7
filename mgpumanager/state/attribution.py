"""
Which GPU memory belongs to which consumer.

NVML reports memory per process id; consumers are known by URL.  A consumer's
processes are the one listening on its URL's port and that process's children
(Python servers often run the model in a worker), or, for a consumer run by
systemd, its unit's main process and children.  What they hold on the card is
the consumer's measured VRAM: more trustworthy than what the operator declared,
and the only way to notice a consumer that grew past its declaration.

Finding the processes walks ``/proc`` (psutil), which blocks and costs a few
milliseconds, so it runs in a thread and only when NVML shows a process we have
not attributed yet, or every ``refresh_seconds``.  Seeing other users' sockets
needs the daemon to run as the consumers' user or with CAP_SYS_PTRACE; without
that, consumers are simply not measured.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.config.document import Config
from mgpumanager.state.gpu import GpuReading, GpuSample
from mgpumanager.state.registry import Registry

log = Logger()

PidMap = Mapping[str, frozenset[int]]

#: How soon an unattributed process on the card triggers another search.
UNKNOWN_RETRY_SECONDS = 5.0


def find_consumer_pids(config: Config, systemctl: Sequence[str]) -> dict[str, frozenset[int]]:
    """Blocking: each consumer's processes, by port owner or systemd main PID."""
    import psutil

    listeners: dict[int, int] = {}
    try:
        for connection in psutil.net_connections(kind="tcp"):
            address = connection.laddr
            if connection.status == psutil.CONN_LISTEN and connection.pid and address:
                listeners.setdefault(address.port, connection.pid)
    except psutil.AccessDenied:
        pass
    found: dict[str, frozenset[int]] = {}
    for name, consumer in config.consumers.items():
        roots: set[int] = set()
        if consumer.systemd_unit is not None:
            main = _unit_main_pid(systemctl, consumer.systemd_unit)
            if main:
                roots.add(main)
        port = urlsplit(consumer.url).port
        if port in listeners and _is_local(consumer.url):
            roots.add(listeners[port])
        pids: set[int] = set()
        for root in roots:
            pids.add(root)
            try:
                pids.update(child.pid for child in psutil.Process(root).children(recursive=True))
            except psutil.Error:
                pass
        found[name] = frozenset(pids)
    return found


class ConsumerPids:
    """
    :func:`find_consumer_pids` for the consumers of the configuration the last
    reload gave: what the attributor runs (in a thread) to find them.

    :param systemctl: the prefix for ``systemctl show``, which needs no
        privilege (so not the configured ``lifecycle.systemctl``, often sudo).
    """

    def __init__(self, config: Config, systemctl: Sequence[str] = ("systemctl",)) -> None:
        self._config = config
        self._systemctl = tuple(systemctl)

    def __call__(self) -> dict[str, frozenset[int]]:
        return find_consumer_pids(self._config, self._systemctl)

    def reconfigure(self, config: Config) -> None:
        self._config = config


def _is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _unit_main_pid(systemctl: Sequence[str], unit: str) -> int:
    try:
        answer = subprocess.run(
            [*systemctl, "show", "--property=MainPID", "--value", unit],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return int(answer.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


class ProcessAttributor:
    """
    Keeps each consumer's ``measured_resident_mib`` and ``measured_by_card`` up
    to date from GPU samples (subscribe :meth:`on_cards` to the sampler's
    ``subscribe_cards``; :meth:`on_sample` takes the first card's sample alone).

    :param find_pids: blocking; returns consumer name -> pids.
    :param run_blocking: runs ``find_pids`` off the reactor.
    """

    def __init__(
        self,
        registry: Registry,
        find_pids: Callable[[], PidMap],
        run_blocking: Callable[[Callable[[], PidMap]], Deferred[PidMap]],
        clock: IReactorTime,
        refresh_seconds: float = 30.0,
    ) -> None:
        self._registry = registry
        self._find_pids = find_pids
        self._run_blocking = run_blocking
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._pids: PidMap = {}
        self._found_at: float | None = None
        self._finding: Deferred[None] | None = None
        self._latest: Mapping[int, GpuSample] | None = None

    def pids_of(self, name: str) -> frozenset[int]:
        return self._pids.get(name, frozenset())

    def on_sample(self, sample: GpuSample) -> None:
        """Attribute one sample of the first managed card."""
        self.on_cards({self._registry.config.cards[0].index: sample})

    def on_cards(self, samples: Mapping[int, GpuSample]) -> None:
        """Attribute one sample of each card, by card number."""
        if not _readings(samples):
            return
        self._latest = samples
        seen = set().union(*(r.processes for r in _readings(samples).values()))
        known = set().union(*self._pids.values()) if self._pids else set()
        since = None if self._found_at is None else self._clock.seconds() - self._found_at
        # A process no consumer owns (a desktop, a stray job) must not make us
        # walk /proc on every sample: at most every UNKNOWN_RETRY seconds.
        due = (
            since is None
            or since >= self._refresh_seconds
            or (since >= UNKNOWN_RETRY_SECONDS and not seen <= known)
        )
        if due and self._finding is None:
            self._refresh()
        self._apply(samples)

    def _refresh(self) -> None:
        def found(pids: PidMap) -> None:
            self._pids = pids
            if self._latest is not None:
                self._apply(self._latest)

        def failed(failure: Failure) -> None:
            log.failure("finding consumers' processes failed", failure)

        def done(_: object) -> None:
            self._finding = None
            self._found_at = self._clock.seconds()

        self._finding = self._run_blocking(self._find_pids).addCallbacks(found, failed)
        self._finding.addBoth(done)

    def _apply(self, samples: Mapping[int, GpuSample]) -> None:
        readings = _readings(samples)
        if not readings:
            return
        time = max(samples[card].time or 0.0 for card in readings)
        for state in self._registry:
            pids = self._pids.get(state.name)
            if not pids:
                state.measured_resident_mib = state.measured_at = None
                state.measured_by_card = None
                continue
            by_card = {
                card: sum(reading.processes.get(pid, 0) for pid in pids)
                for card, reading in readings.items()
            }
            # The card where it holds most: on one card, what it holds there.
            held = max(by_card.values())
            state.measured_resident_mib = held
            state.measured_by_card = MappingProxyType(by_card)
            state.measured_at = time
            state.note_resident_mib(held)


def _readings(samples: Mapping[int, GpuSample]) -> dict[int, GpuReading]:
    return {card: s.reading for card, s in samples.items() if s.reading is not None}
