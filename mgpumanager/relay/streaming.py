"""
The answer's body on its way down: written to the client as it arrives from
the consumer, with the client's socket registered as the consumer
connection's producer, so a slow client pauses the upstream read instead of
filling our memory, and an idle clock that blames a silence on the side that
kept it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from mgpumanager.common.errors import CONSUMER_UNREACHABLE, ApiError
from mgpumanager.relay.failures import describe_connection_error

log = Logger()


class UpstreamBroke(Exception):
    """
    The consumer failed after its response had started.  The client's
    connection has been aborted, so the truncated response cannot pass for a
    complete one; there is nothing left to answer.
    """


_CONNECTION_DONE = Failure(net_error.ConnectionDone())


@implementer(IPushProducer)
class _PausableSource:
    """
    The consumer's connection as the client's socket sees it.  Pausing and
    resuming restart the idle clock: while paused it times the client (one
    that stops reading must not hold the GPU lock forever), while flowing it
    times the consumer; either way the silence is blamed on the right side.
    """

    def __init__(self, transport: IPushProducer, relay: BodyRelay) -> None:
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


class BodyRelay(Protocol):
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
        #: Until it is fired (then None: see :meth:`_settle`).
        self._finished: Deferred[None] | None = finished
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
        self._settle(UpstreamBroke(f"{stalled} nothing for {self._idle:g} s"))

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
            self._settle(None)
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
            self._settle(
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
        self._settle(UpstreamBroke(f"upstream {self._consumer} broke mid-response"))

    def cancel(self) -> None:
        """The client went away: stop reading from the consumer at once."""
        self.stop_idle_timer()
        if self._done:
            return
        self._done = True
        self._unregister()
        if self._producer is not None:
            self._producer.stopProducing()
        # The caller's Deferred fails with the cancellation by itself.
        self._producer = self._finished = None

    def _settle(self, error: Exception | None) -> None:
        """
        Fire the caller's Deferred, and let go of it and of our producer:
        each refers back to us, and a cycle left behind on every job would
        wait for the garbage collector instead of going with its last
        reference.
        """
        finished, self._finished, self._producer = self._finished, None, None
        if finished is None:
            return
        if error is None:
            finished.callback(None)
        else:
            finished.errback(error)

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
