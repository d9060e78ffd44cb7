"""
Soak test: many GPU jobs through a real daemon, with clients walking away and a
consumer restarted under load, then a check that nothing leaked or stuck.

    .venv/bin/python bench/soak.py [--jobs 1000] [--concurrency 200]
        [--disconnect-share 0.3] [--seed N] [--time-limit 300] [--restart llm]
        [--backlog N] [--workdir DIR]

Everything runs on loopback: three scripted consumers (``tests.upstream``) in
this process's reactor, and ``twistd -n mgpumanager`` (``tests.daemon``) in front
of them.  Each job is a POST with a unique ``id`` query parameter and a random
body whose sha256 is kept; echo jobs get that sha256 back, stream jobs (``llm``)
get five NDJSON lines and a done line.  A seeded share of the clients disconnect
at a random moment: while queued, as the answer arrives, or mid-stream.  Roughly
halfway through, one consumer stops listening, drops its open connections and
listens again on the same port; the jobs that fail because of it (502/503, or a
stream cut) are counted apart.

Afterwards it prints the figures and checks: queue depth and in-flight back to
0, every completed body intact, no POST seen twice by a consumer, the daemon's
RSS within 20 MiB of its start (after a warm-up), and a next job that runs at
once; also that the daemon logged no error and still runs.  Exit status 0 when
every check holds, 1 otherwise.  ``soak()`` is the entry point, returning the
figures; ``tests/test_soak.py`` runs a short version in the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

# Run from any directory: the scripted consumers and the daemon runner live in tests/.
# ruff: noqa: E402
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from tests.daemon import Daemon
from tests.upstream import ScriptedUpstream, Tracker

#: kind -> (consumer, what the consumer does with it)
KINDS: dict[str, tuple[str, str]] = {
    "tts": ("voice", "echo"),
    "stt": ("voice", "echo"),
    "llm": ("llm", "stream"),
    "image": ("image", "echo"),
}
CONSUMERS = ("voice", "llm", "image")
STREAM_LINES = 5
STREAM_QUERY = f"do=stream&lines={STREAM_LINES}&interval=0.005"
#: RSS growth allowed between the warm-up and the end of the run.
RSS_SLACK_KIB = 20 * 1024
#: How long after the consumer listens again its jobs may still fail (probes
#: every 0.5 s must see it healthy again first).
RESTART_GRACE_S = 3.0
#: A next job slower than this does not "run at once".
NEXT_JOB_LIMIT_MS = 1000.0
WARM_UP_JOBS = 8
#: How long a run may go on after the time limit before it is abandoned.
ABANDON_AFTER_S = 10.0


@attrs.frozen
class Options:
    jobs: int = 1000
    concurrency: int = 200
    disconnect_share: float = 0.3
    seed: int = 1
    time_limit: float = 300.0
    restart: str = "llm"
    #: the daemon's listen backlog, through ``--listen``; None: its own default
    backlog: int | None = None
    workdir: Path | None = None


@attrs.define
class Job:
    """One planned POST and, once it ran, what became of it."""

    index: int
    kind: str
    size: int
    #: disconnect: None (never), or after ``delay`` seconds if still running,
    #: or once the answer starts (echo) / after ``lines`` lines (stream).
    disconnects: bool = False
    delay: float | None = None
    lines: int = 0
    sha256: str = ""
    outcome: str = "not_run"
    detail: str = ""
    intact: bool | None = None

    @property
    def id(self) -> str:
        return f"job-{self.index}"

    @property
    def consumer(self) -> str:
        return KINDS[self.kind][0]

    @property
    def streams(self) -> bool:
        return KINDS[self.kind][1] == "stream"

    def query(self, rng: random.Random) -> str:
        action = STREAM_QUERY if self.streams else f"ms={rng.randint(0, 5)}"
        return f"id={self.id}&{action}"


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str


@attrs.define
class Figures:
    options: Options
    jobs_sent: int = 0
    completed: int = 0
    disconnected: int = 0
    failed_by_restart: int = 0
    other_failures: int = 0
    other_failure_samples: list[str] = attrs.Factory(list)
    restart_failures: dict[str, int] = attrs.Factory(dict)
    bodies_checked: int = 0
    bodies_broken: int = 0
    consumer_body_mismatches: int = 0
    duplicated_posts: int = 0
    max_posts_per_id: int = 0
    posts_at_consumers: int = 0
    max_concurrent_at_consumers: int = 0
    restart: str = ""
    queue_depth: int | None = None
    in_flight: int | None = None
    scheduler: dict[str, Any] = attrs.Factory(dict)
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    next_job_ms: float | None = None
    next_job_status: str = ""
    daemon_alive: bool = False
    daemon_log_errors: list[str] = attrs.Factory(list)
    listen_backlog: int | None = None
    timed_out: bool = False
    error: str = ""
    wall_s: float = 0.0
    checks: list[Check] = attrs.Factory(list)

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_end_kib - self.rss_start_kib

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def table(self) -> str:
        o = self.options
        rows: list[tuple[str, str]] = [
            ("jobs / concurrency / disconnect share / seed",
             f"{o.jobs} / {o.concurrency} / {o.disconnect_share:g} / {o.seed}"
             + (f" (daemon backlog {o.backlog})" if o.backlog is not None else "")),
            ("jobs sent", str(self.jobs_sent)),
            ("  completed", str(self.completed)),
            ("  disconnected by the client", str(self.disconnected)),
            ("  failed by the restart", f"{self.failed_by_restart} " + (
                "(" + ", ".join(f"{why} x{n}" for why, n in self.restart_failures.items())
                + ")" if self.restart_failures else "")),
            ("  other failures", str(self.other_failures)),
            ("restart", self.restart or "-"),
            ("completed bodies checked / broken",
             f"{self.bodies_checked} / {self.bodies_broken}"),
            ("bodies altered on the way to a consumer", str(self.consumer_body_mismatches)),
            ("POSTs at consumers / ids seen twice / max per id",
             f"{self.posts_at_consumers} / {self.duplicated_posts} / {self.max_posts_per_id}"),
            ("max jobs at once at the consumers", str(self.max_concurrent_at_consumers)),
            ("queue_depth / in_flight after", f"{self.queue_depth} / {self.in_flight}"),
            ("daemon total / failed / cancelled jobs",
             f"{self.scheduler.get('total_jobs')} / {self.scheduler.get('failed_jobs')} / "
             f"{self.scheduler.get('cancelled_jobs')}"),
            ("daemon RSS start / peak (VmHWM) / end",
             f"{_mib(self.rss_start_kib)} / {_mib(self.rss_peak_kib)} / "
             f"{_mib(self.rss_end_kib)}"),
            ("daemon RSS end - start", f"{self.rss_growth_kib / 1024:+.1f} MiB"),
            ("next job", f"{self.next_job_status} in {_ms(self.next_job_ms)}"),
            ("daemon listen backlog (ss Send-Q)", str(self.listen_backlog or "-")),
            ("errors in the daemon's log", str(len(self.daemon_log_errors))),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        if self.other_failure_samples:
            rows.append(("other failures, first ones", "; ".join(self.other_failure_samples)))
        if self.error:
            rows.append(("error", self.error))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append("")
        lines += [f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        lines.append("")
        lines.append("verdict: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms"


class Consumer:
    """A scripted upstream that can be restarted on its own port."""

    def __init__(self, name: str, tracker: Tracker, reactor: Any) -> None:
        self.name = name
        self.reactor = reactor
        self.upstream = ScriptedUpstream(name, tracker, reactor)
        site = Site(self.upstream)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        # WrappingFactory keeps every open connection, so a restart can drop them.
        self.factory = WrappingFactory(site)
        self.factory.noisy = False
        self.listening: Any = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port: int = self.listening.getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def restart(self, down_for: float) -> None:
        await self.listening.stopListening()
        self.listening = None
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()
        await sleep(self.reactor, down_for)
        for attempt in range(50):
            try:
                self.listening = self.reactor.listenTCP(
                    self.port, self.factory, interface="127.0.0.1"
                )
                return
            except CannotListenError:
                if attempt == 49:
                    raise
                await sleep(self.reactor, 0.1)

    async def stop(self) -> None:
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()


class Body(Protocol):
    """Collects an answer's body; can walk away after some lines or at once."""

    def __init__(self, abort_after_lines: int | None = None,
                 on_data: Callable[[], None] | None = None) -> None:
        self.data = bytearray()
        self.abort_after_lines = abort_after_lines
        self.on_data = on_data
        self.aborted = False
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.abort_after_lines == 0:
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.aborted:
            return
        self.data += data
        if self.on_data is not None:
            self.on_data()
        if (self.abort_after_lines is not None
                and self.data.count(b"\n") >= self.abort_after_lines):
            self.abort()

    def abort(self) -> None:
        if self.aborted or self.done.called:
            return
        self.aborted = True
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not self.done.called:
            self.reason = reason
            self.done.callback(None)


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def consumer_config(url: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "health": {"path": "/health"}, **extra}


