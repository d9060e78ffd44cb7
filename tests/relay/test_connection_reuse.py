"""
Upstream connections are reused only while the server keeps them: never after
an HTTP/1.0 answer without keep-alive or a ``Connection: close``, never past
the server's ``Keep-Alive: timeout`` (less a second) or our own
``keepalive_seconds``; and a POST is sent again only when it provably never
left (``RequestNotSent``).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.test.requesthelper import DummyRequest

from mgpumanager.common.errors import ApiError
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.bodies import read_body
from mgpumanager.relay.endpoints import ReusedEndpoints
from mgpumanager.relay.headers import reuse_for
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.relay.twisted_private import RequestNotSent, ReusePool
from mgpumanager.web.limits import idle_limit


@attrs.define
class Seen:
    """What the raw server saw: requests per connection, and connections closed."""

    per_connection: list[int] = attrs.Factory(list)
    closed: list[Deferred[None]] = attrs.Factory(list)


class RawServer(Protocol):
    """
    Answers every request with ``answer``; a second request on a connection
    whose first answer said the connection ends is never answered (the
    server has already closed its side), which is how the race looks.
    """

    def __init__(self, seen: Seen, answer: bytes, closes: bool) -> None:
        self.seen, self.answer, self.closes = seen, answer, closes
        self.buffer = b""
        self.index = len(seen.per_connection)
        seen.per_connection.append(0)
        self.lost: Deferred[None] = Deferred()
        seen.closed.append(self.lost)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.seen.per_connection[self.index] += 1
            if self.closes and self.seen.per_connection[self.index] > 1:
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return
            self.transport.write(self.answer)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


HTTP10 = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
KEEP_ALIVE_3 = (
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=3\r\nContent-Length: 2\r\n\r\nok"
)


@attrs.define
class Upstream:
    url: str
    seen: Seen


async def serve(answer: bytes, closes: bool) -> AsyncIterator[Upstream]:
    seen = Seen()
    factory = Factory.forProtocol(lambda: RawServer(seen, answer, closes))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield Upstream(f"http://127.0.0.1:{port.getHost().port}", seen)
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def http10_server() -> AsyncIterator[Upstream]:
    async for upstream in serve(HTTP10, closes=True):
        yield upstream


@pytest_twisted.async_yield_fixture
async def keep_alive_server() -> AsyncIterator[Upstream]:
    async for upstream in serve(KEEP_ALIVE_3, closes=False):
        yield upstream


def config_for(url: str, keepalive: float = 4.0) -> Any:
    return parse_config(
        {
            "routing": {"tts": "voice"},
            "consumers": {
                "voice": {
                    "url": url,
                    "health": {"path": "/health"},
                    "paths": {"tts": {"path": "/tts"}},
                    "timeouts": {"keepalive_seconds": keepalive},
                }
            },
        }
    )


def proxy_over(pool: ReusePool) -> ConsumerProxy:
    agent = Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor, 2), pool=pool)
    return ConsumerProxy(lambda consumer: agent, reactor)


class ClientRequest(DummyRequest):
    """A client request whose socket never fills (DummyRequest's own spins)."""

    channel = object()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def post(body: bytes = b'{"text": "hi"}') -> DummyRequest:
    request = ClientRequest([b"v1", b"tts"])
    request.method = b"POST"
    request.uri = b"/v1/tts"
    request.content = io.BytesIO(body)
    return request


# -- the decision --------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive", "expected"),
    [
        ((b"HTTP", 1, 0), [], [], None),
        ((b"HTTP", 1, 0), [b"Keep-Alive"], [], float("inf")),
        ((b"HTTP", 1, 1), [b"close"], [], None),
        ((b"HTTP", 1, 1), [b"foo, Close"], [], None),
        ((b"HTTP", 1, 1), [], [], float("inf")),
        ((b"HTTP", 1, 1), [], [b"timeout=5, max=100"], 4.0),
        ((b"HTTP", 1, 1), [], [b"max=100, timeout=junk"], float("inf")),
    ],
)
def test_reuse_follows_the_answers_version_and_connection_headers(
    version: tuple[bytes, int, int], connection: list[bytes], keep_alive: list[bytes],
    expected: float | None,
) -> None:
    assert reuse_for(version, connection, keep_alive) == expected


def test_our_idle_limit_is_the_consumers_keepalive_seconds() -> None:
    config = config_for("http://127.0.0.1:9", keepalive=2.5)
    assert idle_limit(config, (b"http", b"127.0.0.1", 9)) == 2.5
    assert idle_limit(config, (b"http", b"127.0.0.1", 10)) == 4.0


