"""
Tests for :mod:`mgpumanager.relay.twisted_private`: each private Twisted API the daemon
relies on still exists and still does what we use it for on the installed Twisted.
A failure here after a Twisted upgrade names the attribute that changed; the
matching function's docstring says what it is needed for.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.application import app as twisted_app
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor as _reactor
from twisted.internet.base import ReactorBase
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from mgpumanager.relay.endpoints import ReusedEndpoints
from mgpumanager.relay.failures import is_cancellation
from mgpumanager.relay.twisted_private import (
    ParsedOnceAgent,
    QuietClientFactory,
    WrapperException,
    fail_start_on_listen_error,
    forget_exit_signal,
    quiet_connections,
    request_line,
    response_connection_header,
    take_over_connection,
)

reactor: Any = _reactor


def step(obj: object, name: str, where: str) -> Any:
    """``getattr`` that fails with the private attribute's full name."""
    assert hasattr(obj, name), f"Twisted changed: {where}.{name} is gone"
    return getattr(obj, name)


class _Canned(Protocol):
    """Answers every connection with ``self.factory.answer``, or never."""

    def dataReceived(self, data: bytes) -> None:
        answer: bytes | None = self.factory.answer  # type: ignore[attr-defined]
        if answer is not None and self.transport is not None:
            self.transport.write(answer)


@pytest.fixture
def canned_server() -> Iterator[tuple[Factory, int]]:
    factory = Factory.forProtocol(_Canned)
    factory.answer = None  # type: ignore[attr-defined]
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield factory, port.getHost().port
    port.stopListening()


@pytest.fixture
def pool() -> Iterator[HTTPConnectionPool]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield pool
    pool.closeCachedConnections()


def proxy_agent(pool: HTTPConnectionPool) -> Agent:
    """An agent that connects as the proxy does."""
    return ParsedOnceAgent.usingEndpointFactory(reactor, ReusedEndpoints(reactor, 5), pool=pool)


