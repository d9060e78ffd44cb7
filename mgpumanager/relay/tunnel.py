"""
WebSocket tunnels: a ``GET`` with ``Upgrade: websocket`` on the passthrough
or a consumer's port becomes a raw byte splice between the client and the
consumer (ComfyUI's ``/ws`` progress feed, which its web UI and most scripts
wait on).

The daemon does not speak WebSocket: it sends the client's upgrade request
on a fresh connection to the consumer, relays whatever comes back (the
``101`` and then frames), and from then on copies bytes both ways, each
side's socket the other's producer, so a slow reader pauses the writer.
Closing either side closes the other.  A tunnel is not a GPU job; the guard
has already passed the request.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpumanager.common.errors import (
    BAD_CONSUMER_URL,
    CONSUMER_UNREACHABLE,
    ApiError,
)
from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.relay.failures import describe_connection_error
from mgpumanager.relay.headers import FORWARDING, without_token_cookie
from mgpumanager.relay.twisted_private import take_over_connection

log = Logger()

#: Never copied onto the upgrade request: we write our own Host.
_NOT_COPIED = FORWARDING | {b"host", b"content-length", b"transfer-encoding"}


def is_websocket_upgrade(request: Request) -> bool:
    """Whether ``request`` asks to become a WebSocket."""
    if request.method != b"GET":
        return False
    for value in request.requestHeaders.getRawHeaders(b"upgrade") or []:
        if b"websocket" in (token.strip().lower() for token in value.split(b",")):
            return True
    return False


_CONNECTION_DONE = Failure(ConnectionDone())


class _Side(Protocol):
    """One end of a splice: what it receives is written to the other end."""

    def __init__(self, tunnel: _Tunnel) -> None:
        self._tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.received(self, data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._tunnel.lost(self, reason)


class _Tunnel:
    """The splice between a client and a consumer, and how it ends."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.upstream = _Side(self)
        self.client = _Side(self)
        self.finished: Deferred[None] = Deferred(lambda _: self.close())
        self._status_line = b""
        #: Once the consumer answered anything but 101, nothing more goes up.
        self._refused = False
        self._tell_web: Any = None

    def splice(self, request: Request) -> None:
        """Take the client's connection over and pair the two sockets."""
        self._tell_web = take_over_connection(request, self.client)
        client, upstream = self.client.transport, self.upstream.transport
        assert client is not None and upstream is not None
        client.registerProducer(upstream, True)  # type: ignore[attr-defined]
        upstream.registerProducer(client, True)  # type: ignore[attr-defined]

    def received(self, side: _Side, data: bytes) -> None:
        if side is self.upstream:
            self._check_status(data)
            target = self.client
        else:
            if self._refused:
                return
            target = self.upstream
        if target.transport is not None:
            target.transport.write(data)

    def _check_status(self, data: bytes) -> None:
        if self._status_line is None:
            return
        self._status_line += data
        line, found, _ = self._status_line.partition(b"\r\n")
        if not found and len(self._status_line) < 1024:
            return
        self._status_line = None  # type: ignore[assignment]
        parts = line.split(b" ")
        if len(parts) < 2 or parts[1] != b"101":
            log.info("upstream {consumer} refused a WebSocket: {line}",
                     consumer=self.consumer, line=line[:200].decode("latin-1"))
            self._refused = True

    def lost(self, side: _Side, reason: Failure) -> None:
        other = self.client if side is self.upstream else self.upstream
        if other.transport is not None:
            other.transport.loseConnection()
        if side is self.client and self._tell_web is not None:
            tell, self._tell_web = self._tell_web, None
            # twisted.web learns the request is over: the dispatcher stops
            # waiting for it, and it is not answered twice.
            tell(reason)

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.loseConnection()


class WebSocketTunnels:
    """
    Opens tunnels to consumers.

    :param drop_authorization: keep the daemon's bearer token from reaching
        consumers, as the relay does.
    """

    def __init__(self, reactor: IReactorTCP | IReactorTime, drop_authorization: bool) -> None:
        self._reactor = reactor
        self.drop_authorization = drop_authorization

    def reconfigure(self, config: Config) -> None:
        """Keep clients' ``Authorization`` from the servers while a token is configured."""
        self.drop_authorization = config.auth_token is not None

    def open(self, request: Request, consumer: ConsumerConfig, raw: bytes) -> Deferred[None]:
        """
        Tunnel ``request`` to ``consumer`` at raw path ``raw`` (plus the
        client's query).  Fails with :class:`ApiError`, answered as usual,
        when the consumer cannot be reached; after that the connection is
        the tunnel's and the Deferred only ends with it.
        """
        return Deferred.fromCoroutine(self._open(request, consumer, raw))

    async def _open(self, request: Request, consumer: ConsumerConfig, raw: bytes) -> None:
        url = urlsplit(consumer.url)
        if url.scheme != "http" or url.hostname is None:
            raise ApiError(
                BAD_CONSUMER_URL,
                f"upstream {consumer.name}: WebSockets are tunnelled to http:// consumers only",
                consumer.name,
            )
        port = url.port or 80
        endpoint = HostnameEndpoint(
            self._reactor, url.hostname, port, timeout=consumer.timeouts.connect_seconds
        )
        tunnel = _Tunnel(consumer.name)
        try:
            await connectProtocol(endpoint, tunnel.upstream)
        except CancelledError:
            raise
        except Exception as e:
            raise ApiError(
                CONSUMER_UNREACHABLE,
                f"upstream {consumer.name}: {describe_connection_error(e)}",
                consumer.name,
            ) from None
        assert tunnel.upstream.transport is not None
        tunnel.upstream.transport.write(self._head(request, raw, url.netloc))
        tunnel.splice(request)
        await tunnel.finished

    def _head(self, request: Request, raw: bytes, netloc: str) -> bytes:
        _, has_query, query = request.uri.partition(b"?")
        target = raw + (b"?" + query if has_query else b"")
        never = _NOT_COPIED | ({b"authorization"} if self.drop_authorization else set())
        lines = [b"GET " + target + b" HTTP/1.1", b"Host: " + netloc.encode("ascii")]
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() == b"cookie":
                values = without_token_cookie(values)
            if name.lower() not in never:
                lines.extend(name + b": " + value for value in values)
        return b"\r\n".join(lines) + b"\r\n\r\n"