def daemon_config(consumers: dict[str, Consumer]) -> dict[str, Any]:
    return {
        "gpu": {"total_mib": 24576, "poll_interval_seconds": 0.5},
        "shutdown_grace_seconds": 3,
        "probes": {"interval_seconds": 0.5, "timeout_seconds": 1},
        "queue": {"max_depth": 1000, "max_wait_seconds": 120},
        "routing": {kind: consumer for kind, (consumer, _) in KINDS.items()},
        "consumers": {
            "voice": consumer_config(consumers["voice"].url, paths={
                "tts": {"path": "/api/tts"}, "stt": {"path": "/api/stt"}}),
            "llm": consumer_config(consumers["llm"].url,
                                   paths={"llm": {"path": "/api/generate"}},
                                   vram_managed=True),
            "image": consumer_config(consumers["image"].url,
                                     paths={"image": {"path": "/prompt"}}),
        },
    }


def plan(options: Options) -> list[Job]:
    """The jobs, with sizes and disconnect moments drawn from the seed."""
    rng = random.Random(options.seed)
    jobs = []
    for index in range(options.jobs):
        kind = rng.choice(sorted(KINDS))
        # Mostly small bodies; some past 100 KB, which twisted.web spools to a file.
        size = rng.randint(100_000, 300_000) if rng.random() < 0.1 else rng.randint(0, 4096)
        job = Job(index=index, kind=kind, size=size)
        if rng.random() < options.disconnect_share:
            job.disconnects = True
            if rng.random() < 0.5:
                job.delay = rng.uniform(0.0, 2.0)
            job.lines = rng.randint(0, STREAM_LINES) if job.streams else 0
        jobs.append(job)
    return jobs


