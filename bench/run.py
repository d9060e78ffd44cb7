#!/usr/bin/env python3
"""
The mgpumanager benchmark: one command, bounded in time, loopback only.

    bench/setup.sh && .venv/bin/python bench/run.py            # or: make bench
    .venv/bin/python bench/run.py --quick                      # ~1 minute smoke run

In one run it starts, on 127.0.0.1 ephemeral ports:

- a fast upstream: nginx ``return 200 '{"ok":true}'``;
- a streaming upstream: 20 NDJSON lines 50 ms apart, chunked (bench/upstreams.py);
- a large-body upstream: 200 MB down generated on the fly, 200 MB up counted and dropped;
- a slow upstream that answers only when the bench opens its gate (the queue test);
- nginx as the reference proxy (proxy_pass to upstream blocks with keepalive 32,
  HTTP/1.1, buffering off both ways);
- the daemon, ``twistd -n mgpumanager``, routing tts -> fast, llm -> stream,
  stt -> large, image -> slow, every POST through the GPU lock;
- the design card's bare prototype (bench/prototype.py: a Klein route, one
  DeferredLock, treq to the upstream), routing the same kinds the same way;

and measures the same workload directly, through nginx, through the daemon and through
the prototype, in alternating rounds (their order rotates every round) so that noise
hits them alike. The daemon's CPU per request is reported as a ratio to the
prototype's in the same round. It prints one table per section with the median and
[min..max] over rounds, the targets and PASS/MISS. It exits 0 when it could measure, whatever the
targets say; non-zero only when the harness itself failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import clients
import procfs
import servers
from clients import HarnessError
from report import Results, heading, percentile, table, targets_table

MB = 1_000_000
MIB = 1 << 20
CONCURRENCIES = (1, 8, 64)
QUEUED = 64
#: The route-table issue's target for daemon CPU / prototype CPU per request at c=1,
#: and the goal beyond it.
PROTOTYPE_RATIO_TARGET = 0.85
PROTOTYPE_RATIO_GOAL = 0.6
#: The report's sections, in order; ``--sections`` picks some.
SECTIONS = ("1", "1b", "2", "3", "4", "5")


class TimeLimitReached(Exception):
    pass


@dataclass
class Options:
    rounds: int
    duration: float
    time_limit: float
    quick: bool
    skip_idle: bool
    keep: bool
    streams: int
    transfer_bytes: int
    slow_bytes: int
    slow_rate: float
    status_gets: int
    idle_window: float
    sections: frozenset[str] = frozenset(SECTIONS)


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark mgpumanager against direct access and nginx, on loopback.")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds (default 3; 1 with --quick)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per wrk run (default 5; 2 with --quick)")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="hard limit for the whole run in seconds (default 480)")
    parser.add_argument("--quick", action="store_true",
                        help="a ~1 minute smoke run: 1 round, short wrk runs, 15 s idle")
    parser.add_argument("--skip-idle", action="store_true",
                        help="skip the idle CPU measurement (60 s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (configs and logs) and print its path")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="the sections to run, comma-separated (default all: "
                             f"{','.join(SECTIONS)}); e.g. --sections 1 for CPU per request")
    args = parser.parse_args(argv)
    sections = frozenset(name.strip() for name in args.sections.split(",") if name.strip())
    if not sections or not sections <= set(SECTIONS):
        parser.error(f"--sections takes some of {','.join(SECTIONS)}")
    quick: bool = args.quick
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    duration = args.duration if args.duration is not None else (2.0 if quick else 5.0)
    if rounds < 1 or duration <= 0 or args.time_limit <= 0:
        parser.error("--rounds, --duration and --time-limit must be positive")
    return Options(
        rounds=rounds,
        duration=duration,
        time_limit=args.time_limit,
        quick=quick,
        skip_idle=args.skip_idle,
        keep=args.keep,
        streams=2 if quick else 4,
        transfer_bytes=200 * MB,
        slow_bytes=(20 if quick else 50) * MB,
        slow_rate=10 * MB,
        status_gets=100 if quick else 200,
        idle_window=15.0 if quick else 60.0,
        sections=sections,
    )


def progress(start: float, text: str) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {text}", file=sys.stderr, flush=True)


# --- wrk ---------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise HarnessError(f"wrk: cannot read the duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", output, re.M))
    requests = re.search(r"^\s+(\d+) requests in ", output, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if requests is None or rps is None or "50" not in percentiles or "99" not in percentiles:
        raise HarnessError(f"wrk: unexpected output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        output)
    if sockets:
        errors += sum(int(count) for count in sockets.groups())
    return WrkResult(int(requests.group(1)), float(rps.group(1)), _ms(percentiles["50"]),
                     _ms(percentiles["99"]), errors)


def run_wrk(url: str, connections: int, duration: float, script: Path) -> WrkResult:
    threads = min(connections, 2)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
               "--timeout", "10s", "--latency", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30,
                          check=False)
    if done.returncode != 0:
        raise HarnessError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return parse_wrk(done.stdout)


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"text": "hello"}'
wrk.headers["Content-Type"] = "application/json"
"""

