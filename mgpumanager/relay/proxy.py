"""
The streaming relay between a client's request and a consumer.

It moves bytes and nothing else: the request body goes up from twisted.web's
buffer (:mod:`.upload`), the response comes down as it arrives
(:mod:`.streaming`).

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

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.server import Request

from mgpumanager.common.answers import Answer
from mgpumanager.common.deadline import within
from mgpumanager.common.errors import (
    BAD_CONSUMER_URL,
    CONSUMER_UNREACHABLE,
    UPSTREAM_TIMEOUT,
    ApiError,
)
from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.relay.failures import classify_call_failure
from mgpumanager.relay.headers import host_header, relay_response_headers, upstream_headers
from mgpumanager.relay.streaming import BodyRelay, abort_client
from mgpumanager.relay.twisted_private import RequestNotSent
from mgpumanager.relay.twisted_private import response_connection_header as _connection_header
from mgpumanager.relay.upload import body_producer

log = Logger()


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
        answer was sent, :class:`~mgpumanager.relay.streaming.UpstreamBroke`
        after.  Cancelling it aborts
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

        Deferreds chained by hand rather than a coroutine: this runs on every
        job, and a coroutine is one more Deferred to start and resume.
        """
        url = upstream_url(consumer, path, request.uri)
        client = request.getClientAddress()
        headers = upstream_headers(
            request.requestHeaders,
            getattr(client, "host", None),
            self.drop_authorization,
        )
        headers.setRawHeaders(b"host", [host_header(consumer.url)])
        try:
            sending = self._send(request, consumer, method, url, headers)
        except Exception:
            # Raised before anything went out (a URL the agent refuses): a
            # failure to reach the consumer like any other.
            sending = fail()
        answered = within(
            sending,
            consumer.timeouts.response_seconds,
            self._clock,
            f"upstream {consumer.name}",
        )
        return answered.addCallbacks(
            self._relay_body, _sending_failed,
            callbackArgs=(request, consumer, cap), errbackArgs=(consumer,),
        )

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
                body = body_producer(request.content)
            return self._agent_for(consumer).request(method.encode("ascii"), url, headers, body)

        def again(failure: Failure) -> Deferred[IResponse]:
            failure.trap(RequestNotSent)
            log.info("upstream {name}: request never sent; sending it again", name=consumer.name)
            return send()

        return send().addErrback(again)

    def _relay_body(
        self, response: IResponse, request: Request, consumer: ConsumerConfig, cap: int
    ) -> Deferred[Answer]:
        """The answer's head is in: pass it on, then stream its body to the client."""
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
        relay_body = BodyRelay(
            request, finished, consumer.name, self._clock, consumer.timeouts.idle_seconds, cap
        )
        response.deliverBody(relay_body)

        def relayed(_: None) -> Answer:
            return Answer(response.code, relay_body.copy())

        def cancelled(failure: Failure) -> Failure:
            if failure.check(CancelledError):
                # The consumer's status and headers are already set on the
                # response: no envelope may follow them (a no-op if the
                # client is the one who left).
                abort_client(request)
            return failure

        return finished.addCallbacks(relayed, cancelled)


def _sending_failed(failure: Failure, consumer: ConsumerConfig) -> Failure:
    """Why no answer came, as the job's error: the kind of failure, in words."""
    error = failure.value or Exception("unknown")
    name = consumer.name
    if isinstance(error, SchemeNotSupported):
        return Failure(ApiError(BAD_CONSUMER_URL, f"upstream {name}: {error}", name))
    how, why = classify_call_failure(error)
    if how == "cancelled":
        return Failure(CancelledError())
    if how == "timed_out":
        seconds = consumer.timeouts.response_seconds
        return Failure(ApiError(
            UPSTREAM_TIMEOUT, f"upstream {name}: no response within {seconds:g} s", name
        ))
    return Failure(ApiError(CONSUMER_UNREACHABLE, f"upstream {name}: {why}", name))
