"""
Every use of a private Twisted API, in one place.

Each function here reaches past Twisted's public API because that API lacks
something the daemon needs; its docstring says what and why.  Nothing else in
the package may touch a private Twisted name.  ``tests/relay/test_twisted_private.py``
checks each use against the installed Twisted, so an upgrade that changes one
fails there, naming the attribute, instead of quietly changing what a client
sees or how the daemon exits.  setup.cfg bounds Twisted's version for the same
reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent as _RequestNotSent
from twisted.web._newclient import _ensureValidURI, _WrapperException
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

#: Twisted's base of the client errors that carry a list of underlying
#: failures in ``reasons`` (``ResponseFailed``, ``RequestGenerationFailed``,
#: ``ResponseNeverReceived``...).  It is not exported, yet a cancelled request
#: and a refused connection can only be told apart through those reasons.
WrapperException = _WrapperException

#: The client's proof that no byte of a request was written (its connection
#: was no longer usable when the request was handed to it): the one failure
#: after which even a POST may be sent again.  ``twisted.web.client`` imports
#: it but does not declare it exported.
RequestNotSent = _RequestNotSent


def response_connection_header(response: IResponse) -> list[bytes]:
    """
    The raw values of an upstream answer's own ``Connection`` header.

    Twisted's client files ``Connection`` with the framing headers, out of
    ``response.headers``, and no public API returns it; yet a proxy must drop
    every header that ``Connection`` names.  Only the client protocol's parser
    still holds it: ``response._transport`` (a ``TransportProxyProducer``)
    ``._producer`` (the TCP transport) ``.protocol`` (the
    ``HTTP11ClientProtocol``, wrapped once by an endpoint's
    ``_WrappingProtocol``) ``._parser.connHeaders``.  An answer reached any
    other way has no such chain: then there is nothing to drop.
    """
    try:
        protocol: Any = response._transport._producer.protocol  # type: ignore[attr-defined]
        protocol = getattr(protocol, "_wrappedProtocol", protocol)
        values: list[bytes] = protocol._parser.connHeaders.getRawHeaders(b"connection", [])
    except AttributeError:
        return []
    return values


def request_line(channel: Any) -> tuple[bytes, bytes]:
    """
    The method and target of the request an ``HTTPChannel`` is reading.

    ``Request.gotLength`` runs once the headers are parsed, before the body,
    and is the last moment to refuse a body unread; but Twisted gives the
    request its method and path only after the body, in ``requestReceived``.
    Until then the channel keeps them in ``_command`` and ``_path``.
    """
    method: bytes = getattr(channel, "_command", b"") or b""
    target: bytes = getattr(channel, "_path", b"") or b""
    return method, target


class QuietClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory without its "Starting factory" and
    "Stopping factory" log lines: one pair per upstream connection is noise.
    The factory is private, and ``HTTPConnectionPool`` offers no public way to
    choose it.
    """

    noisy = False


def quiet_connections(pool: HTTPConnectionPool) -> None:
    """Make ``pool`` open its connections with :class:`QuietClientFactory`."""
    pool._factory = QuietClientFactory


