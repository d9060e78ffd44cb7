"""
Tests for :mod:`mgpumanager.web.events` over an in-memory HTTP connection and a
``Clock``: what a client receives first, on a change, when nothing changes,
and that a client who leaves or stops reading is forgotten.
"""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from mgpumanager.web.events import EventFeed
from tests.feed_site import feed_site


class Card:
    """A status document whose figures the test changes."""

    def __init__(self) -> None:
        self.used = 100
        self.builds = 0
        self.clock_text = 0

    def document(self) -> dict[str, Any]:
        self.builds += 1
        self.clock_text += 1  # the time changes on every build, and is not news
        return {"time": f"t{self.clock_text}", "gpu": {"used_mib": self.used}}


class Connection:
    """One client of the feed over an in-memory transport."""

    def __init__(self, site: Site) -> None:
        self.transport = StringTransport()
        self.protocol = site.buildProtocol(None)
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"GET /v1/events HTTP/1.1\r\nHost: daemon\r\n\r\n")

    def received(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def events(self) -> list[dict[str, Any]]:
        """The documents received since the last call (chunk framing ignored)."""
        return [json.loads(line[len("data: "):]) for line in self.received().decode().split("\n")
                if line.startswith("data: ")]

    def leave(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


#: Weak references to every request the feed has served, to check for leaks.
SERVED: list[weakref.ref[Request]] = []


def feed_and_site(card: Card, clock: Clock) -> tuple[EventFeed, Site]:
    feed = EventFeed(card.document, clock)
    feed.start()
    return feed, feed_site(feed, lambda request: SERVED.append(weakref.ref(request)))


def test_a_client_gets_the_retry_delay_and_the_current_document_at_once() -> None:
    card, clock = Card(), Clock()
    feed, site = feed_and_site(card, clock)
    client = Connection(site)
    head, _, body = client.received().partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream" in head
    assert b"retry: 1000\ndata: " in body
    assert json.loads(body.split(b"data: ")[1].split(b"\n")[0]) == {
        "time": "t1", "gpu": {"used_mib": 100}}
    assert feed.running
    client.leave()


def test_a_change_is_sent_within_a_quarter_second_and_no_news_is_not_sent() -> None:
    card, clock = Card(), Clock()
    _feed, site = feed_and_site(card, clock)
    client = Connection(site)
    client.received()
    clock.advance(1.0)
    assert client.events() == []  # only the time changed
    card.used = 5000
    clock.advance(0.25)
    assert [e["gpu"]["used_mib"] for e in client.events()] == [5000]
    client.leave()


def test_at_most_four_documents_a_second_however_fast_things_change() -> None:
    card, clock = Card(), Clock()
    _feed, site = feed_and_site(card, clock)
    client = Connection(site)
    client.received()
    for _step in range(100):
        card.used += 1
        clock.advance(0.01)
    assert len(client.events()) == 4
    assert card.builds <= 1 + 4
    client.leave()


def test_a_quiet_feed_sends_a_heartbeat_comment_every_15_seconds() -> None:
    card, clock = Card(), Clock()
    _feed, site = feed_and_site(card, clock)
    client = Connection(site)
    client.received()
    clock.advance(14.75)
    assert b": heartbeat" not in client.received()
    clock.advance(0.25)
    assert client.received().count(b": heartbeat\n\n") == 1
    clock.advance(15.0)
    assert client.received().count(b": heartbeat\n\n") == 1
    client.leave()


def test_a_client_that_leaves_is_forgotten_and_the_loop_stops() -> None:
    card, clock = Card(), Clock()
    feed, site = feed_and_site(card, clock)
    first, second = Connection(site), Connection(site)
    assert feed.clients == 2
    first.leave()
    assert feed.clients == 1 and feed.running
    request = SERVED[-1]
    second.leave()
    assert feed.clients == 0
    assert not feed.running
    assert clock.getDelayedCalls() == []
    del second
    gc.collect()
    assert request() is None
    builds = card.builds
    clock.advance(60)
    assert card.builds == builds  # nobody listens: nothing is built


def test_a_paused_client_is_sent_nothing_then_the_latest_document() -> None:
    card, clock = Card(), Clock()
    _feed, site = feed_and_site(card, clock)
    client = Connection(site)
    client.received()
    client.transport.producer.pauseProducing()  # its socket is full
    for used in (200, 300, 400):
        card.used = used
        clock.advance(1.0)
    assert client.received() == b""
    client.transport.producer.resumeProducing()
    assert [e["gpu"]["used_mib"] for e in client.events()] == [400]
    client.leave()


def test_a_client_that_stops_reading_is_dropped_after_the_stall_limit() -> None:
    card, clock = Card(), Clock()
    feed, site = feed_and_site(card, clock)
    stuck, reader = Connection(site), Connection(site)
    stuck.transport.producer.pauseProducing()
    for _ in range(39):
        card.used += 1
        clock.advance(0.25)
    assert not stuck.transport.disconnecting and feed.clients == 2
    clock.advance(0.25)
    assert stuck.transport.disconnecting
    stuck.leave()  # the aborted connection closes
    assert feed.clients == 1
    assert len(reader.events()) == 40  # the reader was never held up
    reader.leave()


def test_stopping_the_feed_ends_every_stream() -> None:
    card, clock = Card(), Clock()
    feed, site = feed_and_site(card, clock)
    client = Connection(site)
    client.received()
    feed.stop()
    assert client.received().endswith(b"0\r\n\r\n")  # the chunked body's end
    assert feed.clients == 0 and not feed.running
    late = Connection(site)
    assert b"data: " not in late.received()
