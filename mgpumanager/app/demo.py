"""
Stand-ins for running the daemon against the simulated GPU host: ``--simulate``
runs the host inside the daemon, ``--simulated-card`` reads the card of a host
run elsewhere (``python -m mgpumanager.simulate``).  Wiring only: the core never
imports the simulation.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage

from mgpumanager.app.service import StandIns
from mgpumanager.config.cards import one_card
from mgpumanager.config.document import Config

log = Logger()

#: The consumers ``--simulate`` cannot do without; the host's others are optional.
_REQUIRED = ("mvoice", "ollama", "comfyui", "whisper")


def simulated_in_process(
    config: Config,
    reactor: Any,
    time_scale: float = 1.0,
    control: tuple[str, int] | None = None,
) -> StandIns:
    """
    Stand-ins for ``--simulate``: the simulated host runs inside the daemon on
    the ports of the config's consumers, and the daemon reads its card.

    With ``gpus`` in the config, the host has the cards it names (each of its
    ``total_mib``, 16384 when not given; a card named by uuid has that uuid) and each
    simulated server sits on the cards of the consumer of its name.

    :param time_scale: every duration of the simulated servers is divided by it.
    :param control: where the host's control API listens (``--simulate-control``),
        or ``None`` to keep it closed.
    """
    from mgpumanager.simulate.host import PIDS, HostConfig, SimulatedHost, consumer_pids
    from mgpumanager.simulate.nvml import SimulatedNvml

    ports = {}
    for name in PIDS:
        consumer = config.consumers.get(name)
        if consumer is None and name in _REQUIRED:
            raise usage.UsageError(
                f"--simulate needs consumers named {', '.join(_REQUIRED)} (see config/demo.yaml)"
            )
        # A server the config does not name still runs, on a free port.
        ports[name] = (urlsplit(consumer.url).port or 0) if consumer is not None else 0
    host_config = _with_cards(HostConfig().with_ports(ports), config).scaled(time_scale)
    host_config = attrs.evolve(host_config, control=control)
    host = SimulatedHost(host_config, clock=reactor)
    nvml = SimulatedNvml(host.cards)
    return StandIns(
        load_nvml=lambda: nvml,
        find_pids=consumer_pids,
        systemctl=_simulated_systemctl(config.consumers["whisper"].url),
        services=(_SimulatedHostService(host, reactor),),
        process_name=partial(_process_name, nvml),
    )


def _with_cards(host: Any, config: Config) -> Any:
    """The host's cards and placement from ``gpus``; without it, the host as it always was."""
    from mgpumanager.simulate.host import PIDS

    if config.cards == one_card(config.gpu):
        return host
    default_mib = host.total_mib
    sizes = [default_mib] * (max(config.card_indexes) + 1)
    for card in config.cards:
        sizes[card.index] = card.settings.total_mib or default_mib
    placement = {
        name: consumer.cards for name, consumer in config.consumers.items() if name in PIDS
    }
    uuids = {card.index: card.uuid for card in config.cards if card.uuid is not None}
    return attrs.evolve(
        host, total_mib=sizes[0], cards_mib=tuple(sizes), placement=placement, card_uuids=uuids
    )


def simulated_card_file(path: str) -> StandIns:
    """Stand-ins for ``--simulated-card``: a simulated host runs elsewhere."""
    from mgpumanager.simulate.host import consumer_pids
    from mgpumanager.simulate.nvml import SimulatedNvml

    nvml = SimulatedNvml(path)
    return StandIns(
        load_nvml=lambda: nvml,
        find_pids=consumer_pids,
        process_name=partial(_process_name, nvml),
    )


def _simulated_systemctl(whisper_url: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "mgpumanager.simulate.systemctl", "--url", whisper_url)


class _SimulatedHostService(Service):
    def __init__(self, host: Any, reactor: Any) -> None:
        self._host = host
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        started = self._host.start(self._reactor)
        started.addErrback(lambda failure: log.failure("simulated host failed", failure))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopped: Deferred[None] = self._host.stop()
        return stopped


def _process_name(nvml: Any, pid: int) -> str:
    """A simulated process's name, asked of the simulated NVML as of a real one."""
    nvml.nvmlInit()
    try:
        return str(nvml.nvmlSystemGetProcessName(pid))
    finally:
        nvml.nvmlShutdown()