class Soak:
    """The client side: the jobs, the restart, and what the consumers saw."""

    def __init__(self, reactor: Any, options: Options, daemon: Daemon,
                 consumers: dict[str, Consumer]) -> None:
        self.reactor = reactor
        self.options = options
        self.daemon = daemon
        self.consumers = consumers
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.rng = random.Random(options.seed + 1)
        self.sent: dict[str, str] = {}
        self.finished = 0
        self.aborted = False
        self.restart_window: tuple[float, float] | None = None
        self.restart_started: float | None = None
        self.restarting: Deferred[None] | None = None
        self.restart_armed: IDelayedCall | None = None
        self.restart_description = ""
        self.live: set[Callable[[], None]] = set()

    def url(self, path: str) -> str:
        return self.daemon.url + path

    async def status(self) -> dict[str, Any]:
        response = await self.http.get(self.url("/v1/status"))
        document: dict[str, Any] = await response.json()
        return document

    async def wait_until_idle(self, within: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            scheduler: dict[str, Any] = (await self.status())["scheduler"]
            if scheduler["queue_depth"] == 0 and scheduler["in_flight"] == 0:
                return scheduler
            if time.monotonic() > deadline:
                return scheduler
            await sleep(self.reactor, 0.05)

    async def wait_until_healthy(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            consumers = (await self.status())["consumers"]
            if all(c["healthy"] for c in consumers):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumers never became healthy: {consumers}")
            await sleep(self.reactor, 0.05)

    # One job

    async def run_job(self, job: Job) -> None:
        body = random.Random(f"{self.options.seed}-{job.index}").randbytes(job.size)
        job.sha256 = hashlib.sha256(body).hexdigest()
        query = job.query(self.rng)
        self.sent[job.id] = job.sha256
        try:
            await self._exchange(job, body, query)
        except Exception as e:  # a bug here must not hang the run
            job.outcome, job.detail = "other", f"soak error: {e!r}"
        self.finished += 1
        if self.finished == self.options.jobs // 2:
            self.arm_restart()

    async def _exchange(self, job: Job, body: bytes, query: str) -> None:
        state: dict[str, Any] = {"body": None, "disconnected": False}
        requesting = self.http.post(
            self.url(f"/v1/{job.kind}?{query}"),
            data=body,
            headers=Headers({b"content-type": [b"application/octet-stream"]}),
            unbuffered=True,
        )

        def disconnect() -> None:
            state["disconnected"] = True
            collector = state["body"]
            if collector is not None:
                collector.abort()
            else:
                requesting.cancel()

        self.live.add(disconnect)
        timer: IDelayedCall | None = None
        if job.disconnects and job.delay is not None:
            timer = self.reactor.callLater(job.delay, disconnect)
        try:
            try:
                response = await requesting
            except Exception as e:
                if state["disconnected"]:
                    job.outcome = "disconnected"
                else:
                    # Never the restart's: the daemon answers 502/503 before a response
                    # starts, and cuts the body after.
                    self._failed(job, f"no answer: {e!r}", restart_related=False)
                return
            abort_after: int | None = None
            if job.disconnects:
                abort_after = job.lines if job.streams else 0
                state["disconnected"] = True
            on_data = None
            if job.streams and not job.disconnects and job.consumer == self.options.restart:
                on_data = self.streaming
            collector = Body(abort_after, on_data)
            state["body"] = collector
            response.deliverBody(collector)
            await collector.done
            reason = collector.reason
            assert reason is not None
            if state["disconnected"]:
                job.outcome = "disconnected"
                return
            data = bytes(collector.data)
            if response.code != 200:
                self._failed_status(job, response.code, data)
                return
            if not reason.check(ResponseDone):
                self._failed(job, f"body cut: {reason.value!r}", restart_related=True)
                return
            job.outcome = "completed"
            job.intact, job.detail = self._intact(job, query, response, data)
        finally:
            self.live.discard(disconnect)
            if timer is not None and timer.active():
                timer.cancel()

    def _in_restart_window(self, job: Job) -> bool:
        if job.consumer != self.options.restart or self.restart_started is None:
            return False
        end = (self.restart_window[1] + RESTART_GRACE_S
               if self.restart_window is not None else float("inf"))
        return self.restart_started <= time.monotonic() <= end

    def _failed(self, job: Job, detail: str, restart_related: bool) -> None:
        job.detail = detail
        job.outcome = "restart" if restart_related and self._in_restart_window(job) else "other"

    def _failed_status(self, job: Job, code: int, data: bytes) -> None:
        try:
            envelope = json.loads(data)
        except ValueError:
            envelope = {}
        consumer = envelope.get("consumer") if isinstance(envelope, dict) else None
        detail = f"{code} {envelope.get('error') if isinstance(envelope, dict) else data[:80]!r}"
        self._failed(job, detail, code in (502, 503) and consumer == job.consumer)

    def _intact(self, job: Job, query: str, response: Any, data: bytes) -> tuple[bool, str]:
        if job.streams:
            lines = data.split(b"\n")
            if lines[-1] != b"":
                return False, "stream does not end with a newline"
            try:
                parsed = [json.loads(line) for line in lines[:-1]]
            except ValueError:
                return False, "stream line is not JSON"
            numbers = [line.get("n") for line in parsed[:-1]]
            if numbers != list(range(STREAM_LINES)):
                return False, f"stream lines {numbers}"
            if parsed[-1:] != [{"done": True}]:
                return False, "stream lacks the done line"
            return True, ""
        try:
            echo = json.loads(data)
        except ValueError:
            return False, "echo is not JSON"
        expected = {"upstream": job.consumer, "method": "POST", "query": query,
                    "body_length": job.size, "body_sha256": job.sha256}
        wrong = {key: echo.get(key) for key, value in expected.items()
                 if echo.get(key) != value}
        return (not wrong), (f"echo differs: {wrong}" if wrong else "")

    # The restart

    def arm_restart(self) -> None:
        """
        Restart the consumer as soon as one of its streams is under way, so
        the restart cuts an answer mid-stream; within a second at the latest.
        """
        if self.restart_armed is None and not self.aborted:
            self.restart_armed = self.reactor.callLater(1.0, self.trigger_restart)

    def streaming(self) -> None:
        if self.restart_armed is not None and self.restart_armed.active():
            self.trigger_restart()

    def trigger_restart(self) -> None:
        if self.restart_armed is not None and self.restart_armed.active():
            self.restart_armed.cancel()
        if self.restarting is None and not self.aborted:
            self.restarting = Deferred.fromCoroutine(self.restart())

    async def restart(self) -> None:
        if self.aborted:
            return
        consumer = self.consumers[self.options.restart]
        finished = self.finished
        self.restart_started = time.monotonic()
        dropped = len(consumer.factory.protocols)
        await consumer.restart(down_for=0.5)
        self.restart_window = (self.restart_started, time.monotonic())
        self.restart_description = (
            f"{consumer.name} after {finished} jobs finished: "
            f"{dropped} connection(s) dropped, down "
            f"{self.restart_window[1] - self.restart_window[0]:.2f} s, same port {consumer.port}"
        )

    def abort_all(self) -> None:
        self.aborted = True
        if self.restart_armed is not None and self.restart_armed.active():
            self.restart_armed.cancel()
        for disconnect in list(self.live):
            disconnect()

    # The whole run

    async def warm_up(self) -> None:
        for n in range(WARM_UP_JOBS):
            kind = sorted(KINDS)[n % len(KINDS)]
            query = f"id=warm-{n}&" + (STREAM_QUERY if KINDS[kind][1] == "stream" else "ms=1")
            response = await self.http.post(self.url(f"/v1/{kind}?{query}"), data=b"warm")
            await response.content()
            if response.code != 200:
                raise RuntimeError(f"warm-up {kind} job answered {response.code}")

    async def run(self, jobs: list[Job]) -> None:
        """Fire every job, at most ``concurrency`` at once, and see the restart through."""
        # ``concurrency`` clients, each taking the next job when its last one is over.
        # (A DeferredSemaphore does the same, but releases its waiters recursively: once
        # the time limit makes the jobs left return at once, the stack overflows.)
        queue = iter(jobs)
        await gatherResults([Deferred.fromCoroutine(self._client(queue))
                             for _ in range(min(self.options.concurrency, len(jobs)))])
        if self.restarting is not None:
            await self.restarting

    async def _client(self, queue: Iterator[Job]) -> None:
        for job in queue:
            if self.aborted:
                return
            await self.run_job(job)

    async def next_job(self) -> tuple[str, float]:
        started = time.monotonic()
        response = await self.http.post(self.url("/v1/tts?id=next&ms=0"), data=b"next")
        data = await response.content()
        elapsed = (time.monotonic() - started) * 1000
        ok = response.code == 200 and json.loads(data).get("body_sha256") == (
            hashlib.sha256(b"next").hexdigest())
        return (f"{response.code}{'' if ok else ' (wrong answer)'}", elapsed)

    def posts_by_id(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for consumer in self.consumers.values():
            for seen in consumer.upstream.seen:
                if seen.path == "/health":
                    continue
                ids = parse_qs(seen.query).get("id", ["?"])
                counts[ids[0]] += 1
        return counts

    def consumer_body_mismatches(self) -> int:
        wrong = 0
        for consumer in self.consumers.values():
            for seen in consumer.upstream.seen:
                ids = parse_qs(seen.query).get("id")
                if ids and ids[0] in self.sent and seen.body_sha256 != self.sent[ids[0]]:
                    wrong += 1
        return wrong


@attrs.define
class _Held:
    """What a run has started, so that it is released whatever happens."""

    consumers: dict[str, Consumer] = attrs.Factory(dict)
    daemon: Daemon | None = None
    soak: Soak | None = None
    scratch: tempfile.TemporaryDirectory[str] | None = None


async def soak(reactor: Any, options: Options) -> Figures:
    """
    Run the soak within ``options.time_limit`` seconds; the figures and checks.
    Whatever happens, the daemon is stopped and the consumers closed.
    """
    if options.restart not in CONSUMERS:
        raise ValueError(f"restart must be one of {CONSUMERS}")
    figures = Figures(options)
    started = time.monotonic()
    held = _Held()
    # Past the time limit the clients walk away, so the run ends and still reports;
    # should it not end even then, it is left behind and everything released.
    ended: Deferred[None] = Deferred()

    def end(result: Failure | None) -> None:
        if not ended.called:
            ended.callback(result)  # a Failure fails it

    Deferred.fromCoroutine(_run(reactor, options, figures, held)).addBoth(end)

    def time_is_up() -> None:
        figures.timed_out = True
        if held.soak is not None:
            held.soak.abort_all()
        timers.append(reactor.callLater(ABANDON_AFTER_S, end, Failure(TimeoutError(
            f"still running {ABANDON_AFTER_S:g} s after the time limit; abandoned"))))

    timers = [reactor.callLater(options.time_limit, time_is_up)]
    try:
        await ended
    except Exception as e:
        figures.error = f"{type(e).__name__}: {e}"
    finally:
        for timer in timers:
            if timer.active():
                timer.cancel()
        await _release(held, figures)
        figures.wall_s = time.monotonic() - started
    if figures.error or not figures.checks:
        figures.checks.append(Check("the run itself", False, figures.error or "no checks"))
    return figures


async def _run(reactor: Any, options: Options, figures: Figures, held: _Held) -> None:
    tracker = Tracker()
    for name in CONSUMERS:
        held.consumers[name] = Consumer(name, tracker, reactor)
    workdir = options.workdir
    if workdir is None:
        held.scratch = tempfile.TemporaryDirectory(prefix="mgpumanager-soak-")
        workdir = Path(held.scratch.name)
    daemon = held.daemon = Daemon(daemon_config(held.consumers), workdir)
    if options.backlog is not None:
        # The interface must come last: the daemon reads it to the end of the string.
        daemon.extra_args = ("--listen", f"tcp:{daemon.port}:backlog={options.backlog}"
                             ":interface=127.0.0.1")
    await deferToThread(daemon.start)
    soak = held.soak = Soak(reactor, options, daemon, held.consumers)
    await soak.wait_until_healthy()
    await soak.warm_up()
    await soak.wait_until_idle(5.0)
    await sleep(reactor, 0.2)
    figures.rss_start_kib = daemon.memory_kib()["VmRSS"]

    jobs = plan(options)
    await soak.run(jobs)
    figures.restart = soak.restart_description
    _tally(figures, jobs)

    scheduler = await soak.wait_until_idle(5.0)
    figures.scheduler = scheduler
    figures.queue_depth = scheduler["queue_depth"]
    figures.in_flight = scheduler["in_flight"]
    figures.next_job_status, figures.next_job_ms = await soak.next_job()
    await sleep(reactor, 0.5)
    memory = daemon.memory_kib()
    figures.rss_end_kib, figures.rss_peak_kib = memory["VmRSS"], memory["VmHWM"]
    assert daemon.process is not None
    figures.daemon_alive = daemon.process.poll() is None
    figures.listen_backlog = await deferToThread(listen_backlog, daemon.port)
    figures.daemon_log_errors = log_errors(daemon.log())

    counts = soak.posts_by_id()
    figures.posts_at_consumers = sum(counts.values())
    figures.duplicated_posts = sum(1 for n in counts.values() if n > 1)
    figures.max_posts_per_id = max(counts.values(), default=0)
    figures.consumer_body_mismatches = soak.consumer_body_mismatches()
    figures.max_concurrent_at_consumers = tracker.max_active
    completed_ids = {job.id for job in jobs if job.outcome == "completed"}
    figures.checks = _checks(figures, completed_ids, counts)


async def _release(held: _Held, figures: Figures) -> None:
    if held.soak is not None:
        held.soak.abort_all()
        await held.soak.pool.closeCachedConnections()
    if held.daemon is not None and held.daemon.process is not None:
        code = await deferToThread(held.daemon.stop)
        if code not in (0, -15):
            figures.checks.append(Check("daemon stops cleanly", False, f"exit status {code}"))
    for consumer in held.consumers.values():
        await consumer.stop()
    if held.scratch is not None:
        held.scratch.cleanup()


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


#: Lines of a daemon log that betray a bug: tracebacks, errors, unhandled failures.
_LOG_ERROR = re.compile(r"Traceback|Unhandled|#error\]|#critical\]|internal_error")


def log_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if _LOG_ERROR.search(line)]


def _tally(figures: Figures, jobs: list[Job]) -> None:
    figures.jobs_sent = sum(1 for job in jobs if job.outcome != "not_run")
    outcomes = Counter(job.outcome for job in jobs)
    figures.completed = outcomes["completed"]
    figures.disconnected = outcomes["disconnected"]
    figures.failed_by_restart = outcomes["restart"]
    figures.other_failures = outcomes["other"]
    figures.restart_failures = dict(Counter(
        _why(job.detail) for job in jobs if job.outcome == "restart"))
    figures.other_failure_samples = [
        f"{job.id} ({job.kind}): {job.detail}" for job in jobs if job.outcome == "other"
    ][:5]
    checked = [job for job in jobs if job.outcome == "completed"]
    figures.bodies_checked = len(checked)
    figures.bodies_broken = sum(1 for job in checked if not job.intact)
    broken = [f"{job.id}: {job.detail}" for job in checked if not job.intact][:3]
    if broken:
        figures.other_failure_samples += broken


def _why(detail: str) -> str:
    """A failure's detail without the per-job noise, for counting."""
    return detail.split(":")[0] if detail.startswith(("no answer", "body cut")) else detail


def _checks(figures: Figures, completed_ids: set[str], counts: Counter[str]) -> list[Check]:
    o = figures.options
    never_reached = sorted(i for i in completed_ids if counts[i] != 1)[:3]
    rss_ok = figures.rss_growth_kib <= RSS_SLACK_KIB
    next_ok = (figures.next_job_status == "200" and figures.next_job_ms is not None
               and figures.next_job_ms <= NEXT_JOB_LIMIT_MS)
    return [
        Check("bounded in time", not figures.timed_out,
              f"time limit {o.time_limit:g} s" + (" reached" if figures.timed_out else "")),
        Check("every job ran", figures.jobs_sent == o.jobs and figures.completed
              + figures.disconnected + figures.failed_by_restart + figures.other_failures
              == o.jobs, f"{figures.jobs_sent} of {o.jobs} sent"),
        Check("no failures but the restart's", figures.other_failures == 0,
              f"{figures.other_failures} other failure(s)"),
        Check("the restart happened", bool(figures.restart), figures.restart or "never"),
        Check("every completed body intact",
              figures.bodies_broken == 0 and figures.consumer_body_mismatches == 0,
              f"{figures.bodies_checked} checked, {figures.bodies_broken} broken, "
              f"{figures.consumer_body_mismatches} altered upstream"),
        Check("no POST duplicated at a consumer", figures.max_posts_per_id <= 1,
              f"{figures.duplicated_posts} id(s) seen more than once"),
        Check("every completed job reached its consumer once", not never_reached,
              ", ".join(never_reached) or "yes"),
        Check("queue drained", figures.queue_depth == 0 and figures.in_flight == 0,
              f"queue_depth {figures.queue_depth}, in_flight {figures.in_flight}"),
        Check("RSS back within 20 MiB of its start", rss_ok,
              f"{figures.rss_growth_kib / 1024:+.1f} MiB"),
        Check("the next job runs at once", next_ok,
              f"{figures.next_job_status} in {_ms(figures.next_job_ms)} "
              f"(limit {NEXT_JOB_LIMIT_MS:.0f} ms)"),
        Check("daemon still running", figures.daemon_alive, "alive" if figures.daemon_alive
              else "exited"),
        Check("no errors in the daemon's log", not figures.daemon_log_errors,
              figures.daemon_log_errors[0][:160] if figures.daemon_log_errors else "none"),
    ]


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--disconnect-share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="seconds before the run is aborted (and fails)")
    parser.add_argument("--restart", choices=CONSUMERS, default="llm",
                        help="the consumer restarted mid-run")
    parser.add_argument("--backlog", type=int, default=None,
                        help="the daemon's listen backlog (through --listen); default: "
                             "the daemon's own")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the daemon's config and log go (default: a temporary "
                             "directory, removed afterwards)")
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.concurrency < 1 or not 0 <= args.disconnect_share <= 1:
        parser.error("need --jobs >= 2, --concurrency >= 1, 0 <= --disconnect-share <= 1")
    return Options(jobs=args.jobs, concurrency=args.concurrency,
                   disconnect_share=args.disconnect_share, seed=args.seed,
                   time_limit=args.time_limit, restart=args.restart,
                   backlog=args.backlog, workdir=args.workdir)


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
