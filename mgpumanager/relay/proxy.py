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

from collections.abc import Callable
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from mgpumanager.common.answers import Answer
from mgpumanager.common.deadline import within
from mgpumanager.common.errors import (
    BAD_CONSUMER_URL,
    CONSUMER_UNREACHABLE,
    UPSTREAM_TIMEOUT,
    ApiError,
)
from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.relay.failures import classify_call_failure, describe_connection_error
from mgpumanager.relay.headers import relay_response_headers, upstream_headers
from mgpumanager.relay.twisted_private import RequestNotSent
from mgpumanager.relay.twisted_private import response_connection_header as _connection_header

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
    :param agent_for: the ``Agent`` to reach a consumer with: one per connect
        timeout, all over one persistent ``HTTPConnectionPool``.
    :param clock: for the response and idle timeouts.
    :param drop_authorization: keep clients' ``Authorization`` (the daemon's
        own bearer token) from reaching consumers.
    """

    def __init__(
        self,
        agent_for: Callable[[ConsumerConfig], IAgent],
        clock: IReactorTime,
        drop_authorization: bool = False,
    ) -> None:
        self._agent_for = agent_for
        self._clock = clock
        self.drop_authorization = drop_authorization

    def reconfigure(self, config: Config) -> None:
        """Keep clients' ``Authorization`` from the servers while a token is configured."""
        self.drop_authorization = config.auth_token is not None

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
        relayed = self.relay_keeping(request, consumer, method, path, 0)
        return relayed.addCallback(lambda _: None)

    def relay_keeping(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str, cap: int
    ) -> Deferred[Answer]:
        """
        :meth:`relay`, and fire with the answer's status and a copy of its
        body (``None`` once it grew past ``cap`` bytes), for a job that must
        read the answer it passed on unchanged.
        """
        return Deferred.fromCoroutine(self._relay(request, consumer, method, path, cap))

    def _send(
        self, request: Request, consumer: ConsumerConfig, method: str, url: bytes, headers: Any
    ) -> Deferred[IResponse]:
        """
        Send the request; once more, on another connection, when the first
        failed before a byte of it was written (``RequestNotSent``: the pooled
        connection was already closing).  Anything later might have reached
        the consumer, and a POST is never delivered twice.

        An errback rather than a coroutine: it runs on every request, and a
        coroutine's Deferred is a layer more to start and resume.  Cancelling
        the result cancels whichever attempt is under way.
        """

        def send() -> Deferred[IResponse]:
            body = None
            if request.content is not None and method not in ("GET", "HEAD"):
                request.content.seek(0)
                body = FileBodyProducer(request.content)
            return self._agent_for(consumer).request(method.encode("ascii"), url, headers, body)

        def again(failure: Failure) -> Deferred[IResponse]:
            failure.trap(RequestNotSent)
            log.info("upstream {name}: request never sent; sending it again", name=consumer.name)
            return send()

        return send().addErrback(again)

    async def _relay(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str, cap: int
    ) -> Answer:
        url = upstream_url(consumer, path, request.uri)
        client = request.getClientAddress()
        headers = upstream_headers(
            request.requestHeaders,
            getattr(client, "host", None),
            self.drop_authorization,
        )
        timeouts = consumer.timeouts
        try:
            response: IResponse = await within(
                self._send(request, consumer, method, url, headers),
                timeouts.response_seconds,
                self._clock,
                f"upstream {consumer.name}",
            )
        except SchemeNotSupported as e:
            raise ApiError(
                BAD_CONSUMER_URL, f"upstream {consumer.name}: {e}", consumer.name
            ) from None
        except Exception as e:
            how, why = classify_call_failure(e)
            if how == "cancelled":
                raise CancelledError() from None
            if how == "timed_out":
                raise ApiError(
                    UPSTREAM_TIMEOUT,
                    f"upstream {consumer.name}: no response within "
                    f"{timeouts.response_seconds:g} s",
                    consumer.name,
                ) from None
            raise ApiError(
                CONSUMER_UNREACHABLE, f"upstream {consumer.name}: {why}", consumer.name
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
        relay_body = _BodyRelay(
            request, finished, consumer.name, self._clock, timeouts.idle_seconds, cap
        )
        response.deliverBody(relay_body)
        try:
            await finished
        except CancelledError:
            # The consumer's status and headers are already set on the
            # response: no envelope may follow them (a no-op if the client
            # is the one who left).
            abort_client(request)
            raise
        return Answer(response.code, relay_body.copy())


_CONNECTION_DONE = Failure(net_error.ConnectionDone())


@implementer(IPushProducer)
class _PausableSource:
    """
    The consumer's connection as the client's socket sees it.  Pausing and
    resuming restart the idle clock: while paused it times the client (one
    that stops reading must not hold the GPU lock forever), while flowing it
    times the consumer; either way the silence is blamed on the right side.
    """

    def __init__(self, transport: IPushProducer, relay: _BodyRelay) -> None:
        self._transport = transport
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay.paused = True
        self._relay.restart_idle_timer()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._relay.paused = False
        self._relay.restart_idle_timer()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._relay.stop_idle_timer()
        self._transport.stopProducing()


class _BodyRelay(Protocol):
    """
    Writes the consumer's body to the client as it arrives, pausing the
    consumer's connection while the client's socket is full, and giving up
    on a consumer that sends nothing for ``idle`` seconds.
    """

    def __init__(
        self,
        request: Request,
        finished: Deferred[None],
        consumer: str,
        clock: IReactorTime,
        idle: float,
        cap: int = 0,
    ) -> None:
        self._request = request
        self._cap = cap
        self._copy: bytearray | None = bytearray() if cap else None
        self._finished = finished
        self._consumer = consumer
        self._clock = clock
        self._idle = idle
        self._idle_timer: IDelayedCall | None = None
        self._done = False
        #: Whether any of the body was written: until then the client has
        #: received nothing, not even the status line.
        self._wrote = False
        self._producer: _PausableSource | None = None
        self.paused = False

    def connectionMade(self) -> None:
        self._producer = _PausableSource(self.transport, self)  # type: ignore[arg-type]
        self._request.registerProducer(self._producer, True)
        self.restart_idle_timer()

    def dataReceived(self, data: bytes) -> None:
        if not self._done:
            if not self.paused:
                self.restart_idle_timer()
            self._wrote = True
            self._request.write(data)
            if self._copy is not None:
                self._copy += data
                if len(self._copy) > self._cap:
                    self._copy = None

    def copy(self) -> bytes | None:
        """The body as relayed, when a copy was asked for and it stayed under the cap."""
        return bytes(self._copy) if self._copy is not None else None

    def restart_idle_timer(self) -> None:
        if self._done:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._idle)
        else:
            self._idle_timer = self._clock.callLater(self._idle, self._went_idle)

    def stop_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _went_idle(self) -> None:
        self._idle_timer = None
        if self._done:
            return
        stalled = "the client read" if self.paused else f"upstream {self._consumer} sent"
        log.warn(
            "{stalled} nothing for {idle} s mid-response; aborting both sides",
            stalled=stalled,
            idle=self._idle,
        )
        self._done = True
        self._unregister()
        if self._producer is not None:
            self._producer.stopProducing()
        abort_client(self._request)
        self._finished.errback(UpstreamBroke(f"{stalled} nothing for {self._idle:g} s"))

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.stop_idle_timer()
        if self._done:
            return
        self._done = True
        self._unregister()
        # ResponseDone imported by name: twisted.web.client is a deprecation
        # proxy module, whose every attribute read costs a microsecond.
        if reason.check(ResponseDone, http.PotentialDataLoss):
            # PotentialDataLoss: no length and no chunking, so the end of the
            # connection *is* the end of the body (HTTP/1.0 style).
            self._finished.callback(None)
            return
        why = describe_connection_error(reason.value or Exception("unknown"))
        if not self._wrote:
            # Only the consumer's status and headers came, and twisted.web
            # sends those with the first byte of the body: the client has
            # received nothing yet, so it gets the daemon's own answer
            # instead of a connection closed with none.
            log.warn(
                "upstream {consumer} broke before its answer's body: {why}",
                consumer=self._consumer,
                why=why,
            )
            self._request.responseHeaders = Headers()
            self._finished.errback(
                ApiError(
                    CONSUMER_UNREACHABLE,
                    f"upstream {self._consumer}: the connection broke before the "
                    f"answer's body ({why})",
                    self._consumer,
                )
            )
            return
        log.warn(
            "upstream {consumer} broke mid-response: {why}; aborting the client",
            consumer=self._consumer,
            why=why,
        )
        abort_client(self._request)
        self._finished.errback(
            UpstreamBroke(f"upstream {self._consumer} broke mid-response")
        )

    def cancel(self) -> None:
        """The client went away: stop reading from the consumer at once."""
        self.stop_idle_timer()
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


def abort_client(request: Request) -> None:
    """Drop the client's connection at once: an answer begun cannot be taken back."""
    transport: Any = request.transport
    if transport is not None:
        transport.abortConnection()
