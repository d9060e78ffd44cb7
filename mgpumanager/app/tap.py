"""
The twistd plugin's options and service.

``twistd -n mgpumanager --config config/consumers.yaml`` runs the daemon in the
foreground.  A bad configuration stops it before anything listens, with one line
naming the file and key.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, cast

from twisted.internet.interfaces import IReactorCore
from twisted.logger import ILogObserver
from twisted.python import usage

from mgpumanager.app.daemon import ManagerService
from mgpumanager.app.service import build
from mgpumanager.common.log_text import text_observer
from mgpumanager.config.document import Config, ConfigError
from mgpumanager.consumers.adapters import load_resolved_config


class Options(usage.Options):
    synopsis = (
        "[--config FILE] [--listen ENDPOINT] "
        "[--simulate [--simulate-control HOST:PORT] | --simulated-card FILE]"
    )
    longdesc = (
        "Run mgpumanager: one HTTP facade (POST /v1/tts, /v1/stt, /v1/llm, /v1/image) "
        "in front of several inference servers, with one global GPU lock, VRAM-aware "
        "eviction and a live GET /v1/status."
    )
    optFlags = [
        [
            "simulate",
            None,
            "Run the simulated GPU host (five simulated inference servers on one "
            "simulated card) inside the daemon, on the ports of the config's consumers: "
            "a demo without a GPU.  Use with --config config/demo.yaml.",
        ],
    ]
    optParameters = [
        ["config", "c", "config/consumers.yaml", "The consumers.yaml file to run."],
        [
            "listen",
            "l",
            None,
            "A Twisted server endpoint overriding the file's listen address, "
            "e.g. tcp:8770:interface=127.0.0.1",
        ],
        [
            "simulated-card",
            None,
            None,
            "Read GPU memory from a simulated card's state file (written by "
            "python -m mgpumanager.simulate) instead of NVML.",
        ],
        [
            "simulate-control",
            None,
            None,
            "With --simulate: open the simulated host's control API (guests arriving "
            "on its cards) on this loopback HOST:PORT.",
        ],
    ]

    def postOptions(self) -> None:
        self["control_address"] = None
        if self["simulate-control"] is not None:
            from mgpumanager.simulate.control import control_address

            if not self["simulate"]:
                raise usage.UsageError("--simulate-control needs --simulate")
            try:
                self["control_address"] = control_address(self["simulate-control"])
            except ValueError as e:
                raise usage.UsageError(f"--simulate-control: {e}") from None
        if self["listen"] is not None:
            from twisted.internet import reactor
            from twisted.internet.endpoints import serverFromString

            try:
                serverFromString(reactor, self["listen"])
            except (ValueError, TypeError) as e:
                raise usage.UsageError(f"--listen {self['listen']!r}: {e}") from None
        try:
            self["loaded_config"] = load_resolved_config(self["config"])
        except ConfigError as e:
            # One clear line and a non-zero exit; the usage text would bury it.
            print(f"mgpumanager: {e}", file=sys.stderr)
            raise SystemExit(2) from None


def makeService(options: Options, reactor: IReactorCore | None = None) -> ManagerService:
    """
    Build the daemon from parsed options.

    :param reactor: the reactor every component runs on (the global one unless a
        test hands in a fake); it must also provide time, TCP and threads.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IReactorCore, global_reactor)
    config: Config = options["loaded_config"]
    stand_ins = None
    if options["simulate"]:
        from mgpumanager.app.demo import simulated_in_process

        stand_ins = simulated_in_process(config, reactor, control=options["control_address"])
    elif options["simulated-card"]:
        from mgpumanager.app.demo import simulated_card_file

        stand_ins = simulated_card_file(options["simulated-card"])
    service = build(config, options["listen"], reactor, stand_ins)
    service.log_observer = stdout_log_observer(getattr(options, "parent", None))
    return service


def stdout_log_observer(server_options: Mapping[str, Any] | None) -> ILogObserver | None:
    """
    The daemon's own text observer on standard output
    (:mod:`mgpumanager.common.log_text`: twistd's lines, for less), where twistd
    would write its text there: in the foreground (``-n``), with no
    ``--logfile`` but ``-``, no ``--syslog`` and no ``--logger``.  Everywhere
    else twistd's own observer is left to do what it was asked.

    ``--debug`` is left to twistd too: it turns ``nodaemon`` on after twistd
    chose where to log (without ``-n``, to ``twistd.log``), but before the
    service is made, so ``nodaemon`` no longer says where that is.

    :param server_options: twistd's parsed options, the plugin options' parent
        (None when the service is made without twistd).
    """
    if server_options is None:
        return None
    if any(server_options.get(option) for option in ("logger", "syslog", "debug")):
        return None
    if not server_options.get("nodaemon") or server_options.get("logfile") not in (None, "", "-"):
        return None
    return text_observer(sys.stdout)
