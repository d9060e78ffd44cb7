"""
``GET /v1/events``: the status document as Server-Sent Events, for the status
page and anything else that would otherwise poll.

While at least one client is connected, a ``LoopingCall`` builds the status
document (through the one function that assembles it) at most four times a
second and sends it when it differs from the last one sent, ignoring its
``time`` field; a quiet feed sends a comment every 15 s so that proxies and
browsers see the connection alive.  Without clients nothing runs.

A client that stops reading must cost nothing: each one is registered as a
push producer on its connection, so a full socket pauses it; a paused client
is sent nothing (it gets the latest document when it drains again), and one
paused for longer than :data:`STALL_SECONDS` is disconnected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from mgpumanager.relay.streaming import abort_client

log = Logger()

#: At most four snapshots a second: smooth enough for a page, cheap to build.
INTERVAL_SECONDS = 0.25
#: A comment this often keeps idle connections from being timed out.
HEARTBEAT_SECONDS = 15.0
#: A client whose socket has not drained for this long is dropped.
STALL_SECONDS = 10.0
#: How long a browser waits before reconnecting.
RETRY_MS = 1000

HEARTBEAT = b": heartbeat\n\n"


def event_frame(document: dict[str, Any]) -> bytes:
    """One SSE message of the default type: the document as one ``data:`` line."""
    return b"data: " + json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _unchanged_key(document: dict[str, Any]) -> str:
    """What decides whether a document is news: everything but its ``time``."""
    return json.dumps({k: v for k, v in document.items() if k != "time"}, sort_keys=True)


@implementer(IPushProducer)
class _Client:
    """One connected reader: its request, and whether its socket is draining."""

    def __init__(self, feed: EventFeed, request: Request) -> None:
        self.feed = feed
        self.request = request
        self.left: Deferred[None] = Deferred(lambda _: feed.forget(self))
        self.paused_since: float | None = None
        self.missed = False

    def send(self, frame: bytes) -> None:
        if self.paused_since is None:
            self.request.write(frame)
        else:
            self.missed = True

    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.feed.now()

    def resumeProducing(self) -> None:
        self.paused_since = None
        if self.missed:
            self.missed = False
            self.request.write(self.feed.latest_frame)

    def stopProducing(self) -> None:
        self.feed.forget(self)


class EventFeed:
    """
    The change feed behind ``/v1/events``.

    :param status: builds the current ``/v1/status`` document.
    :param clock: drives the snapshot loop and the stall checks.
    """

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        clock: IReactorTime,
        *,
        interval: float = INTERVAL_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        stall: float = STALL_SECONDS,
    ) -> None:
        self._status = status
        self._clock = clock
        self._interval = interval
        self._heartbeat = heartbeat
        self._stall = stall
        self._clients: list[_Client] = []
        self._loop: LoopingCall | None = None
        self._last_key: str | None = None
        self._last_sent = 0.0
        self._stopped = False
        self.latest_frame = b""

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def running(self) -> bool:
        """Whether the snapshot loop runs (only while someone listens)."""
        return self._loop is not None and self._loop.running

    def now(self) -> float:
        return self._clock.seconds()

    def start(self) -> None:
        """The service started: clients are welcome."""
        self._stopped = False

    def stop(self) -> None:
        """The service stops: every client's stream ends, the loop with them."""
        self._stopped = True
        for client in list(self._clients):
            self.forget(client)
            client.left.callback(None)

    def serve(self, request: Request) -> bytes | Deferred[None]:
        """Answer one ``GET /v1/events``: a stream until the client leaves."""
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD" or self._stopped:
            return b""
        self._snapshot()
        client = _Client(self, request)
        self._clients.append(client)
        request.registerProducer(client, True)
        request.write(b"retry: %d\n" % RETRY_MS + self.latest_frame)
        if self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=False)
        return client.left

    def forget(self, client: _Client) -> None:
        """Drop every reference to ``client``; the last one out stops the loop."""
        if client not in self._clients:
            return
        self._clients.remove(client)
        if client.request.channel is not None:  # None once the connection is gone
            client.request.unregisterProducer()
        if not self._clients and self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _snapshot(self) -> bool:
        """Build the document; whether it is news since the last one sent."""
        document = self._status()
        key = _unchanged_key(document)
        if key == self._last_key:
            return False
        self._last_key = key
        self.latest_frame = event_frame(document)
        self._last_sent = self.now()
        return True

    def _tick(self) -> None:
        # Run by a LoopingCall: an exception would stop the feed for good.
        try:
            self._drop_stalled()
            if self._snapshot():
                frame = self.latest_frame
            elif self.now() - self._last_sent >= self._heartbeat:
                frame, self._last_sent = HEARTBEAT, self.now()
            else:
                return
            for client in list(self._clients):
                client.send(frame)
        except Exception:
            log.failure("building the event feed failed")

    def _drop_stalled(self) -> None:
        now = self.now()
        for client in list(self._clients):
            if client.paused_since is not None and now - client.paused_since >= self._stall:
                log.info("dropping an event client that stopped reading")
                self.forget(client)
                abort_client(client.request)
