"""
The event feed on real loopback sockets: fifty readers while the document
changes four times a second, and one client that connects and never reads.
The stalled one is dropped once its socket stops draining, the readers carry
on, and once everyone has gone nothing is left: no client, no loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from mgpumanager.web.events import EventFeed
from tests.feed_site import feed_site
from tests.support import sleep

READERS = 50
#: Each document is this big and changes at each tick: a stalled socket
#: would be owed megabytes within seconds if the feed buffered for it.
DOCUMENT_BYTES = 256 * 1024
STALL_SECONDS = 2.0


def busy_card() -> Callable[[], dict[str, Any]]:
    builds = 0

    def document() -> dict[str, Any]:
        nonlocal builds
        builds += 1
        return {"time": "now", "jobs": builds, "log": "x" * DOCUMENT_BYTES}

    return document


class Reader(Protocol):
    def __init__(self) -> None:
        self.events = 0
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.events += data.count(b"data: ")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


def stalled_client(port: int, stop: threading.Event, received: list[int]) -> None:
    """Connects with a tiny receive window, asks for the feed, then never reads."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        stop.wait(30)
        # Now drain what the kernel held for us: that is all we were ever sent.
        sock.settimeout(1)
        total, deadline = 0, time.monotonic() + 5
        try:
            while (chunk := sock.recv(1 << 16)) and time.monotonic() < deadline:
                total += len(chunk)
        except OSError:
            pass
        received.append(total)




@pytest_twisted.ensureDeferred
async def test_fifty_readers_and_a_stalled_client_leave_nothing_behind() -> None:
    feed = EventFeed(busy_card(), reactor, stall=STALL_SECONDS)
    feed.start()
    port = reactor.listenTCP(0, feed_site(feed), interface="127.0.0.1")
    number = port.getHost().port
    stop, received = threading.Event(), []
    stalled = threading.Thread(target=stalled_client, args=(number, stop, received))
    try:
        stalled.start()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number)
        readers = [Reader() for _ in range(READERS)]
        for reader in readers:
            await connectProtocol(endpoint, reader)
        while feed.clients < READERS + 1:
            await sleep(0.05)
        started = time.monotonic()
        while feed.clients > READERS and time.monotonic() - started < 10:
            await sleep(0.25)
        dropped_after = time.monotonic() - started
        assert feed.clients == READERS, "the stalled client was never dropped"
        assert dropped_after < 10
        await sleep(1.0)
        assert all(reader.events >= 4 for reader in readers)  # the readers carried on

        for reader in readers:
            assert reader.transport is not None
            reader.transport.loseConnection()
        for reader in readers:
            await reader.closed
        await sleep(0.1)
        assert feed.clients == 0
        assert not feed.running
    finally:
        stop.set()
        await deferToThread(stalled.join)
        await port.stopListening()
        feed.stop()
    produced = DOCUMENT_BYTES * 4 * dropped_after
    # What reached the stalled client is what the kernel buffers held, a
    # fraction of what was produced meanwhile: the feed kept nothing for it.
    assert received and received[0] < produced / 2

