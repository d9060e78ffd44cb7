"""
HAProxy's agent check (``agent.listen``): on each connection the daemon writes
one line and closes, and HAProxy weighs or drains this host by it.

Several hosts sit behind HAProxy with ``balance leastconn``.  Connections alone
do not tell HAProxy how long a new job would wait here: a job waiting for the
GPU holds a connection just as a running one does, but every waiting job is one
more a newcomer waits behind.  The agent turns the queue into a weight,
``up ready N%`` with N = max(1, round(100 / (1 + waiting jobs))): an idle host
takes its full share, a host with three jobs waiting a quarter of it, and a
busy host never drops to 0, which would mean "drain".  ``drain`` (weight 0;
requests already stuck to the host still reach it) is answered while no new job
could start here soon: the daemon is stopping, its queue is full (a new job
would be refused ``queue_full``), or every card is yielded to guests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mgpumanager.config.document import Config, Listen
from mgpumanager.scheduling.scheduler import GpuScheduler

log = Logger()


def agent_line(waiting: int, drains: bool) -> bytes:
    """
    The agent's answer: ``drain``, or ``up ready N%`` with the weight share
    N = max(1, round(100 / (1 + waiting))), halves rounded up.

    ``up ready`` rather than a bare weight: HAProxy keeps a server it drained
    in that state until told ``ready``, so every answer says it.
    """
    if drains:
        return b"drain\n"
    share = max(1, math.floor(100 / (1 + waiting) + 0.5))
    return b"up ready %d%%\n" % share


def never() -> bool:
    """The seam's default: no card is ever yielded (the feature is not there)."""
    return False


@attrs.frozen
class HostLoad:
    """
    What the agent answers from, read afresh at each connection.

    :param waiting: the queue depth: jobs waiting for the GPU, not running ones.
    :param queue_full: whether a new job would be refused ``queue_full``.
    :param stopping: whether the daemon has begun to stop.
    :param every_card_yielded: whether every managed card is yielded to guests;
        the yield feature supplies it.
    """

    waiting: Callable[[], int]
    queue_full: Callable[[], bool]
    stopping: Callable[[], bool]
    every_card_yielded: Callable[[], bool] = never

    def drains(self) -> bool:
        """
        The one rule for taking this host out of the balance: no job sent here
        now could start soon, so HAProxy should send it elsewhere.
        """
        return self.stopping() or self.queue_full() or self.every_card_yielded()

    def line(self) -> bytes:
        return agent_line(self.waiting(), self.drains())


def scheduler_load(
    scheduler: GpuScheduler,
    stopping: Callable[[], bool],
    every_card_yielded: Callable[[], bool] = never,
) -> HostLoad:
    """The load of a daemon whose GPU jobs queue in ``scheduler``."""
    return HostLoad(
        waiting=lambda: scheduler.queue_depth,
        queue_full=lambda: scheduler.queue_depth >= scheduler.max_depth,
        stopping=stopping,
        every_card_yielded=every_card_yielded,
    )


class _AgentAnswer(Protocol):
    """Writes the host's line and closes: HAProxy reads until the connection ends."""

    def __init__(self, load: HostLoad) -> None:
        self._load = load

    def connectionMade(self) -> None:
        assert self.transport is not None
        try:
            self.transport.write(self._load.line())
        except Exception:
            # No line is better than a made-up one: HAProxy keeps the last state.
            log.failure("the agent check could not read the host's load")
        self.transport.loseConnection()


class _AgentFactory(Factory):
    noisy = False

    def __init__(self, load: HostLoad) -> None:
        self._load = load

    def buildProtocol(self, addr: Any) -> _AgentAnswer:
        return _AgentAnswer(self._load)


class AgentPort(Service):
    """
    The agent port of the current configuration: opened with the service,
    moved, opened or closed by :meth:`apply` on reload, closed with the service.
    Stopped last, after the running jobs: while they finish, HAProxy must keep
    reading ``drain``.

    :param loopback: whether an endpoint description listens on loopback only.
    """

    def __init__(
        self,
        config: Config,
        load: HostLoad,
        reactor: Any,
        loopback: Callable[[str], bool],
    ) -> None:
        self._config = config
        self._factory = _AgentFactory(load)
        self._reactor = reactor
        self._loopback = loopback
        self._listen: Listen | None = None
        self._port: IListeningPort | None = None

    @property
    def address(self) -> Any:
        """Where the agent listens (its ``getHost()``), or None."""
        return None if self._port is None else self._port.getHost()

    def startService(self) -> None:
        super().startService()
        self.apply(self._config).addErrback(
            lambda failure: log.failure("could not open the agent port", failure)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._close())

    def reconfigure(self, config: Config) -> Deferred[None]:
        """Take a reloaded configuration: :meth:`apply` it."""
        return self.apply(config)

    def apply(self, config: Config) -> Deferred[None]:
        """Listen where ``config`` says, closing the port it no longer names."""
        self._config = config
        return Deferred.fromCoroutine(self._apply(config.agent.listen))

    async def _apply(self, wanted: Listen | None) -> None:
        if wanted == self._listen:
            return
        if self._port is not None:
            await self._close()
            log.info("the agent check no longer answers on {listen}", listen=str(self._listen))
        if wanted is None:
            return
        description = wanted.endpoint_description()
        self._port = await serverFromString(self._reactor, description).listen(self._factory)
        self._listen = wanted
        log.info("the agent check answers on {listen}", listen=str(wanted))
        if not self._loopback(description):
            log.warn(
                "the agent check listens on {listen}, which is not loopback only: anyone "
                "who can reach it can read how busy this host is (let only the balancer in)",
                listen=str(wanted),
            )

    async def _close(self) -> None:
        port, self._port, self._listen = self._port, None, None
        if port is not None:
            await maybeDeferred(port.stopListening)