class ReusePool(HTTPConnectionPool):
    """
    A connection pool that keeps a connection only as long as its server
    will, and never one that is already closing: Twisted's pool reuses a
    connection after an HTTP/1.0 answer that did not ask for keep-alive,
    keeps idle ones for ``cachedConnectionTimeout`` whatever the server said,
    and takes back a connection whose transport a reader closed in the
    middle of the answer's last chunk.  A server that
    closes first (Python's ``http.server`` at once, uvicorn after 5 s) then
    loses the next request on it: "connection closed before any response".

    The decision needs the answer's version and its ``Connection`` and
    ``Keep-Alive`` headers, which only the client protocol's parser holds
    (``connection._parser.response.version``, ``._parser.connHeaders``) at the
    moment the protocol hands itself back through the private
    ``_putConnection``.

    :param reuse_for: ``(version, Connection values, Keep-Alive values)`` ->
        idle seconds allowed, or ``None`` to close it now.
    :param idle_limit: ``pool key`` -> the most idle seconds our side allows.
    """

    def __init__(
        self,
        reactor: Any,
        reuse_for: Callable[[tuple[bytes, int, int], list[bytes], list[bytes]], float | None],
        idle_limit: Callable[[Any], float],
    ) -> None:
        super().__init__(reactor, persistent=True)
        self._reuse_for = reuse_for
        self._idle_limit = idle_limit
        self._default_idle = self.cachedConnectionTimeout

    def _putConnection(self, key: Any, connection: Any) -> None:
        transport = getattr(connection, "transport", None)
        if transport is None or getattr(transport, "disconnecting", False):
            # Someone already closed it while the answer was still being
            # parsed: a reader that stopped producing in the answer's last
            # chunk (a capped read, a cancelled relay).  Twisted's pool keeps
            # it all the same, and the next request is written into the
            # closing socket: it may reach the server, but its answer never
            # comes back (ResponseNeverReceived), so even a POST that ran
            # fails, and cannot safely be sent again.
            return
        parser = getattr(connection, "_parser", None)
        response = getattr(parser, "response", None)
        if parser is None or response is None:
            self.cachedConnectionTimeout = self._default_idle
            super()._putConnection(key, connection)
            return
        headers = parser.connHeaders
        idle = self._reuse_for(
            response.version,
            headers.getRawHeaders(b"connection", []),
            headers.getRawHeaders(b"keep-alive", []),
        )
        if idle is not None:
            idle = min(idle, self._idle_limit(key))
        if idle is None or idle <= 0:
            connection.transport.loseConnection()
            return
        # The pool's own timer is set for ``cachedConnectionTimeout``, read as
        # the connection goes in: set it to this connection's idle time rather
        # than move the timer after.  A timer made in this reactor turn is not
        # in the reactor's heap yet, so moving it sooner fails a list search
        # whose ValueError builds the DelayedCall's repr: per request.
        # (Typed int by Twisted; it only goes to callLater, which takes a float.)
        self.cachedConnectionTimeout = idle  # type: ignore[assignment]
        super()._putConnection(key, connection)


class ParsedOnceAgent(Agent):
    """
    Twisted's ``Agent``, parsing each URL once.  ``Agent.request`` parses the
    URL on every call (``URI.fromBytes``, 5 to 9 µs: a good share of a
    pooled request), and the relay sends a consumer's jobs to the same few
    URLs.  The request then goes on as ``Agent.request`` itself sends it,
    through the private ``_requestWithEndpoint``.
    """

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        parsed = _parsed_uri(uri)
        try:
            endpoint = self._getEndpoint(parsed)
        except SchemeNotSupported:
            return fail()
        key = (parsed.scheme, parsed.host, parsed.port)
        return self._requestWithEndpoint(  # type: ignore[no-any-return]
            key, endpoint, method, parsed, headers, bodyProducer, parsed.originForm
        )


@functools.lru_cache(maxsize=512)
def _parsed_uri(uri: bytes) -> URI:
    """A URL as the agent reads it (read, never changed, by the requests it makes)."""
    parsed: URI = URI.fromBytes(_ensureValidURI(uri.strip()))
    return parsed


def fail_start_on_listen_error(service: StreamServerEndpointService) -> None:
    """
    Make the service's start raise when its port cannot be opened (in use,
    no permission), so ``twistd`` reports it and exits instead of running a
    daemon that serves nothing.  ``strports.service`` sets the same private
    flag; a service built from an endpoint has no public switch for it.
    """
    service._raiseSynchronously = True


def forget_exit_signal(reactor: Any) -> None:
    """
    Make a stop caused by SIGTERM or SIGINT end the process with status 0.

    The reactor records the signal that stopped it in ``_exitSignal`` and
    ``twistd`` re-raises it on the way out, so a graceful shutdown reads as
    "killed by SIGTERM" to systemd.  There is no public way to say that the
    stop was orderly, so the record is cleared once shutdown has completed.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def take_over_connection(request: Any, protocol: IProtocol) -> Callable[[Failure], None]:
    """
    Hand the client connection a request came on to ``protocol``, for good
    (a WebSocket tunnel after the consumer's ``101``); returns what must be
    called with the reason once the connection is lost, so that twisted.web
    still learns the request is over.

    twisted.web has no public way to give up a connection: its
    ``HTTPChannel`` is the transport's protocol (``transport.protocol``, a
    ``tcp.Server`` attribute), times the connection out (``setTimeout``),
    is registered as the transport's producer, and keeps bytes that arrive
    while a request is being handled in ``_dataBuffer``.  Each is undone
    here: the channel's timer stopped, its producer registration dropped,
    the protocol replaced and the transport resumed, and buffered bytes
    handed to the new protocol.
    """
    channel: Any = request.channel
    transport: Any = channel.transport
    channel.setTimeout(None)
    owner = transport.protocol
    pending = b"".join(getattr(channel, "_dataBuffer", []))
    channel._dataBuffer = []
    transport.unregisterProducer()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    transport.resumeProducing()
    if pending:
        protocol.dataReceived(pending)
    lost: Callable[[Failure], None] = owner.connectionLost
    return lost
