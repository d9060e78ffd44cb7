"""
Soak: GPU jobs of every kind through a real daemon in front of the simulated
host in its own process, on a machine kept busy, while the host is killed and
the daemon reloaded; then every job must be accounted for.

    .venv/bin/python bench/soak.py [--jobs 2000] [--concurrency 16]
        [--disconnect-share 0.1] [--readers 10] [--reload-every 30] [--hogs 2]
        [--seed N] [--time-limit 600] [--workdir DIR]

On loopback: ``python -m mgpumanager.simulate --fast`` (five servers, the
HTTP/1.0 speech server among them, logging every request they receive) and
``twistd -n mgpumanager`` reading its card file, with ``--hogs`` processes
spinning on the cores for the whole run.  Jobs go through the facade and the
passthrough to every consumer; a seeded share of the clients hang up
mid-answer.  Halfway through, the host gets SIGKILL and is started again on
the same ports; every ``--reload-every`` seconds the daemon gets SIGHUP (the
file alternates a probe timeout, so each reload changes something); ten
``/v1/events`` readers stay connected throughout.

Printed and checked (exit status 0 when all hold): every job ended relayed
whole, with the daemon's own JSON error, or cancelled by its client; none
closed without an answer; answers cut only around the kill; no POST received
twice by a server; no out-of-memory on the card; the daemon's RSS grew by
under 10 MiB after a warm-up; every reader saw the final, idle state.
``soak()`` is the entry point; ``tests/e2e/test_soak.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from any directory: the daemon runner lives in tests/, the parts beside us.
# ruff: noqa: E402
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import attrs
import yaml
from soak_clients import JOB_KINDS, EventReader, JobResult, read_all, run_job
from soak_figures import Figures
from soak_host import Hogs, HostProcess, rss_kib, send_sighup
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool

from tests.daemon import Daemon

#: A cut answer this close to the kill (seconds) is the kill's doing.
KILL_WINDOW_S = 3.0
WARM_UP_SHARE = 0.15


@attrs.frozen
class Options:
    jobs: int = 2000
    concurrency: int = 16
    disconnect_share: float = 0.1
    readers: int = 10
    reload_every: float = 30.0
    hogs: int = 2
    seed: int = 1
    time_limit: float = 600.0
    workdir: Path | None = None


def daemon_config(host: HostProcess, probe_timeout: float) -> dict[str, Any]:
    document = host.daemon_config()
    document["probes"]["timeout_seconds"] = probe_timeout
    document["lifecycle"].update(verify_interval_seconds=0.05, settle_seconds=0.05)
    document["queue"] = {"max_depth": 1000, "max_wait_seconds": 300}
    # Interactive jobs arrive all the time here: by the default policy image
    # work would wait for the batch guard (300 s), past the run's own length.
    # The soak is about answers under load, so image work gets its turn often.
    document["scheduling"] = {"batch_guard_seconds": 5}
    return document


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class Soak:
    def __init__(self, reactor: Any, options: Options, host: HostProcess, daemon: Daemon,
                 figures: Figures) -> None:
        self.reactor = reactor
        self.options = options
        self.host = host
        self.daemon = daemon
        self.figures = figures
        self.rng = random.Random(options.seed)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = options.concurrency
        self.agent = Agent(reactor, pool=self.pool)
        # A client that hangs up closes its connection; none goes back to a
        # pool (Twisted's would hand a closing one to the next request).
        self.hanging_up = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.results: list[JobResult] = []
        self.finished = 0
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.done = False

    async def status(self) -> dict[str, Any]:
        response = await self.agent.request(b"GET", (self.daemon.url + "/v1/status").encode())
        document: dict[str, Any] = json.loads(await read_all(response))
        return document

    async def until(self, check: Any, within: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            status = await self.status()
            if check(status) or time.monotonic() > deadline:
                return status
            await sleep(self.reactor, 0.1)

    async def jobs(self) -> None:
        kinds = sorted(JOB_KINDS)
        gate = DeferredSemaphore(self.options.concurrency)
        warm_up = int(self.options.jobs * WARM_UP_SHARE)

        async def one(index: int, kind: str, hang_up: bool) -> None:
            result = JobResult(index, kind)
            self.results.append(result)
            agent = self.hanging_up if hang_up else self.agent
            await run_job(agent, self.daemon.url, result, hang_up, self.reactor)
            self.finished += 1
            if self.finished == warm_up:
                self.figures.rss_start_kib = rss_kib(self.daemon.process.pid)  # type: ignore[union-attr]
            if self.finished == self.options.jobs // 2:
                Deferred.fromCoroutine(self.kill_host())

        plans = [(i, self.rng.choice(kinds), self.rng.random() < self.options.disconnect_share)
                 for i in range(self.options.jobs)]
        self.figures.jobs_sent = len(plans)
        await gatherResults([
            gate.run(lambda p=p: Deferred.fromCoroutine(one(*p))) for p in plans])

    async def kill_host(self) -> None:
        self.killed_at, finished = self.reactor.seconds(), self.finished
        self.host.kill9()
        await sleep(self.reactor, 1.0)
        await deferToThread(self.host.start)
        self.back_at = self.reactor.seconds()
        self.figures.host_kill = (f"killed (SIGKILL) after {finished} jobs, back in "
                                  f"{self.back_at - self.killed_at:.1f} s")

    async def reloads(self) -> None:
        while not self.done:
            await sleep(self.reactor, self.options.reload_every)
            if self.done:
                return
            timeout = 2.5 if self.figures.reloads_sent % 2 == 0 else 2.0
            self.daemon.config_path.write_text(yaml.safe_dump(
                dict(daemon_config(self.host, timeout), listen=f"127.0.0.1:{self.daemon.port}")))
            send_sighup(self.daemon.process.pid)  # type: ignore[union-attr]
            self.figures.reloads_sent += 1

    def tally(self) -> None:
        f = self.figures
        for result in self.results:
            f.outcomes[result.outcome] += 1
            f.by_kind.setdefault(result.kind, type(f.outcomes)())[result.outcome] += 1
            if result.outcome == "daemon":
                f.daemon_errors[result.detail] += 1
            elif result.outcome == "relayed":
                f.relayed_statuses[result.status] += 1
                if "out of memory" in result.detail.lower():
                    f.out_of_memory_answers += 1
            elif result.outcome == "closed" and len(f.closed_samples) < 5:
                f.closed_samples.append(f"job-{result.index} {result.kind}: {result.detail}")
            elif result.outcome == "cut":
                if len(f.cut_samples) < 5:
                    f.cut_samples.append(f"job-{result.index} {result.kind}: {result.detail}")
                if not self._near_kill(result):
                    f.cut_outside_kill += 1
        posts = self.host.posts_by_id()
        f.posts_at_servers = len(posts)
        f.posts_twice = sum(1 for n in posts.values() if n > 1)
        f.oom_count = self.host.oom_count()

    def _near_kill(self, result: JobResult) -> bool:
        if self.killed_at is None:
            return False
        return result.started <= self.killed_at + KILL_WINDOW_S and \
            result.ended >= self.killed_at - KILL_WINDOW_S


async def soak(reactor: Any, options: Options) -> Figures:
    """Run the soak; return its figures with their checks made."""
    figures = Figures(options=options, readers=options.readers, hogs=options.hogs)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="mgpu-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    hogs = Hogs(options.hogs, options.time_limit + 60)
    host = HostProcess(workdir)
    daemon: Daemon | None = None
    readers: list[EventReader] = []
    try:
        await deferToThread(host.start)
        daemon = Daemon(daemon_config(host, 2.0), workdir,
                        ("--simulated-card", str(host.card_path)))
        await deferToThread(daemon.start)
        run = Soak(reactor, options, host, daemon, figures)
        await run.until(lambda s: all(c["healthy"] for c in s["consumers"]), 20)
        readers = [EventReader(run.agent, daemon.url + "/v1/events", reactor)
                   for _ in range(options.readers)]
        reloading = Deferred.fromCoroutine(run.reloads())
        jobs = Deferred.fromCoroutine(run.jobs())
        jobs.addTimeout(options.time_limit, reactor)
        try:
            await jobs
        finally:
            run.done = True
        reloading.cancel()
        reloading.addErrback(lambda _: None)
        final = await run.until(
            lambda s: s["scheduler"]["in_flight"] == 0 and s["scheduler"]["queue_depth"] == 0,
            30)
        total = final["scheduler"]["total_jobs"]
        figures.final_state = {"queue_depth": final["scheduler"]["queue_depth"],
                               "in_flight": final["scheduler"]["in_flight"],
                               "total_jobs": total}
        await _readers_settle(reactor, readers, total)
        figures.readers_at_final_state = sum(1 for r in readers if _at_final(r, total))
        figures.reader_events = [r.events for r in readers]
        figures.reader_reconnects = sum(r.reconnects for r in readers)
        figures.reloads_done = (await _reloads_taken(daemon))
        figures.rss_end_kib = rss_kib(daemon.process.pid)  # type: ignore[union-attr]
        figures.daemon_alive = daemon.process is not None and daemon.process.poll() is None
        run.tally()
    except Exception as e:
        figures.error = f"{type(e).__name__}: {e}"
    finally:
        for reader in readers:
            reader.stop()
        if daemon is not None and daemon.process is not None:
            await deferToThread(daemon.stop)
        await deferToThread(host.stop)
        hogs.stop()
    figures.wall_s = time.monotonic() - started
    figures.check()
    return figures


def _at_final(reader: EventReader, total: int) -> bool:
    scheduler = (reader.last or {}).get("scheduler", {})
    return bool(scheduler.get("in_flight") == 0 and scheduler.get("queue_depth") == 0
                and scheduler.get("total_jobs") == total)


async def _readers_settle(reactor: Any, readers: list[EventReader], total: int) -> None:
    for _ in range(100):
        if all(_at_final(r, total) for r in readers):
            return
        await sleep(reactor, 0.1)


async def _reloads_taken(daemon: Daemon) -> int:
    return daemon.log().count("[mgpumanager.app.reload#info] reloaded ")


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--disconnect-share", type=float, default=defaults.disconnect_share)
    parser.add_argument("--readers", type=int, default=defaults.readers)
    parser.add_argument("--reload-every", type=float, default=defaults.reload_every)
    parser.add_argument("--hogs", type=int, default=defaults.hogs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    return Options(**vars(args))


def listen_backlog(port: int) -> int | None:
    """The backlog of the socket listening on ``port`` (``ss``'s Send-Q), if ``ss`` runs."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "LISTEN":
            return int(fields[2])
    return None


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)

    async def run(reactor: Any) -> None:
        figures = await soak(reactor, options)
        print(figures.table(), flush=True)
        if not figures.ok:
            raise SystemExit(1)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
