"""
Several hosts on one machine, for the suites that put real HAProxy and
Prometheus in front of them: each host is a simulated GPU host served by this
process's reactor (so a test counts at its servers what reached them) and a
real ``twistd -n mgpumanager`` of its own, with its own card file, ports and
agent port, all on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredSemaphore, gatherResults
from twisted.internet.threads import deferToThread

from mgpumanager.simulate.host import HostConfig, SimulatedHost
from tests.daemon import Daemon, free_port, terminate, wait_until_answering
from tests.e2e.test_e2e_eviction import wait_until_healthy

T = TypeVar("T")
#: Debian installs haproxy in /usr/sbin, which a user's PATH may not hold.
SEARCHED = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")


def program(name: str) -> str | None:
    """The path of an installed program, or None."""
    found = shutil.which(name)
    if found is None:
        found = shutil.which(name, path=os.pathsep.join(SEARCHED))
    return found


def missing_line(*names: str) -> str | None:
    """One line saying which of ``names`` are not installed and how to get them, or None."""
    absent = [name for name in names if program(name) is None]
    if not absent:
        return None
    packages = sorted({"prometheus" if name == "promtool" else name for name in absent})
    return (f"{' and '.join(absent)} not installed; `apt-get install {' '.join(packages)}` "
            "to run the several-hosts tests with the real programs")


@attrs.define
class Host:
    """One simulated GPU host and the daemon that owns it."""

    name: str
    sim: SimulatedHost
    daemon: Daemon
    agent_port: int

    @property
    def url(self) -> str:
        return self.daemon.url

    def request_ids(self) -> Counter[str]:
        """How many times each ``X-Request-Id`` reached any server of this host."""
        seen: Counter[str] = Counter()
        for server in self.sim.servers.values():
            for request in server.requests:
                request_id = request.header("x-request-id")
                if request_id is not None:
                    seen[request_id] += 1
        return seen

    def paths_at(self, server: str) -> list[str]:
        """The paths that reached one server of this host, oldest first."""
        return [request.path for request in self.sim.servers[server].requests]


async def start_hosts(workdir: Path, names: Sequence[str]) -> list[Host]:
    """
    Start a host per name: simulated servers first, then the daemons side by
    side.  Whatever started is stopped again if one of them fails to.
    """
    hosts: list[Host] = []
    try:
        for name in names:
            home = workdir / name
            home.mkdir()
            sim = SimulatedHost(HostConfig.fast(
                state_path=str(home / "card.json"), audio_dir=str(home / "audio"),
                total_mib=32768,
            ))
            await sim.start(reactor)
            agent_port = free_port()
            config = sim.daemon_config()
            config["agent"] = {"listen": f"127.0.0.1:{agent_port}"}
            daemon = Daemon(config, home, ("--simulated-card", str(home / "card.json")))
            hosts.append(Host(name, sim, daemon, agent_port))
        await gatherResults([deferToThread(host.daemon.start) for host in hosts],
                            consumeErrors=True)
        for host in hosts:
            await wait_until_healthy(host.daemon)
    except BaseException:
        await stop_hosts(hosts)
        raise
    return hosts


async def stop_hosts(hosts: Iterable[Host]) -> None:
    for host in hosts:
        if host.daemon.process is not None:
            await deferToThread(host.daemon.stop)
        await host.sim.stop()


async def post(url: str, body: dict[str, Any], request_id: str) -> tuple[int, bytes]:
    """A POST and its whole answer, marked so the servers' records can be matched."""
    response = await treq.post(url, json=body, headers={"X-Request-Id": request_id})
    return response.code, await response.content()


async def at_most(concurrency: int, calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` with at most ``concurrency`` in progress; their results in order."""
    gate = DeferredSemaphore(concurrency)
    results: list[T] = await gatherResults(
        [gate.run(call) for call in calls], consumeErrors=True
    )
    return results


class Program:
    """A real program run in the foreground for a test, its output in a file."""

    def __init__(self, argv: Sequence[str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def answers(self, url: str, timeout: float = 20.0) -> None:
        """Wait until ``url`` answers 200 (blocking: run it in a thread)."""
        wait_until_answering(self.process, url, self.log, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        terminate(self.process, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]