# -- on real sockets -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_posts_after_http10_answers_each_get_a_fresh_connection(
    http10_server: Upstream,
) -> None:
    config = config_for(http10_server.url)
    pool = ReusePool(reactor, reuse_for, lambda key: 4.0)
    proxy = proxy_over(pool)
    try:
        for _ in range(5):
            request = post()
            await proxy.relay(request, config.consumers["voice"], "POST", "/tts")
            assert request.responseCode == 200
            assert b"".join(request.written) == b"ok"
        assert http10_server.seen.per_connection == [1] * 5
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_twisteds_own_pool_would_lose_the_second_post(http10_server: Upstream) -> None:
    """The race this guards against, shown with the pool's default rules."""
    from twisted.web.client import HTTPConnectionPool

    config = config_for(http10_server.url)
    pool = HTTPConnectionPool(reactor, persistent=True)
    proxy = ConsumerProxy(
        lambda consumer: Agent.usingEndpointFactory(
            reactor, ReusedEndpoints(reactor, 2), pool=pool
        ),
        reactor,
    )
    try:
        await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
        with pytest.raises(ApiError) as lost:
            await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
        assert lost.value.kind.code == "consumer_unreachable"
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_is_dropped_a_second_before_the_servers_timeout(
    keep_alive_server: Upstream,
) -> None:
    config = config_for(keep_alive_server.url)
    clock = Clock()
    pool = ReusePool(clock, reuse_for, lambda key: 4.0)
    proxy = proxy_over(pool)
    await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
    assert not keep_alive_server.seen.closed[0].called
    clock.advance(1.9)
    assert not keep_alive_server.seen.closed[0].called
    clock.advance(0.2)  # server said 3 s: dropped after 2
    await keep_alive_server.seen.closed[0]
    await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_our_keepalive_seconds_wins_when_shorter(keep_alive_server: Upstream) -> None:
    config = config_for(keep_alive_server.url)
    clock = Clock()
    pool = ReusePool(clock, reuse_for, lambda key: 0.5)
    proxy = proxy_over(pool)
    await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
    clock.advance(0.6)
    await keep_alive_server.seen.closed[0]
    await pool.closeCachedConnections()


# -- retrying a POST --------------------------------------------------------------


class FailingAgent:
    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0

    def request(self, method: bytes, uri: bytes, headers: Any, body: Any) -> Deferred[Any]:
        self.calls += 1
        return fail(self.errors.pop(0))


@pytest_twisted.ensureDeferred
async def test_a_post_never_sent_is_sent_once_more_and_only_once() -> None:
    config = config_for("http://127.0.0.1:9")
    agent = FailingAgent([RequestNotSent(), RequestNotSent()])
    proxy = ConsumerProxy(lambda consumer: agent, reactor)  # type: ignore[arg-type,return-value]
    with pytest.raises(ApiError) as refused:
        await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
    assert refused.value.kind.code == "consumer_unreachable"
    assert agent.calls == 2


class RefusingAgent:
    """An agent that refuses the request as it is handed over (a URL it cannot send)."""

    def request(self, method: bytes, uri: bytes, headers: Any, body: Any) -> Deferred[Any]:
        raise ValueError(f"invalid URI {uri!r}")


@pytest_twisted.ensureDeferred
async def test_a_request_the_agent_refuses_at_once_is_a_consumer_unreachable() -> None:
    config = config_for("http://127.0.0.1:9")
    proxy = ConsumerProxy(lambda consumer: RefusingAgent(), reactor)  # type: ignore[arg-type,return-value]
    with pytest.raises(ApiError) as refused:
        await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
    assert refused.value.kind.code == "consumer_unreachable"
    assert "upstream voice" in refused.value.message


@pytest_twisted.ensureDeferred
async def test_a_post_that_may_have_been_written_is_never_sent_again() -> None:
    config = config_for("http://127.0.0.1:9")
    agent = FailingAgent([ResponseNeverReceived([]), RequestNotSent()])
    proxy = ConsumerProxy(lambda consumer: agent, reactor)  # type: ignore[arg-type,return-value]
    with pytest.raises(ApiError):
        await proxy.relay(post(), config.consumers["voice"], "POST", "/tts")
    assert agent.calls == 1


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_in_its_answers_last_chunk_is_never_reused(
    keep_alive_server: Upstream,
) -> None:
    """
    A reader that stops in the middle of an answer's last chunk (here a capped
    read of a 2-byte body with a 1-byte cap: a probe's or a lifecycle call's)
    closes the connection while Twisted's parser still finishes the answer and
    hands the connection back.  Pooled, the next POST was written into the
    closing socket, reached the server, and failed with no answer: a 502 for
    a job that ran.
    """
    config = config_for(keep_alive_server.url)
    pool = ReusePool(reactor, reuse_for, lambda key: 4.0)
    agent = Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor, 2), pool=pool)
    proxy = ConsumerProxy(lambda consumer: agent, reactor)
    try:
        response = await agent.request(b"GET", keep_alive_server.url.encode() + b"/health")
        assert await read_body(response, 1) is None
        # The parser finishes the answer after the reader stopped, and the
        # connection goes back to the pool; the next request comes on the
        # next turn of the reactor, before the close is done.
        await deferLater(reactor, 0, lambda: None)
        request = post()
        await proxy.relay(request, config.consumers["voice"], "POST", "/tts")
        assert request.responseCode == 200
        assert b"".join(request.written) == b"ok"
        # The POST went once, on a connection of its own.
        assert keep_alive_server.seen.per_connection == [1, 1]
    finally:
        await pool.closeCachedConnections()
