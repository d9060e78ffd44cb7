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

from mgpumanager.simulate.control import control_address
from mgpumanager.simulate.host import PROFILE_FIELDS, HostConfig, SimulatedHost
from mgpumanager.simulate.traffic_log import RequestLog, stats_loop


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mgpumanager.simulate",
        description="Simulated GPU host: inference servers sharing simulated cards.",
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
    parser.add_argument(
        "--cards",
        type=_card_sizes,
        default=(),
        metavar="MIB,MIB,...",
        help="several cards of these sizes, such as 24576,24576 (default: one 16384 MiB card)",
    )
    parser.add_argument(
        "--place",
        action="append",
        type=_placement,
        default=[],
        metavar="SERVER=CARD,...",
        help="the cards a server sits on, such as comfyui=1 (default: comfyui on the last "
        "card, the others on card 0); repeat for several servers",
    )
    parser.add_argument("--fast", action="store_true", help="millisecond timings, as in tests")
    parser.add_argument(
        "--request-log",
        metavar="PATH",
        help="append one JSON line per request the servers receive (server, method, path, "
        "X-Request-Id), flushed at once",
    )
    parser.add_argument(
        "--control",
        type=_control,
        metavar="HOST:PORT",
        help="open the control API on this loopback address (port 0: a free one): "
        "POST /guests, DELETE /guests/PID, GET /card",
    )
    parser.add_argument(
        "--stats-file",
        metavar="PATH",
        help="keep the card's out-of-memory count in this JSON file, rewritten 10 times a second",
    )
    return parser.parse_args(argv)


def _card_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MiB: {text!r}") from None
    if not sizes or any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"every card needs a positive size: {text!r}")
    return sizes


def _control(text: str) -> tuple[str, int]:
    try:
        return control_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _placement(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, cards = text.partition("=")
    try:
        indexes = tuple(int(part) for part in cards.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not SERVER=CARD,...: {text!r}") from None
    if name not in PROFILE_FIELDS or any(index < 0 for index in indexes):
        servers = ", ".join(PROFILE_FIELDS)
        raise argparse.ArgumentTypeError(f"not SERVER=CARD,... (servers: {servers}): {text!r}")
    return name, indexes


def host_config(options: argparse.Namespace) -> HostConfig:
    config = HostConfig.fast() if options.fast else HostConfig()
    if options.base_port:
        config = config.with_base_port(options.base_port)
    if options.cards:
        config = attrs.evolve(config, total_mib=options.cards[0], cards_mib=options.cards)
    if options.place:
        config = attrs.evolve(config, placement=dict(options.place))
    for name in PROFILE_FIELDS:
        for index in config.cards_of(name):
            if index >= len(config.card_sizes):
                raise SystemExit(f"--place: {name} on card {index}, but the host has "
                                 f"{len(config.card_sizes)} card(s)")
    return attrs.evolve(
        config, state_path=os.path.abspath(options.card_file), control=options.control
    )


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
    if len(config.card_sizes) == 1:
        print(f"card     {config.total_mib} MiB, state in {config.state_path}", flush=True)
    else:
        for index, mib in enumerate(config.card_sizes):
            servers = ", ".join(name for name in PROFILE_FIELDS if index in config.cards_of(name))
            print(f"card {index}   {mib} MiB: {servers or 'no server'}", flush=True)
        print(f"cards    state in {config.state_path}", flush=True)
    if host.control_url is not None:
        print(f"control  {host.control_url}", flush=True)
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
