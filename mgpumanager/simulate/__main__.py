"""
``python -m mgpumanager.simulate``: run the simulated GPU host in the foreground.

Prints the servers' URLs, keeps the card's state in ``--card-file`` for a daemon in
another process to sample, and can write a ``consumers.yaml`` for that daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import yaml
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from mgpumanager.simulate.host import HostConfig, SimulatedHost
from mgpumanager.simulate.traffic_log import RequestLog, stats_loop


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mgpumanager.simulate",
        description="Simulated GPU host: inference servers sharing one simulated card.",
    )
    parser.add_argument(
        "--card-file",
        default="sim-card.json",
        help="where the card's state is kept as JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=18760,
        help="mvoice, ollama, comfyui, whisper, speech listen on this port and the next four; "
        "0 picks free ports (default: %(default)s)",
    )
    parser.add_argument(
        "--daemon-config", metavar="PATH", help="also write a consumers.yaml for mgpumanager"
    )
    parser.add_argument("--fast", action="store_true", help="millisecond timings, as in tests")
    parser.add_argument(
        "--request-log",
        metavar="PATH",
        help="append one JSON line per request the servers receive (server, method, path, "
        "X-Request-Id), flushed at once",
    )
    parser.add_argument(
        "--stats-file",
        metavar="PATH",
        help="keep the card's out-of-memory count in this JSON file, rewritten 10 times a second",
    )
    return parser.parse_args(argv)


def host_config(options: argparse.Namespace) -> HostConfig:
    config = HostConfig.fast() if options.fast else HostConfig()
    if options.base_port:
        config = config.with_base_port(options.base_port)
    return attrs.evolve(config, state_path=os.path.abspath(options.card_file))


def write_daemon_config(host: SimulatedHost, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(host.daemon_config(), f, sort_keys=False)


def remove_card_file(path: str | None) -> None:
    # A card file left behind would show a phantom, half-full GPU to the next reader.
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def run(
    reactor: Any,
    config: HostConfig,
    daemon_config: str | None,
    request_log: str | None = None,
    stats_file: str | None = None,
) -> None:
    """Start the host and keep it up until the reactor stops (Ctrl-C, SIGTERM)."""
    host = SimulatedHost(config, clock=reactor)
    if request_log:
        log_requests = RequestLog(request_log)
        for server in host.servers.values():
            server.on_request = log_requests
    await host.start(reactor)
    if stats_file:
        stats_loop(stats_file, host, reactor)
    for name, url in host.urls().items():
        print(f"{name:8} {url}", flush=True)
    print(f"card     {config.total_mib} MiB, state in {config.state_path}", flush=True)
    if daemon_config:
        write_daemon_config(host, daemon_config)
        print(f"daemon   config in {daemon_config}", flush=True)

    async def shut_down() -> None:
        await host.stop()
        remove_card_file(config.state_path)

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(shut_down())
    )
    forever: Deferred[None] = Deferred()
    await forever


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    config = host_config(options)
    # Info and up on stderr; stdout stays ours, for the URLs a script may parse.
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    task.react(
        lambda reactor: Deferred.fromCoroutine(
            run(reactor, config, options.daemon_config, options.request_log, options.stats_file)
        )
    )


if __name__ == "__main__":
    main()
