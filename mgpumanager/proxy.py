"""
The streaming relay between a client's request and a consumer.

It moves bytes and nothing else: the request body goes up from twisted.web's
buffer (a temporary file past 100 KB) through a ``FileBodyProducer``, never read
whole; the response goes down as it arrives, with the client's socket registered
as the upstream's producer, so a slow client pauses the upstream read instead of
filling our memory.

It deliberately uses the pooled ``Agent`` directly rather than
``treq.HTTPClient.request``: treq always wraps its agent in a
``ContentDecoderAgent``, which adds ``Accept-Encoding: gzip`` and gunzips the
answer, and in a ``CookieAgent``, which would keep one client's cookies for
the next.  A proxy must pass the consumer's bytes through as they were sent.
(The same pool serves treq for probes and lifecycle calls.)

The relay knows no scheduler; the caller decides under which lock it runs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web import http
from twisted.web.client import FileBodyProducer
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.server import Request

from mgpumanager.config import ConsumerConfig
from mgpumanager.errors import (
    BAD_CONSUMER_URL,
    CONSUMER_UNREACHABLE,
    ApiError,
    describe_connection_error,
)
from mgpumanager.headers import relay_response_headers, upstream_headers

log = Logger()


class UpstreamBroke(Exception):
    """
    The consumer failed after its response had started.  The client's
    connection has been aborted, so the truncated response cannot pass for a
    complete one; there is nothing left to answer.
    """


def upstream_url(consumer: ConsumerConfig, path: str, uri: bytes) -> bytes:
    """The consumer URL for ``path``, carrying the inbound query verbatim."""
    _, has_query, query = uri.partition(b"?")
    url = consumer.url.encode("ascii") + path.encode("ascii")
    return url + b"?" + query if has_query else url


class ConsumerProxy:
    """
    :param agent: an ``Agent`` over a persistent ``HTTPConnectionPool``.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def relay(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str
    ) -> Deferred[None]:
        """
        Forward ``request`` to ``consumer`` as ``method path?query`` and
        stream the answer back.  Fires when the whole body has been handed to
        the client's transport; fails with :class:`ApiError` before any of the
        answer was sent, :class:`UpstreamBroke` after.  Cancelling it aborts
        the upstream exchange.
        """
        return Deferred.fromCoroutine(self._relay(request, consumer, method, path))

    async def _relay(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str
    ) -> None:
        url = upstream_url(consumer, path, request.uri)
        body = None
        if request.content is not None and method not in ("GET", "HEAD"):
            request.content.seek(0)
            body = FileBodyProducer(request.content)
        try:
            response: IResponse = await self._agent.request(
                method.encode("ascii"), url, upstream_headers(request.requestHeaders), body
            )
        except CancelledError:
            raise
        except SchemeNotSupported as e:
            raise ApiError(
                BAD_CONSUMER_URL, f"upstream {consumer.name}: {e}", consumer.name
            ) from None
        except Exception as e:
            raise ApiError(
                CONSUMER_UNREACHABLE,
                f"upstream {consumer.name}: {describe_connection_error(e)}",
                consumer.name,
            ) from None

        request.setResponseCode(response.code, response.phrase)
        # twisted.web would otherwise invent "Content-Type: text/html".
        request.defaultContentType = None
        relay_response_headers(
            response.headers, request.responseHeaders, _connection_header(response)
        )
        if response.length is not UNKNOWN_LENGTH:
            # Twisted's client keeps Content-Length out of response.headers.
            request.setHeader(b"content-length", b"%d" % response.length)
        finished: Deferred[None] = Deferred(lambda _: relay_body.cancel())
        relay_body = _BodyRelay(request, finished, consumer.name)
        response.deliverBody(relay_body)
        await finished


_CONNECTION_DONE = Failure(net_error.ConnectionDone())


class _BodyRelay(Protocol):
    """
    Writes the consumer's body to the client as it arrives, pausing the
    consumer's connection while the client's socket is full.
    """

    def __init__(self, request: Request, finished: Deferred[None], consumer: str) -> None:
        self._request = request
        self._finished = finished
        self._consumer = consumer
        self._done = False
        self._producer: IPushProducer | None = None

    def connectionMade(self) -> None:
        self._producer = self.transport  # type: ignore[assignment]
        self._request.registerProducer(self._producer, True)

    def dataReceived(self, data: bytes) -> None:
        if not self._done:
            self._request.write(data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if self._done:
            return
        self._done = True
        self._unregister()
        if reason.check(web_client.ResponseDone, http.PotentialDataLoss):
            # PotentialDataLoss: no length and no chunking, so the end of the
            # connection *is* the end of the body (HTTP/1.0 style).
            self._finished.callback(None)
            return
        log.warn(
            "upstream {consumer} broke mid-response: {why}; aborting the client",
            consumer=self._consumer,
            why=describe_connection_error(reason.value or Exception("unknown")),
        )
        _abort_client(self._request)
        self._finished.errback(
            UpstreamBroke(f"upstream {self._consumer} broke mid-response")
        )

    def cancel(self) -> None:
        """The client went away: stop reading from the consumer at once."""
        if self._done:
            return
        self._done = True
        self._unregister()
        if self._producer is not None:
            self._producer.stopProducing()

    def _unregister(self) -> None:
        request = self._request
        if self._producer is None or request.producer is not self._producer:
            return
        if request.channel is None:
            # The client is gone; its channel went with it.
            request.producer = None
        else:
            request.unregisterProducer()


def _connection_header(response: IResponse) -> list[bytes]:
    """
    The response's own ``Connection`` header.  Twisted's client files it with
    the framing headers, out of ``response.headers``, yet the proxy must drop
    every header it names; only the protocol's parser still holds it.
    """
    try:
        protocol: Any = response._transport._producer.protocol  # type: ignore[attr-defined]
        # Endpoint-made connections wrap the HTTP protocol once.
        protocol = getattr(protocol, "_wrappedProtocol", protocol)
        values: list[bytes] = protocol._parser.connHeaders.getRawHeaders(b"connection", [])
    except AttributeError:
        return []
    return values


def _abort_client(request: Request) -> None:
    transport: Any = request.transport
    if transport is not None:
        transport.abortConnection()