class _Seen(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((request.uri, request.getHeader(b"host")))
        return b"ok"


@pytest_twisted.ensureDeferred
async def test_the_parsed_once_agent_sends_each_url_as_the_agent_does(
    pool: HTTPConnectionPool,
) -> None:
    step(Agent, "_requestWithEndpoint", "twisted.web.client.Agent")
    step(Agent, "_getEndpoint", "twisted.web.client.Agent")
    recorder = _Seen()
    port: IListeningPort = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    agent = proxy_agent(pool)
    base = b"http://127.0.0.1:%d" % port.getHost().port
    try:
        for url in [base + b"/api/tts", base + b"/api/tts", base + b"/api/tts?x=%2F"]:
            response = await agent.request(b"POST", url)
            assert await treq.content(response) == b"ok"
        with pytest.raises(SchemeNotSupported):
            await agent.request(b"GET", b"gopher://127.0.0.1/")
    finally:
        await port.stopListening()

    host = base.removeprefix(b"http://")
    assert recorder.seen == [(b"/api/tts", host), (b"/api/tts", host), (b"/api/tts?x=%2F", host)]


@pytest_twisted.ensureDeferred
async def test_response_connection_header_reads_the_hidden_connection_header(
    canned_server: tuple[Factory, int], pool: HTTPConnectionPool
) -> None:
    factory, port = canned_server
    factory.answer = (  # type: ignore[attr-defined]
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Trace\r\nX-Trace: 1\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    response = await proxy_agent(pool).request(b"GET", b"http://127.0.0.1:%d/" % port)

    assert not response.headers.hasHeader(b"connection"), (
        "Twisted now shows Connection in response.headers: "
        "response_connection_header may read it publicly"
    )
    transport = step(response, "_transport", "twisted.web._newclient.Response")
    producer = step(transport, "_producer", "twisted.web._newclient.TransportProxyProducer")
    protocol = step(producer, "protocol", "the TCP transport")
    protocol = getattr(protocol, "_wrappedProtocol", protocol)
    parser = step(protocol, "_parser", "twisted.web._newclient.HTTP11ClientProtocol")
    step(parser, "connHeaders", "twisted.web._newclient.HTTPClientParser")
    assert response_connection_header(response) == [b"close, X-Trace"]
    assert await treq.content(response) == b"ok"


@pytest_twisted.ensureDeferred
async def test_a_cancelled_request_is_told_apart_through_the_wrapper_exceptions_reasons(
    canned_server: tuple[Factory, int], pool: HTTPConnectionPool
) -> None:
    _, port = canned_server  # accepts, never answers
    request = proxy_agent(pool).request(b"GET", b"http://127.0.0.1:%d/" % port)
    await deferred_later(0.05)

    request.cancel()

    with pytest.raises(Exception) as raised:
        await request
    error = raised.value
    assert isinstance(error, WrapperException), (
        f"Twisted changed: a cancelled request fails with {type(error).__name__}, "
        "not a twisted.web._newclient._WrapperException"
    )
    assert any(
        reason.check(CancelledError) for reason in step(error, "reasons", type(error).__name__)
    )
    assert is_cancellation(error)
    for public in ("ResponseFailed", "ResponseNeverReceived", "RequestTransmissionFailed"):
        assert issubclass(getattr(web_client, public), WrapperException), (
            f"Twisted changed: twisted.web.client.{public} no longer derives from "
            "twisted.web._newclient._WrapperException"
        )


def deferred_later(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def test_request_line_is_known_to_the_channel_before_the_body_is_read() -> None:
    seen: list[tuple[bytes, bytes]] = []

    class Recording(Request):
        def gotLength(self, length: int | None) -> None:
            step(self.channel, "_command", "twisted.web.http.HTTPChannel")
            step(self.channel, "_path", "twisted.web.http.HTTPChannel")
            seen.append(request_line(self.channel))
            super().gotLength(length)

    channel = HTTPChannel()
    channel.requestFactory = Recording  # type: ignore[assignment]
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"POST /v1/tts?voice=a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    )

    assert seen == [(b"POST", b"/v1/tts?voice=a")]
    channel.connectionLost(Failure(CancelledError()))


def test_take_over_connection_hands_the_socket_to_another_protocol() -> None:
    class Splice(Protocol):
        received = b""

        def dataReceived(self, data: bytes) -> None:
            self.received += data

    splice = Splice()
    ends: list[object] = []

    class TakenOver(Request):
        def process(self) -> None:
            step(self.channel, "_dataBuffer", "twisted.web.http.HTTPChannel")
            self.notifyFinish().addBoth(ends.append)
            tell_web.append(take_over_connection(self, splice))

    tell_web: list[Any] = []
    channel = HTTPChannel()
    channel.requestFactory = TakenOver  # type: ignore[assignment]
    transport = StringTransport()
    transport.protocol = channel  # type: ignore[attr-defined]
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")

    assert transport.protocol is splice  # type: ignore[attr-defined]
    assert splice.transport is transport
    assert transport.producer is None, "the channel no longer paces the socket"
    assert channel.timeOut is None, "the idle timer no longer runs"
    transport.protocol.dataReceived(b"frame")  # type: ignore[attr-defined]
    assert splice.received == b"frame"
    assert ends == []
    tell_web[0](Failure(CancelledError()))
    assert len(ends) == 1, "twisted.web learns that the request is over"


def test_quiet_connections_makes_the_pool_build_quiet_factories() -> None:
    pool = HTTPConnectionPool(reactor, persistent=False)
    built: list[Any] = []

    class Endpoint:
        def connect(self, factory: Any) -> Deferred[Any]:
            built.append(factory)
            return Deferred()

    quiet_connections(pool)
    pool.getConnection(("http", b"127.0.0.1", 1), Endpoint())  # type: ignore[arg-type]

    assert len(built) == 1
    assert isinstance(built[0], QuietClientFactory), (
        "Twisted changed: HTTPConnectionPool no longer builds its connections "
        f"with _factory (it used {type(built[0]).__name__})"
    )
    assert built[0].noisy is False


def test_fail_start_on_listen_error_makes_a_taken_port_raise_at_start() -> None:
    taken: IListeningPort = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    try:
        endpoint = TCP4ServerEndpoint(reactor, taken.getHost().port, interface="127.0.0.1")
        service = StreamServerEndpointService(endpoint, Factory())
        fail_start_on_listen_error(service)
        with pytest.raises(CannotListenError):
            service.privilegedStartService()
    finally:
        taken.stopListening()


def test_forget_exit_signal_clears_what_sigterm_records_and_twistd_reads() -> None:
    assert "reactor._exitSignal" in inspect.getsource(twisted_app), (
        "Twisted changed: twistd no longer reads reactor._exitSignal; "
        "forget_exit_signal has nothing to clear"
    )
    stopped: list[Any] = []
    stand_in = SimpleNamespace(
        callFromThread=stopped.append, stop=lambda: None, _exitSignal=None
    )
    ReactorBase.sigTerm(stand_in, signal.SIGTERM)  # type: ignore[arg-type]
    assert stand_in._exitSignal == signal.SIGTERM, (
        "Twisted changed: ReactorBase.sigTerm no longer records _exitSignal"
    )
    assert stopped, "ReactorBase.sigTerm no longer stops the reactor"

    forget_exit_signal(stand_in)

    assert stand_in._exitSignal is None


def test_the_pool_still_hands_connections_back_through_put_connection() -> None:
    """
    ``ReusePool`` overrides ``_putConnection`` and reads the protocol's
    ``_parser`` there; ``tests/relay/test_connection_reuse.py`` shows the whole
    behaviour on sockets, this names what it relies on.
    """
    from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser

    from mgpumanager.relay.twisted_private import RequestNotSent, ReusePool

    assert "key, connection" in str(inspect.signature(HTTPConnectionPool._putConnection))
    assert "_parser" in inspect.getsource(HTTP11ClientProtocol._finishResponse_WAITING)
    assert "connHeaders" in inspect.getsource(HTTPClientParser)
    assert "_timeouts" in inspect.getsource(HTTPConnectionPool._putConnection)
    assert issubclass(RequestNotSent, Exception)
    pool = ReusePool(_reactor, lambda *_: None, lambda key: 4.0)
    assert pool.persistent


def test_the_pool_reads_its_idle_timeout_as_each_connection_goes_in() -> None:
    """
    ``ReusePool`` sets ``cachedConnectionTimeout`` to the connection's idle
    time just before handing it to ``_putConnection``, which must read it
    there (rather than move the timer after, which costs a failed heap search).
    """
    assert "self.cachedConnectionTimeout" in inspect.getsource(
        HTTPConnectionPool._putConnection
    )
