"""
Per-server ports: ``consumers.<name>.listen`` opens an extra port that looks
exactly like that server (every path forwarded as ``/upstream/<name>/``
would be), for clients that cannot be given a path prefix, such as the
``ollama`` CLI's ``OLLAMA_HOST`` or a web UI that expects a server's root.

Each port is a site of its own with the daemon's guard and the consumer's
body limit.  :meth:`ConsumerPorts.apply` opens the ports a configuration
names and closes the ones it no longer names, so a reload can move them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Request

from mgpumanager.config.document import Config
from mgpumanager.web.declare import route
from mgpumanager.web.guard import Guard
from mgpumanager.web.passthrough import FORWARDED, Passthrough
from mgpumanager.web.routing import RouteTable, raw_rest
from mgpumanager.web.site import ManagerSite

log = Logger()


class ConsumerPort:
    """
    The one route of a consumer's own port: every path and method, forwarded
    to that consumer as the passthrough would.
    """

    def __init__(self, name: str, passthrough: Passthrough) -> None:
        self._name = name
        self._passthrough = passthrough

    @route("/", None, FORWARDED)
    @route("/<path:rest>", None, FORWARDED)
    def forward(self, request: Request, rest: str = "") -> Deferred[Any]:
        consumer = self._passthrough.config.consumers[self._name]
        return self._passthrough.forward(request, consumer, b"/" + raw_rest(request))


@attrs.frozen
class _PortKey:
    consumer: str
    listen: str


class ConsumerPorts(Service):
    """
    The per-server ports of the current configuration.

    :param loopback: whether an endpoint description listens on loopback
        only (the guard's Host check applies then).
    """

    def __init__(
        self,
        config: Config,
        passthrough: Passthrough,
        reactor: Any,
        loopback: Callable[[str], bool],
    ) -> None:
        self._config = config
        self._passthrough = passthrough
        self._reactor = reactor
        self._loopback = loopback
        self._open: dict[_PortKey, IListeningPort] = {}
        self._guards: dict[_PortKey, Guard] = {}
        self._routes: dict[_PortKey, RouteTable] = {}

    @property
    def addresses(self) -> dict[str, Any]:
        """Where each consumer's port listens (its ``getHost()``), by consumer."""
        return {key.consumer: port.getHost() for key, port in self._open.items()}

    def startService(self) -> None:
        super().startService()
        self.apply(self._config).addErrback(
            lambda failure: log.failure("could not open a consumer port", failure)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._close(list(self._open))

    def reconfigure(self, config: Config) -> Deferred[None]:
        """Take a reloaded configuration: :meth:`apply` it."""
        return self.apply(config)

    def apply(self, config: Config) -> Deferred[None]:
        """
        Open every port ``config`` names that is not open, close every open
        one it no longer names.  Fails (after closing what it must) if a port
        cannot be opened.
        """
        self._config = config
        wanted = {
            _PortKey(name, str(consumer.listen))
            for name, consumer in config.consumers.items()
            if consumer.listen is not None
        }
        return Deferred.fromCoroutine(self._apply(config, wanted))

    async def _apply(self, config: Config, wanted: set[_PortKey]) -> None:
        await self._close([key for key in self._open if key not in wanted])
        for key in self._open:
            # A port that stays open takes the new origins, token and limits at once.
            self._guards[key].reconfigure(config)
            self._routes[key].reconfigure(config)
        for key in sorted(wanted - set(self._open), key=str):
            listen = config.consumers[key.consumer].listen
            assert listen is not None
            description = listen.endpoint_description()
            port = await serverFromString(self._reactor, description).listen(
                self._site(config, key, description)
            )
            self._open[key] = port
            log.info("consumer {consumer} also answers on {listen}",
                     consumer=key.consumer, listen=key.listen)

    def _site(self, config: Config, key: _PortKey, description: str) -> ManagerSite:
        routes = self._routes[key] = RouteTable(
            [ConsumerPort(key.consumer, self._passthrough)], config, {"consumer": key.consumer}
        )
        guard = self._guards[key] = Guard(config, self._loopback(description), routes)
        return ManagerSite(routes.resource, routes.body_limit, guard, routes.error_shape)

    def _close(self, keys: list[_PortKey]) -> Deferred[None]:
        for key in keys:
            self._guards.pop(key, None)
            self._routes.pop(key, None)
        closing = [self._open.pop(key).stopListening() for key in keys]
        done: Deferred[Any] = DeferredList([d for d in closing if d is not None])
        return done.addCallback(lambda _: None)
