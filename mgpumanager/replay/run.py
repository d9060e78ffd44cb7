"""
``python -m mgpumanager.replay``: one trace, one policy, the real daemon.

Starts the study host (:mod:`mgpumanager.replay.study_host`) in this process
and ``twistd -n mgpumanager`` as a child reading its card, with a generated
config in which every duration is divided by the time scale (polling intervals
never below ``POLL_FLOOR_SECONDS``); replays the trace through the daemon's
HTTP API; then prints the per-class table with swaps, the seconds spent
unloading and loading, out-of-memory events, the scale, the floor and the
daemon's CPU use, so that a distorted run shows as one.

``--cards`` runs the study host on several cards (the image model alone on
the last), to set what a second card buys against the same trace on one;
``--rate`` makes the trace arrive faster, so that jobs per hour measure what
the host gets through rather than the trace's own arrivals.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from mgpumanager.config.scheduling import SchedulingConfig
from mgpumanager.replay.client import MAX_SCALE, POLL_FLOOR_SECONDS, Replayer, scaled_interval
from mgpumanager.replay.report import JobRecord, format_table
from mgpumanager.replay.study_host import CARD_MIB, SMALL_CARD_MIB, StudyHost
from mgpumanager.replay.traces import SHAPES, TraceJob, read_trace, sped_up

#: The ``scheduling`` keys that are durations, divided by the time scale.
_SCALED = ("batch_guard_seconds", "swap_bound_seconds", "linger_seconds")


@attrs.frozen
class Settings:
    """What one replay runs with."""

    policy: str
    scale: float = MAX_SCALE
    card_mib: int = CARD_MIB
    #: Each card's MiB on a host with several (``card_mib`` is then unused).
    cards_mib: tuple[int, ...] = ()
    #: The ``scheduling`` keys besides ``policy``, unscaled (trace seconds).
    scheduling: tuple[tuple[str, Any], ...] = ()


def daemon_config(host: StudyHost, settings: Settings, trace_seconds: float) -> dict[str, Any]:
    """A daemon config for ``host`` with every duration divided by the scale."""
    scale = settings.scale
    # The daemon's own defaults, scaled like every other duration, so that a
    # replay without options measures what an operator gets out of the box.
    defaults = SchedulingConfig()
    scheduling = {key: getattr(defaults, key) for key in _SCALED} | dict(settings.scheduling)
    for key in _SCALED:
        scheduling[key] = scheduling[key] / scale
    gpu: dict[str, Any] = {"reserved_mib": 0,
                           "poll_interval_seconds": scaled_interval(2.0, scale)}
    cards: dict[str, Any] = {}
    if settings.cards_mib:
        cards["gpus"] = [{"index": n, "total_mib": mib}
                         for n, mib in enumerate(settings.cards_mib)]
    else:
        gpu["total_mib"] = settings.card_mib
    return {
        "gpu": gpu,
        **cards,
        "probes": {"interval_seconds": scaled_interval(5.0, scale),
                   "timeout_seconds": max(0.5, 3.0 / scale)},
        "lifecycle": {"verify_interval_seconds": scaled_interval(0.25, scale),
                      "verify_timeout_seconds": 10.0 / scale,
                      "settle_seconds": 1.0 / scale},
        # Waits under FIFO run past the default 600 s: nothing may time out
        # before the trace is over, so the comparison is of waits, not refusals.
        "queue": {"max_depth": 512, "max_wait_seconds": (trace_seconds + 3600) / scale},
        "routing": {kind: server.name for server in host.servers for kind in server.study.kinds},
        "consumers": host.consumers(),
        "scheduling": {"policy": settings.policy, **scheduling},
    }


def card_sizes(text: str) -> tuple[int, ...]:
    """``--cards``: at least two positive sizes in MiB, comma-separated."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MiB: {text!r}") from None
    if len(sizes) < 2 or any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"two or more positive sizes, not {text!r}")
    return sizes


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_daemon(
    config_path: Path, card_path: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    twistd = str(Path(sys.executable).with_name("twistd"))
    process = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "mgpumanager", "--config", str(config_path),
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--simulated-card", str(card_path)],
        cwd=config_path.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited at start; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the daemon did not start; see {log}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@attrs.frozen
class Outcome:
    records: list[JobRecord]
    unloads: int
    unload_seconds: float
    load_seconds: float
    ooms: int
    daemon_cpu_seconds: float
    wall_seconds: float
    status: dict[str, Any]

    def notes(self, settings: Settings) -> list[str]:
        sizes = settings.cards_mib or (settings.card_mib,)
        return [
            f"cards {' + '.join(f'{mib} MiB' for mib in sizes)}"
            + ("; image work on the last card" if len(sizes) > 1 else ""),
            f"policy {settings.policy}; swaps (unloads) {self.unloads}; unloading "
            f"{self.unload_seconds:.0f} s, loading {self.load_seconds:.0f} s; "
            f"out-of-memory events {self.ooms}",
            f"time scale {settings.scale:g} (polling floor {POLL_FLOOR_SECONDS * 1000:.0f} ms); "
            f"wall {self.wall_seconds:.0f} s; daemon CPU {self.daemon_cpu_seconds:.1f} s "
            f"({100 * self.daemon_cpu_seconds / max(self.wall_seconds, 1e-9):.0f}% of one core)",
        ]


async def replay(reactor: Any, jobs: Sequence[TraceJob], settings: Settings,
                 workdir: Path) -> Outcome:
    """Run the whole replay: host, daemon, trace, figures."""
    import json

    from treq import get

    host = StudyHost(settings.card_mib, settings.scale, str(workdir / "card.json"), reactor,
                     cards_mib=settings.cards_mib)
    await host.start(reactor)
    trace_seconds = max((job.at for job in jobs), default=0.0)
    config_path = workdir / "consumers.yaml"
    config_path.write_text(yaml.safe_dump(daemon_config(host, settings, trace_seconds)))
    port = _free_port()
    process = _start_daemon(config_path, workdir / "card.json", port, workdir / "daemon.log")
    try:
        cpu_before, began = cpu_seconds(process.pid), time.monotonic()
        records = await Replayer(f"http://127.0.0.1:{port}", settings.scale, reactor).replay(jobs)
        wall = time.monotonic() - began
        cpu = cpu_seconds(process.pid) - cpu_before
        response = await get(f"http://127.0.0.1:{port}/v1/status")
        status = json.loads(await response.content())
    finally:
        process.terminate()
        process.wait(timeout=30)
        await host.stop()
    unloads, unloading, loading = host.swap_seconds()
    return Outcome(records, unloads, unloading, loading, host.oom_count, cpu, wall, status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mgpumanager.replay",
        description="Replay a workload trace through the daemon with a scheduling policy.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a JSONL trace")
    source.add_argument("--shape", choices=sorted(SHAPES), help="generate one of these")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, help="trace seconds (default: the shape's)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="arrivals this many times as often (service times unchanged)")
    parser.add_argument("--policy", choices=("interactive-first", "fifo"), required=True)
    parser.add_argument("--scale", type=float, default=MAX_SCALE,
                        help=f"time scale, above 0 and at most {MAX_SCALE:g}")
    parser.add_argument("--max-bypass", type=int, help="scheduling.max_bypass")
    parser.add_argument("--linger", type=float, help="scheduling.linger_seconds (trace seconds)")
    parser.add_argument("--card-mib", type=int,
                        help=f"card size (default {CARD_MIB}; {SMALL_CARD_MIB} for card16)")
    parser.add_argument("--cards", type=card_sizes, default=(), metavar="MIB,MIB,...",
                        help="several cards of these sizes, the image model alone on the "
                             "last (e.g. 24576,24576); replaces --card-mib")
    options = parser.parse_args(argv)
    if not 0 < options.scale <= MAX_SCALE:
        parser.error(f"--scale must be above 0 and at most {MAX_SCALE:g}")
    if options.rate <= 0:
        parser.error("--rate must be above 0")
    if options.cards and options.card_mib is not None:
        parser.error("--cards replaces --card-mib: give one of them")
    if options.trace is not None:
        jobs = read_trace(options.trace)
    else:
        make = SHAPES[options.shape]
        jobs = make(options.seed) if options.duration is None else make(  # type: ignore[call-arg]
            options.seed, options.duration)
    if options.rate != 1:
        jobs = sped_up(jobs, options.rate)
    card = options.card_mib or (SMALL_CARD_MIB if options.shape == "card16" else CARD_MIB)
    scheduling: dict[str, Any] = {}
    if options.max_bypass is not None:
        scheduling["max_bypass"] = options.max_bypass
    if options.linger is not None:
        scheduling["linger_seconds"] = options.linger
    settings = Settings(options.policy, options.scale, card, options.cards,
                        tuple(scheduling.items()))

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    def run(reactor: Any) -> Any:
        async def go() -> None:
            with tempfile.TemporaryDirectory(prefix="mgpu-replay-") as workdir:
                outcome = await replay(reactor, jobs, settings, Path(workdir))
            print(format_table(outcome.records, outcome.notes(settings)), end="")
        return ensureDeferred(go())

    del reactor
    react(run)
    return 0
