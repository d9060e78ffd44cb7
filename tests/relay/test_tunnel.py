"""
WebSocket tunnels over real loopback sockets: after the consumer's ``101``
the bytes flow both ways untouched, either side closing closes the other, a
consumer's refusal ends the exchange, and nothing of it is a GPU job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tests.builders import consumer
from tests.web.test_upstream import Stage, eventually, start_stage, stop_stage

UPGRADE = (
    b"GET /upstream/%s/ws?clientId=abc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: a2V5\r\n"
    b"Authorization: Bearer client-secret\r\n\r\n"
)


class EchoAfterUpgrade(Protocol):
    """A consumer that answers the upgrade with 101 (or ``status``) and echoes."""

    def __init__(self, server: FakeWebSocketServer) -> None:
        self.server = server
        self.head = b""
        self.upgraded = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(b"echo:" + data)  # type: ignore[union-attr]
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.server.heads.append(self.head)
            self.server.connections.append(self)
            self.upgraded = self.server.status == b"101"
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 " + self.server.status + b" X\r\nUpgrade: websocket\r\n\r\n"
            )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.server.closed += 1


class FakeWebSocketServer(Factory):
    def __init__(self, status: bytes = b"101") -> None:
        self.status = status
        self.heads: list[bytes] = []
        self.connections: list[EchoAfterUpgrade] = []
        self.closed = 0

    def buildProtocol(self, addr: Any) -> EchoAfterUpgrade:
        return EchoAfterUpgrade(self)


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


@pytest_twisted.async_yield_fixture
async def ws() -> AsyncIterator[tuple[Stage, FakeWebSocketServer, FakeWebSocketServer]]:
    accepting, refusing = FakeWebSocketServer(), FakeWebSocketServer(b"403")
    ports = [reactor.listenTCP(0, f, interface="127.0.0.1") for f in (accepting, refusing)]
    document = {
        "consumers": {
            "comfy": consumer(ports[0].getHost().port, "image"),
            "strict": consumer(ports[1].getHost().port, "image"),
            "down": consumer(1, "image"),
        }
    }
    stage = await start_stage(document, ())
    yield stage, accepting, refusing
    await stop_stage(stage)
    for port in ports:
        await port.stopListening()


async def connect(stage: Stage) -> Client:
    client = Client()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", stage.port.getHost().port)
    await connectProtocol(endpoint, client)
    return client


@pytest_twisted.ensureDeferred
async def test_bytes_flow_both_ways_after_the_101(ws: Any) -> None:
    stage, server, _ = ws
    client = await connect(stage)
    client.transport.write(UPGRADE % b"comfy")  # type: ignore[union-attr]
    await eventually(lambda: b"\r\n\r\n" in client.received)
    assert client.received.startswith(b"HTTP/1.1 101 ")
    head = server.heads[0]
    assert head.startswith(b"GET /ws?clientId=abc HTTP/1.1\r\n")
    assert b"Upgrade: websocket" in head and b"Sec-Websocket-Key: a2V5" in head
    client.transport.write(b"\x81\x05hello")  # type: ignore[union-attr]
    await eventually(lambda: client.received.endswith(b"echo:\x81\x05hello"))
    assert stage.scheduler.total_jobs == 0, "a tunnel is not a GPU job"
    client.transport.loseConnection()  # type: ignore[union-attr]
    await eventually(lambda: server.closed == 1)


@pytest_twisted.ensureDeferred
async def test_the_consumer_closing_closes_the_client(ws: Any) -> None:
    stage, server, _ = ws
    client = await connect(stage)
    client.transport.write(UPGRADE % b"comfy")  # type: ignore[union-attr]
    await eventually(lambda: bool(server.connections))
    server.connections[0].transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_after_a_refusal_nothing_more_reaches_the_consumer(ws: Any) -> None:
    stage, _, server = ws
    client = await connect(stage)
    client.transport.write(UPGRADE % b"strict")  # type: ignore[union-attr]
    await eventually(lambda: b"\r\n\r\n" in client.received)
    assert client.received.startswith(b"HTTP/1.1 403 ")
    client.transport.write(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]
    client.transport.loseConnection()  # type: ignore[union-attr]
    await eventually(lambda: server.closed == 1)
    assert len(server.heads) == 1 and b"/admin" not in server.heads[0]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_consumer_is_answered_as_an_error(ws: Any) -> None:
    stage, _, _ = ws
    client = await connect(stage)
    client.transport.write(UPGRADE % b"down")  # type: ignore[union-attr]
    await eventually(lambda: b"consumer_unreachable" in client.received)
    assert client.received.startswith(b"HTTP/1.1 502 ")