#: What the openai Python SDK sends for ``chat.completions.create`` (its headers as of
#: openai 1.x, a short chat body), so the overhead a real client sees is measured.
SDK_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"messages":[{"role":"user","content":"Say hello in one word."}],'
        .. '"model":"llama3.2:3b","max_tokens":16,"temperature":0}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["Authorization"] = "Bearer sk-unused"
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.0"
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "1.54.0"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.11.7"
wrk.headers["X-Stainless-Async"] = "false"
wrk.headers["X-Stainless-Retry-Count"] = "0"
"""
#: The SDK-shaped run's concurrencies (a script, an app server's few workers).
SDK_CONCURRENCIES = (1, 8)
SDK_PATH = "/v1/chat/completions"


# --- the three ways in -----------------------------------------------------------------

@dataclass
class Way:
    """
    Direct, through nginx, the daemon or the prototype: where each kind of request goes.
    ``transfers``: whether it takes part in the large-body section (the prototype does
    not: ``treq.collect`` has no backpressure, by design of the card).
    """

    name: str
    routes: dict[str, tuple[int, str]]
    cpu_pid: int | None
    rss_pid: int | None
    transfers: bool = True

    def port(self, kind: str) -> int:
        return self.routes[kind][0]

    def path(self, kind: str, query: str = "") -> str:
        path = self.routes[kind][1]
        return f"{path}?{query}" if query else path

    def url(self, kind: str) -> str:
        return f"http://{servers.HOST}:{self.port(kind)}{self.path(kind)}"


def rotated(ways: list[Way], round_index: int) -> list[Way]:
    shift = round_index % len(ways)
    return ways[shift:] + ways[:shift]


def consumer(port: int, kind: str, path: str) -> dict[str, Any]:
    return {
        "url": f"http://{servers.HOST}:{port}",
        "health": {"method": "GET", "path": "/health"},
        "paths": {kind: {"method": "POST", "path": path}},
        "timeouts": {"connect_seconds": 10, "response_seconds": 600, "idle_seconds": 600},
    }


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.start = time.monotonic()
        self.deadline = self.start + options.time_limit
        self.children = servers.Children()
        self.results = Results()
        self.daemon: servers.Daemon | None = None
        self.ways: list[Way] = []
        self.info: dict[str, str] = {}
        self.hwm_note = ""

    def log(self, text: str) -> None:
        progress(self.start, text)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # --- set-up ----------------------------------------------------------------------

    def set_up(self) -> None:
        fast_port = servers.free_port()
        self.fast = servers.Nginx("nginx-fast", self.workdir, self.children,
                                  servers.fast_upstream_servers(fast_port))
        self.fast.start(fast_port)
        self.upstreams = {kind: servers.PythonUpstream(kind, self.workdir, self.children)
                          for kind in ("stream", "large", "slow")}
        for upstream in self.upstreams.values():
            upstream.wait()
        stream_port = self.upstreams["stream"].port
        large_port = self.upstreams["large"].port
        self.slow_port = self.upstreams["slow"].port

        proxy_port = servers.free_port()
        self.proxy = servers.Nginx(
            "nginx-proxy", self.workdir, self.children,
            servers.proxy_servers(
                proxy_port,
                {"fast": fast_port, "stream": stream_port, "large": large_port},
                {"/v1/tts": ("fast", "/api/tts"), "/v1/llm": ("stream", "/api/generate"),
                 "/v1/stt": ("large", "/large")},
            ),
        )
        self.proxy.start(proxy_port)

        self.daemon_config: dict[str, Any] = {
            "gpu": {"total_mib": 24576, "poll_interval_seconds": 2},
            "probes": {"interval_seconds": 5, "timeout_seconds": 3},
            "shutdown_grace_seconds": 2,
            "limits": {"max_body_mib": 1024},
            "routing": {"tts": "fast", "llm": "stream", "stt": "large", "image": "slow"},
            "openai": {"chat": "fast"},
            "consumers": {
                "fast": consumer(fast_port, "tts", "/api/tts"),
                "stream": consumer(stream_port, "llm", "/api/generate"),
                "large": consumer(large_port, "stt", "/large"),
                "slow": consumer(self.slow_port, "image", "/slow"),
            },
        }
        self.daemon = servers.Daemon("daemon", self.daemon_config, self.workdir, self.children)
        self.daemon.start()
        self.prototype = servers.Prototype(self.workdir, self.children, {
            "tts": f"http://{servers.HOST}:{fast_port}/api/tts",
            "llm": f"http://{servers.HOST}:{stream_port}/api/generate",
            "stt": f"http://{servers.HOST}:{large_port}/large",
        })
        self.prototype.wait()

        self.wrk_script = self.workdir / "post.lua"
        self.wrk_script.write_text(WRK_SCRIPT)
        self.sdk_script = self.workdir / "sdk.lua"
        self.sdk_script.write_text(SDK_WRK_SCRIPT)
        self.sdk_urls = {
            "direct": f"http://{servers.HOST}:{fast_port}{SDK_PATH}",
            "daemon": f"http://{servers.HOST}:{self.daemon.port}{SDK_PATH}",
        }
        daemon_port = self.daemon.port
        self.ways = [
            Way("direct", {"tts": (fast_port, "/api/tts"), "llm": (stream_port, "/api/generate"),
                           "stt": (large_port, "/large")},
                cpu_pid=self.fast.worker_pid, rss_pid=None),
            Way("nginx", {kind: (proxy_port, f"/v1/{kind}") for kind in ("tts", "llm", "stt")},
                cpu_pid=self.proxy.worker_pid, rss_pid=self.proxy.worker_pid),
            Way("daemon", {kind: (daemon_port, f"/v1/{kind}") for kind in ("tts", "llm", "stt")},
                cpu_pid=self.daemon.pid, rss_pid=self.daemon.pid),
            Way("prototype",
                {kind: (self.prototype.port, f"/v1/{kind}") for kind in ("tts", "llm", "stt")},
                cpu_pid=self.prototype.pid, rss_pid=self.prototype.pid, transfers=False),
        ]
        self.log(f"up: nginx fast :{fast_port}, stream :{stream_port}, large :{large_port}, "
                 f"slow :{self.slow_port}, nginx proxy :{proxy_port}, daemon :{daemon_port}, "
                 f"prototype :{self.prototype.port}")

    def warm_up(self) -> None:
        """Every way answers every kind before anything is measured (probes included)."""
        for way in self.ways:
            deadline = time.monotonic() + 20
            while True:
                status, body = clients.post(way.port("tts"), way.path("tts"))
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(f"{way.name}: POST tts answered {status}: {body[:300]!r}")
                time.sleep(0.2)
            for _ in range(50):
                clients.post(way.port("tts"), way.path("tts"))
            clients.stream(way.port("llm"), way.path("llm", "lines=3&interval_ms=1"))
            if not way.transfers:
                continue
            got, _ = clients.download(way.port("stt"), way.path("stt", f"mode=down&bytes={MIB}"))
            sent, _ = clients.upload(way.port("stt"), way.path("stt", "mode=up"), MIB)
            if got != MIB or sent != MIB:
                raise HarnessError(f"{way.name}: warm-up transfer got {got}, sent {sent}")

    # --- 1. requests/s, latency, CPU -------------------------------------------------

    def throughput_round(self, index: int) -> None:
        results = self.results
        for connections in CONCURRENCIES:
            p50: dict[str, float] = {}
            p99: dict[str, float] = {}
            for way in rotated(self.ways, index):
                pid = way.cpu_pid
                before = procfs.cpu_seconds(pid) if pid else 0.0
                outcome = run_wrk(way.url("tts"), connections, self.options.duration,
                                  self.wrk_script)
                after = procfs.cpu_seconds(pid) if pid else 0.0
                key = f"wrk.c{connections}.{way.name}"
                results.add(f"{key}.rps", outcome.rps)
                results.add(f"{key}.p50", outcome.p50_ms)
                results.add(f"{key}.p99", outcome.p99_ms)
                results.add(f"{key}.errors", outcome.errors)
                if pid and outcome.requests:
                    results.add(f"{key}.cpu_ms", (after - before) * 1000 / outcome.requests)
                p50[way.name], p99[way.name] = outcome.p50_ms, outcome.p99_ms
                self.log(f"round {index + 1} c={connections:<2} {way.name:<9} "
                         f"{outcome.rps:9.0f} req/s  p50 {outcome.p50_ms:7.3f} ms  "
                         f"p99 {outcome.p99_ms:7.3f} ms  errors {outcome.errors}")
            for name in ("nginx", "daemon", "prototype"):
                results.add(f"wrk.c{connections}.{name}.added_p50", p50[name] - p50["direct"])
                results.add(f"wrk.c{connections}.{name}.added_p99", p99[name] - p99["direct"])
            daemon_cpu = results.get(f"wrk.c{connections}.daemon.cpu_ms")
            prototype_cpu = results.get(f"wrk.c{connections}.prototype.cpu_ms")
            # The same round's pair: a ratio of medians would mix rounds that noise hit
            # differently.
            if len(daemon_cpu) == len(prototype_cpu) == index + 1 and prototype_cpu[-1] > 0:
                ratio = daemon_cpu[-1] / prototype_cpu[-1]
                results.add(f"wrk.c{connections}.ratio", ratio)
                self.log(f"round {index + 1} c={connections:<2} daemon CPU/request "
                         f"{daemon_cpu[-1] * 1000:.0f} us, prototype "
                         f"{prototype_cpu[-1] * 1000:.0f} us: {ratio:.2f}x")

    def sdk_round(self, index: int) -> None:
        """The openai SDK's request shape, through /v1/chat/completions, against direct."""
        pids = {"direct": self.fast.worker_pid, "daemon": self.daemon.pid}
        names = list(self.sdk_urls)
        if index % 2:
            names.reverse()
        for connections in SDK_CONCURRENCIES:
            p50: dict[str, float] = {}
            for name in names:
                before = procfs.cpu_seconds(pids[name])
                outcome = run_wrk(self.sdk_urls[name], connections, self.options.duration,
                                  self.sdk_script)
                after = procfs.cpu_seconds(pids[name])
                key = f"sdk.c{connections}.{name}"
                self.results.add(f"{key}.rps", outcome.rps)
                self.results.add(f"{key}.p50", outcome.p50_ms)
                self.results.add(f"{key}.p99", outcome.p99_ms)
                self.results.add(f"{key}.errors", outcome.errors)
                if outcome.requests:
                    self.results.add(f"{key}.cpu_ms", (after - before) * 1000 / outcome.requests)
                p50[name] = outcome.p50_ms
                self.log(f"round {index + 1} sdk c={connections:<2} {name:<6} "
                         f"{outcome.rps:9.0f} req/s  p50 {outcome.p50_ms:7.3f} ms")
            self.results.add(f"sdk.c{connections}.daemon.added_p50",
                             p50["daemon"] - p50["direct"])

    # --- 2. streaming ----------------------------------------------------------------

    def streaming_round(self, index: int) -> None:
        figures: dict[str, dict[str, float]] = {}
        for way in rotated(self.ways, index):
            timings = [clients.stream(way.port("llm"), way.path("llm"))
                       for _ in range(self.options.streams)]
            for timing in timings:
                if timing.lines != 20:
                    raise HarnessError(f"stream through {way.name}: {timing.lines} lines, not 20")
            gaps = [gap for timing in timings for gap in timing.gaps]
            figures[way.name] = {
                "first": statistics.median(t.first_line for t in timings) * 1000,
                "gap_median": statistics.median(gaps) * 1000,
                "gap_max": max(gaps) * 1000,
                "total": statistics.median(t.total for t in timings) * 1000,
            }
            for metric, value in figures[way.name].items():
                self.results.add(f"stream.{way.name}.{metric}", value)
        for name in ("nginx", "daemon", "prototype"):
            for metric, value in figures[name].items():
                self.results.add(f"stream.{name}.added_{metric}",
                                 value - figures["direct"][metric])
        self.log(f"round {index + 1} streaming: first line "
                 + ", ".join(f"{n} {f['first']:.2f} ms" for n, f in figures.items()))

    # --- 3. large bodies and memory --------------------------------------------------

    def sampling(self, pid: int | None) -> Any:
        return procfs.RssSampler(pid) if pid else nullcontext()

    def transfer_round(self, index: int) -> None:
        size = self.options.transfer_bytes
        for way in rotated([way for way in self.ways if way.transfers], index):
            with self.sampling(way.rss_pid) as sampler:
                got, seconds = clients.download(way.port("stt"),
                                                way.path("stt", f"mode=down&bytes={size}"))
            if got != size:
                raise HarnessError(f"download through {way.name}: {got} bytes, not {size}")
            self.results.add(f"big.down.{way.name}.mbps", size / MB / seconds)
            if sampler is not None:
                self.results.add(f"big.down.{way.name}.rss_before", sampler.before / 1024)
                self.results.add(f"big.down.{way.name}.growth", sampler.growth_mib)
                self.results.add(f"big.down.{way.name}.samples", sampler.samples)
            with self.sampling(way.rss_pid) as sampler:
                got, seconds = clients.upload(way.port("stt"), way.path("stt", "mode=up"), size)
            if got != size:
                raise HarnessError(f"upload through {way.name}: upstream got {got}, not {size}")
            self.results.add(f"big.up.{way.name}.mbps", size / MB / seconds)
            if sampler is not None:
                self.results.add(f"big.up.{way.name}.rss_before", sampler.before / 1024)
                self.results.add(f"big.up.{way.name}.growth", sampler.growth_mib)
                self.results.add(f"big.up.{way.name}.samples", sampler.samples)
        # The slow reader: through the daemon only, with a small fixed receive buffer.
        assert self.daemon is not None
        slow = self.options.slow_bytes
        daemon = self.ways[2]
        with procfs.RssSampler(self.daemon.pid) as sampler:
            got, seconds = clients.download(
                daemon.port("stt"), daemon.path("stt", f"mode=down&bytes={slow}"),
                rate=self.options.slow_rate, rcvbuf=256 * 1024)
        if got != slow:
            raise HarnessError(f"slow download through the daemon: {got} bytes, not {slow}")
        self.results.add("big.slow.daemon.mbps", slow / MB / seconds)
        self.results.add("big.slow.daemon.rss_before", sampler.before / 1024)
        self.results.add("big.slow.daemon.growth", sampler.growth_mib)
        self.results.add("big.slow.daemon.samples", sampler.samples)
        self.log(f"round {index + 1} transfers: daemon growth down "
                 f"{self.results.get('big.down.daemon.growth')[-1]:.1f} MiB, up "
                 f"{self.results.get('big.up.daemon.growth')[-1]:.1f} MiB, slow "
                 f"{sampler.growth_mib:.1f} MiB")

    # --- 4. /v1/status under a queue --------------------------------------------------

    def status_latencies(self, connection: clients.KeepAlive, count: int) -> list[float]:
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            status, body = connection.get("/v1/status")
            latencies.append((time.perf_counter() - start) * 1000)
            if status != 200:
                raise HarnessError(f"/v1/status answered {status}: {body[:300]!r}")
        return latencies

    def queue_depth(self, connection: clients.KeepAlive) -> int:
        status = connection.get_json("/v1/status")
        depth = status.get("scheduler", {}).get("queue_depth", -1)
        return int(depth) if isinstance(depth, int) else -1

    def status_round(self, index: int) -> None:
        assert self.daemon is not None
        results = self.results
        connection = clients.KeepAlive(self.daemon.port)
        held: list[Any] = []
        try:
            empty = self.status_latencies(connection, self.options.status_gets)
            results.add("status.empty.p50", percentile(empty, 0.5))
            results.add("status.empty.p99", percentile(empty, 0.99))
            results.add("status.empty.max", max(empty))
            clients.post(self.slow_port, "/gate?open=0")
            # One job holds the lock, QUEUED more wait for it.
            held = [clients.send_and_hold(self.daemon.port, "/v1/image")
                    for _ in range(QUEUED + 1)]
            deadline = time.monotonic() + 15
            depth = self.queue_depth(connection)
            while depth < QUEUED and time.monotonic() < deadline:
                time.sleep(0.05)
                depth = self.queue_depth(connection)
            if depth < QUEUED:
                raise HarnessError(f"only {depth} jobs queued after 15 s, not {QUEUED}")
            queued = self.status_latencies(connection, self.options.status_gets)
            depth_after = self.queue_depth(connection)
            results.add("status.queued.depth", min(depth, depth_after))
            results.add("status.queued.p50", percentile(queued, 0.5))
            results.add("status.queued.p99", percentile(queued, 0.99))
            results.add("status.queued.max", max(queued))
            clients.post(self.slow_port, "/gate?open=1")
            statuses = [clients.finish(sock) for sock in held]
            held = []
            results.add("status.queued.answered_ok", sum(s == 200 for s in statuses))
            self.log(f"round {index + 1} /v1/status with {min(depth, depth_after)} queued: "
                     f"p50 {percentile(queued, 0.5):.2f} ms, p99 {percentile(queued, 0.99):.2f}"
                     f" ms; queued jobs answered 200: {sum(s == 200 for s in statuses)}"
                     f"/{len(statuses)}")
        finally:
            for sock in held:
                sock.close()
            connection.close()
            try:
                clients.post(self.slow_port, "/gate?open=1")
            except OSError:
                pass

    # --- 5. idle ---------------------------------------------------------------------

    def idle(self) -> None:
        window = self.options.idle_window
        idle = servers.Daemon("daemon-idle", self.daemon_config, self.workdir, self.children)
        idle.start()
        try:
            time.sleep(5)
            before = procfs.cpu_seconds(idle.pid)
            before_precise = procfs.cpu_seconds_precise(idle.pid)
            wall = time.monotonic()
            time.sleep(window)
            used = procfs.cpu_seconds(idle.pid) - before
            used_precise = procfs.cpu_seconds_precise(idle.pid) - before_precise
            elapsed = time.monotonic() - wall
            self.results.add("idle.percent", used / elapsed * 100)
            self.results.add("idle.percent_precise", used_precise / elapsed * 100)
            self.results.add("idle.window", elapsed)
            status = clients.KeepAlive(idle.port)
            try:
                gpu = status.get_json("/v1/status").get("gpu", {})
            finally:
                status.close()
            err = gpu.get("err") if isinstance(gpu, dict) else None
            self.info["idle_nvml"] = (f"NVML not available here ({err})" if err
                                      else "NVML sampled")
            self.log(f"idle: {used * 1000:.0f} ms CPU (stat), {used_precise * 1000:.1f} ms "
                     f"(schedstat) in {elapsed:.1f} s = {used / elapsed * 100:.3f} % of one core")
        finally:
            idle.stop()

    # --- the run -----------------------------------------------------------------------

    def round_estimate(self) -> float:
        options = self.options
        sections = options.sections
        runs = (len(CONCURRENCIES) * len(self.ways) * ("1" in sections)
                + len(SDK_CONCURRENCIES) * 2 * ("1b" in sections))
        return (runs * (options.duration + 0.4)
                + len(self.ways) * options.streams * 1.1 * ("2" in sections)
                + (12 + options.slow_bytes / options.slow_rate) * ("3" in sections) + 4)

    def run(self) -> None:
        options = self.options
        self.log("starting upstreams, nginx and the daemon")
        self.set_up()
        self.warm_up()
        assert self.daemon is not None
        self.results.add("mem.start.rss", procfs.memory_kib(self.daemon.pid)["VmRSS"] / 1024)
        idle = "5" in options.sections and not options.skip_idle
        reserve = 10.0 + (options.idle_window + 12 if idle else 0)
        estimate = self.round_estimate()
        done = 0
        for index in range(options.rounds):
            # The first round only needs to fit by itself: the idle measurement gives way.
            needed = estimate + (10.0 if index == 0 else reserve)
            if time.monotonic() + needed > self.deadline:
                self.info["rounds_cut"] = f"stopped by --time-limit after {done} rounds"
                break
            started = time.monotonic()
            for phase, section, body in (("throughput", "1", self.throughput_round),
                                         ("openai SDK", "1b", self.sdk_round),
                                         ("streaming", "2", self.streaming_round),
                                         ("large bodies", "3", self.transfer_round),
                                         ("/v1/status", "4", self.status_round)):
                if section in options.sections:
                    self.guarded(f"round {index + 1} {phase}", body, index)
            done += 1
            estimate = max(estimate, time.monotonic() - started)
        self.rounds_done = done
        if self.daemon.alive():
            figures = procfs.memory_kib(self.daemon.pid)
            self.results.add("mem.end.rss", figures["VmRSS"] / 1024)
            self.results.add("mem.end.hwm", figures["VmHWM"] / 1024)
        else:
            self.results.errors.append(f"the daemon died:\n{servers.tail(self.daemon.log)}")
        self.daemon.stop()
        if "5" not in options.sections:
            pass
        elif options.skip_idle:
            self.info["idle_skipped"] = "--skip-idle"
        elif self.left() < options.idle_window + 12:
            self.info["idle_skipped"] = "not enough --time-limit left"
        else:
            self.log(f"idle: a fresh daemon, 5 s settle, then {options.idle_window:g} s")
            self.guarded("idle", lambda _index: self.idle(), 0)

    def guarded(self, what: str, body: Callable[[int], None], index: int) -> None:
        """Runs one phase; a failure is recorded and the rest of the run goes on."""
        try:
            body(index)
        except (HarnessError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            detail = "".join(traceback.format_exception_only(exc)).strip()
            self.results.errors.append(f"{what}: {detail}")
            self.log(f"FAILED {what}: {detail}")

    # --- the report --------------------------------------------------------------------

    def report(self) -> str:
        results = self.results
        options = self.options
        parts = [heading("mgpumanager benchmark")]
        machine = procfs.machine()
        rows = [
            ["CPU", machine["cpu"]],
            ["cores", machine["cores"]],
            ["kernel", machine["kernel"]],
            ["Python", machine["python"]],
            ["Twisted", importlib.metadata.version("twisted")],
            ["nginx", servers.nginx_version()],
            ["wrk", wrk_version()],
            ["rounds", f"{getattr(self, 'rounds_done', 0)} of {options.rounds}"
                       + (f" ({self.info['rounds_cut']})" if "rounds_cut" in self.info else "")
                       + "; the order of direct/nginx/daemon/prototype rotates each round"],
            ["wrk run", f"{options.duration:g} s each, threads = min(c, 2), POST 17-byte JSON"],
            ["cells", "median [min..max] over rounds"],
        ]
        if options.quick:
            rows.append(["mode", "--quick (smoke run: fewer rounds, shorter runs)"])
        parts.append(table(["machine", ""], rows, left=2))

        for section in SECTIONS:
            if section in options.sections:
                getattr(self, f"report_{section}")(parts)

        parts.append(heading("Summary"))
        parts.append(targets_table(results))
        verdicts = [results.verdict(target)[1] for target in results.targets]
        parts.append(f"{verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS, "
                     f"{verdicts.count('NOT MEASURED')} not measured")
        if results.errors:
            parts.append(heading("Harness problems"))
            parts.extend(f"- {error}" for error in results.errors)
        return "\n".join(part for part in parts if part)

    def report_1(self, parts: list[str]) -> None:
        results = self.results
        parts.append(heading("1. Requests/s and latency: POST /v1/tts -> fast upstream "
                             "(nginx return 200)"))
        rows = []
        for connections in CONCURRENCIES:
            for way in self.ways:
                key = f"wrk.c{connections}.{way.name}"
                rows.append([
                    str(connections), way.name, results.cell(f"{key}.rps", 0),
                    results.cell(f"{key}.p50", 3), results.cell(f"{key}.p99", 3),
                    results.cell(f"{key}.added_p50", 3) if way.name != "direct" else "",
                    results.cell(f"{key}.cpu_ms", 3), results.cell(f"{key}.errors", 0),
                ])
        parts.append(table(["c", "path", "req/s", "p50 ms", "p99 ms", "added p50 ms",
                            "server CPU ms/req", "errors"], rows, left=2))
        parts.append("server CPU = utime+stime from /proc/<pid>/stat over the wrk run / requests:"
                     "\n  direct = the upstream nginx worker, nginx = the proxy nginx worker, "
                     "daemon = the twistd process,\n  prototype = the card's bare prototype's "
                     "process.\nadded = this path's p50 minus direct's p50 "
                     "in the same round (every daemon request takes the GPU lock).")
        rows = [[str(connections),
                 results.cell(f"wrk.c{connections}.daemon.cpu_ms", 0, scale=1000),
                 results.cell(f"wrk.c{connections}.prototype.cpu_ms", 0, scale=1000),
                 results.cell(f"wrk.c{connections}.ratio", 2)]
                for connections in CONCURRENCIES]
        parts.append(table(["c", "daemon CPU us/req", "prototype CPU us/req",
                            "daemon / prototype"], rows))
        parts.append("The ratio is taken within each round (both ran in it), then its median "
                     "over rounds;\n  the prototype has no access log, metrics, guard, policy "
                     "or Server-Timing.")
        for connections in CONCURRENCIES:
            results.target("1", f"daemon CPU per request, c={connections}",
                           f"wrk.c{connections}.daemon.cpu_ms", 0.9, "ms")
        results.target("1", "daemon added p50 latency, c=1", "wrk.c1.daemon.added_p50", 1.0,
                       "ms")
        results.target("1", f"daemon CPU / the prototype's, c=1 (goal "
                       f"{PROTOTYPE_RATIO_GOAL:g}x)", "wrk.c1.ratio", PROTOTYPE_RATIO_TARGET,
                       "x the prototype")
        parts.append(targets_table(results, "1"))

    def report_1b(self, parts: list[str]) -> None:
        results = self.results
        parts.append(heading(f"1b. The openai SDK's request shape: POST {SDK_PATH} "
                             "-> fast upstream"))
        rows = []
        for connections in SDK_CONCURRENCIES:
            for name in self.sdk_urls:
                key = f"sdk.c{connections}.{name}"
                rows.append([
                    str(connections), name, results.cell(f"{key}.rps", 0),
                    results.cell(f"{key}.p50", 3), results.cell(f"{key}.p99", 3),
                    results.cell(f"{key}.added_p50", 3) if name != "direct" else "",
                    results.cell(f"{key}.cpu_ms", 3), results.cell(f"{key}.errors", 0),
                ])
        parts.append(table(["c", "path", "req/s", "p50 ms", "p99 ms", "added p50 ms",
                            "server CPU ms/req", "errors"], rows, left=2))
        parts.append("The SDK's 13 headers and a 120-byte chat body, routed by openai.chat "
                     "(a GPU job,\nas from the SDK); direct = the same request to the upstream.")
        results.target("1b", "daemon CPU per SDK-shaped request, c=1", "sdk.c1.daemon.cpu_ms",
                       0.9, "ms")
        results.target("1b", "daemon added p50 latency, SDK-shaped, c=1",
                       "sdk.c1.daemon.added_p50", 1.0, "ms")
        parts.append(targets_table(results, "1b"))

    def report_2(self, parts: list[str]) -> None:
        results = self.results
        options = self.options
        parts.append(heading("2. Streaming: POST /v1/llm -> 20 NDJSON lines 50 ms apart "
                             f"({options.streams} streams per path per round)"))
        rows = []
        for way in self.ways:
            key = f"stream.{way.name}"
            if way.name == "direct":
                rows.append([way.name, results.cell(f"{key}.first", 2),
                             results.cell(f"{key}.gap_median", 2),
                             results.cell(f"{key}.gap_max", 2), results.cell(f"{key}.total", 1)])
            else:
                rows.append([f"{way.name} (added)", results.cell(f"{key}.added_first", 2),
                             results.cell(f"{key}.added_gap_median", 2),
                             results.cell(f"{key}.added_gap_max", 2),
                             results.cell(f"{key}.added_total", 1)])
        parts.append(table(["path", "first line ms", "median gap ms", "max gap ms", "total ms"],
                           rows))
        parts.append("direct: absolute times from sending the request; nginx/daemon: minus "
                     "direct's in the same round.")
        results.target("2", "daemon first line, added", "stream.daemon.added_first", 3.0, "ms")
        results.target("2", "daemon max gap vs direct", "stream.daemon.added_gap_max", 5.0, "ms",
                       "|<=|")
        parts.append(targets_table(results, "2"))

    def report_3(self, parts: list[str]) -> None:
        results = self.results
        options = self.options
        size_mb = options.transfer_bytes // MB
        parts.append(heading(f"3. Large bodies and memory: POST /v1/stt, {size_mb} MB down "
                             f"and {size_mb} MB up"))
        rows = []
        for direction in ("down", "up"):
            for way in (way for way in self.ways if way.transfers):
                key = f"big.{direction}.{way.name}"
                rows.append([f"{size_mb} MB {direction}", way.name,
                             results.cell(f"{key}.mbps", 0),
                             results.cell(f"{key}.rss_before", 1),
                             results.cell(f"{key}.growth", 1),
                             results.cell(f"{key}.samples", 0)])
        rows.append([f"{options.slow_bytes // MB} MB down, reader at "
                     f"{options.slow_rate / MB:g} MB/s", "daemon",
                     results.cell("big.slow.daemon.mbps", 1),
                     results.cell("big.slow.daemon.rss_before", 1),
                     results.cell("big.slow.daemon.growth", 1),
                     results.cell("big.slow.daemon.samples", 0)])
        parts.append(table(["transfer", "path", "MB/s", "RSS before MiB", "peak growth MiB",
                            "RSS samples"], rows, left=2))
        parts.append(
            "RSS: VmRSS of the daemon (nginx: its proxy worker) sampled every 20 ms during each "
            "transfer;\n  growth = peak sample minus the RSS just before the transfer.\n"
            f"The slow reader reads {options.slow_bytes // MB} MB (not 200) at "
            f"{options.slow_rate / MB:g} MB/s\n  through a fixed 256 KiB receive buffer, so "
            "the daemon must apply backpressure to the upstream.\n"
            f"Daemon RSS after warm-up {results.cell('mem.start.rss', 1)} MiB, at the end "
            f"{results.cell('mem.end.rss', 1)} MiB; VmHWM at the end "
            f"{results.cell('mem.end.hwm', 1)} MiB\n  (VmHWM is cumulative over the process's "
            "life and cannot be reset unprivileged; hence the sampling).")
        results.target("3", f"daemon RSS growth, {size_mb} MB down", "big.down.daemon.growth",
                       16, "MiB")
        results.target("3", f"daemon RSS growth, {size_mb} MB up", "big.up.daemon.growth", 16,
                       "MiB")
        results.target("3", "daemon RSS growth, slow reader", "big.slow.daemon.growth", 16,
                       "MiB")
        parts.append(targets_table(results, "3"))

    def report_4(self, parts: list[str]) -> None:
        results = self.results
        options = self.options
        parts.append(heading(f"4. GET /v1/status while {QUEUED} jobs wait on the GPU lock "
                             f"({options.status_gets} sequential GETs, one keep-alive "
                             "connection)"))
        rows = [
            ["queue empty", "0", results.cell("status.empty.p50", 2),
             results.cell("status.empty.p99", 2), results.cell("status.empty.max", 2)],
            [f"{QUEUED} queued", results.cell("status.queued.depth", 0),
             results.cell("status.queued.p50", 2), results.cell("status.queued.p99", 2),
             results.cell("status.queued.max", 2)],
        ]
        parts.append(table(["state", "queue_depth seen", "p50 ms", "p99 ms", "max ms"], rows))
        parts.append(f"{QUEUED + 1} POST /v1/image to an upstream that holds its answer: one "
                     f"runs, {QUEUED} queue. Afterwards all were\n  released; answered 200: "
                     f"{results.cell('status.queued.answered_ok', 0)} of {QUEUED + 1}.")
        results.target("4", f"/v1/status p99, {QUEUED} queued", "status.queued.p99", 10.0, "ms")
        parts.append(targets_table(results, "4"))

    def report_5(self, parts: list[str]) -> None:
        results = self.results
        parts.append(heading("5. Idle: four consumers probed every 5 s, NVML sampled every 2 s"))
        if "idle_skipped" in self.info:
            parts.append(f"skipped: {self.info['idle_skipped']}")
        else:
            parts.append(table(["window s", "CPU % of one core (stat)", "(schedstat)"],
                               [[results.cell("idle.window", 1),
                                 results.cell("idle.percent", 3),
                                 results.cell("idle.percent_precise", 3)]], left=0))
            parts.append("a fresh daemon with the same four consumers, measured after a 5 s "
                         "settle;\n  stat = utime+stime (10 ms ticks), schedstat = ns on the CPU "
                         "of its live threads;\n  "
                         f"{self.info.get('idle_nvml', '')}.")
            results.target("5", "idle CPU", "idle.percent", 1.0, "% of a core", "<")
            parts.append(targets_table(results, "5"))


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" [")[0].removeprefix("wrk ") if first else "?"


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise TimeLimitReached(f"--time-limit of {seconds:g} s reached")

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.signal(signal.SIGTERM, terminate)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    for tool in ("wrk",):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                          check=False).returncode:
            print(f"bench: {tool} not found: run bench/setup.sh", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="mgpumanager-bench-"))
    bench = Bench(options, workdir)
    failed = False
    try:
        with hard_limit(options.time_limit):
            try:
                bench.run()
            finally:
                bench.children.stop_all()
    except (HarnessError, TimeLimitReached, OSError, subprocess.SubprocessError) as exc:
        failed = True
        bench.results.errors.append(
            "".join(traceback.format_exception_only(exc)).strip()
            + (f"\ndaemon log:\n{servers.tail(bench.daemon.log)}" if bench.daemon else ""))
    finally:
        bench.children.stop_all()
    print(bench.report(), flush=True)
    if options.keep:
        print(f"\nconfigs and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed or bench.results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
