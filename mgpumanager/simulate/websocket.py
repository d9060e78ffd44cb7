"""
The server side of RFC 6455 WebSockets on twisted.web, small enough to read in one go.

ComfyUI reports progress over a WebSocket, and the daemon must tunnel one; the
simulated ComfyUI therefore needs a real one.  Only what a server needs is here: the
opening handshake (``Sec-WebSocket-Accept``), unmasked frames out, masked frames in,
ping answered by pong, and the closing handshake.  After the ``101`` answer the
connection is taken over from twisted.web, which never sees another byte of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

_CONNECTION_DONE = Failure(ConnectionDone())

#: The largest message a client may send; ComfyUI's clients send nothing big.
MAX_MESSAGE = 1024 * 1024


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def encode_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """
    One final frame; ``mask`` as a client must send it (servers never mask).
    """
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(key, payload)


def _unmask(key: bytes, payload: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


class WebSocketConnection(Protocol):
    """
    One accepted WebSocket.

    :param on_text: called with each complete text message from the client.
    :param on_close: called once when the connection is gone.
    """

    def __init__(self, on_text: Callable[[str], None], on_close: Callable[[], None]) -> None:
        self._on_text = on_text
        self._on_close = on_close
        self._buffer = b""
        self._fragments: list[bytes] = []
        self._closing = False

    def send_text(self, text: str) -> None:
        if not self._closing and self.transport is not None:
            self.transport.write(encode_frame(OP_TEXT, text.encode("utf-8")))

    def send_json(self, document: object) -> None:
        self.send_text(json.dumps(document))

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake; the client's close frame ends the connection."""
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.write(encode_frame(OP_CLOSE, struct.pack("!H", code)))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while (frame := self._take_frame()) is not None:
            self._handle(*frame)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._closing = True
        self._on_close()

    def _take_frame(self) -> tuple[bool, int, bytes] | None:
        data = self._buffer
        if len(data) < 2:
            return None
        fin, opcode = bool(data[0] & 0x80), data[0] & 0x0F
        masked, size, offset = bool(data[1] & 0x80), data[1] & 0x7F, 2
        if size == 126:
            if len(data) < 4:
                return None
            size, offset = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                return None
            size, offset = struct.unpack("!Q", data[2:10])[0], 10
        if not masked or size > MAX_MESSAGE:
            # A client must mask (§5.1); an unmasked or huge frame ends the connection.
            self._fail(1002 if not masked else 1009)
            return None
        if len(data) < offset + 4 + size:
            return None
        key = data[offset : offset + 4]
        payload = _unmask(key, data[offset + 4 : offset + 4 + size])
        self._buffer = data[offset + 4 + size :]
        return fin, opcode, payload

    def _handle(self, fin: bool, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == OP_PING:
            self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            if not self._closing:
                self._closing = True
                self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
            self.transport.loseConnection()
        elif opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            self._fragments.append(payload)
            if fin:
                message, self._fragments = b"".join(self._fragments), []
                if opcode != OP_BINARY:
                    self._on_text(message.decode("utf-8", errors="replace"))

    def _fail(self, code: int) -> None:
        self._buffer = b""
        self.close(code)
        if self.transport is not None:
            self.transport.loseConnection()


class WebSocketResource(Resource):
    """
    Answers a WebSocket handshake with ``101`` and hands the connection to
    ``connection``; anything else is a ``400``, as a server without the upgrade says.
    """

    isLeaf = True

    def __init__(self, connection: WebSocketConnection) -> None:
        super().__init__()
        self._connection = connection

    def render_GET(self, request: Request) -> bytes | int:
        key = request.getHeader("sec-websocket-key")
        upgrade = (request.getHeader("upgrade") or "").lower()
        if key is None or upgrade != "websocket":
            request.setResponseCode(400)
            return b"Expected a WebSocket upgrade"
        # twisted.web would frame a 101 as a chunked body: write the answer ourselves.
        channel = request.channel
        channel.setTimeout(None)
        transport = channel.transport
        assert transport is not None, "a request being rendered has a connection"
        channel.transport = None
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = self._connection
        else:
            transport.protocol = self._connection  # type: ignore[attr-defined]
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_key(key.encode("ascii"))
            + b"\r\n\r\n"
        )
        self._connection.makeConnection(transport)
        # twisted.web paused reading while it handled the request.
        transport.resumeProducing()  # type: ignore[attr-defined]
        return NOT_DONE_YET
