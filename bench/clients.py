"""
Small blocking HTTP/1.1 clients for the benchmark, on raw sockets so that every byte
and every line is timestamped when it arrives.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import time
from typing import Any

HOST = "127.0.0.1"
RECV_SIZE = 1 << 20


class HarnessError(Exception):
    """The benchmark itself could not do what it meant to (not a missed target)."""


def connect(port: int, rcvbuf: int | None = None, timeout: float = 60.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Set before connecting: a fixed receive buffer turns off the kernel's autotuning,
        # so a slow reader really pushes back instead of being absorbed by a 32 MB buffer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    sock.connect((HOST, port))
    return sock


def request_head(method: str, port: int, path: str, length: int | None,
                 content_type: str = "application/json", close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if length is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {length}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Response:
    """The head of an answer, and an incremental decoder for its body."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise HarnessError(f"connection closed before an answer head: {buffer!r}")
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self.remaining = int(length) if length is not None and not self.chunked else -1
        self.done = self.remaining == 0
        self._pending = rest
        self._buffer = b""
        self._chunk_left = 0
        self._state = "size"

    def read(self, size: int = RECV_SIZE) -> bytes:
        """The next decoded piece of the body; b"" once it is complete."""
        while not self.done:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = self.sock.recv(size)
                if not data:
                    if self.remaining < 0 and not self.chunked:
                        self.done = True
                        return b""
                    raise HarnessError("connection closed before the answer was complete")
            decoded = self._feed(data)
            if decoded or self.done:
                return decoded
        return b""

    def read_all(self) -> bytes:
        parts = []
        while part := self.read():
            parts.append(part)
        return b"".join(parts)

    def _feed(self, data: bytes) -> bytes:
        if not self.chunked:
            if self.remaining >= 0:
                data = data[: self.remaining]
                self.remaining -= len(data)
                self.done = self.remaining == 0
            return data
        self._buffer += data
        out = []
        while True:
            if self._state == "data":
                if not self._buffer:
                    break
                piece = self._buffer[: self._chunk_left]
                self._buffer = self._buffer[len(piece):]
                self._chunk_left -= len(piece)
                out.append(piece)
                if self._chunk_left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buffer) < 2:
                    break
                self._buffer = self._buffer[2:]
                self._state = "size"
            else:
                line, found, rest = self._buffer.partition(b"\r\n")
                if not found:
                    break
                self._buffer = rest
                if self._state == "trailer":
                    if not line:
                        self.done = True
                        break
                    continue
                self._chunk_left = int(line.split(b";")[0].strip(), 16)
                self._state = "data" if self._chunk_left else "trailer"
        return b"".join(out)


def post(port: int, path: str, body: bytes = b"{}") -> tuple[int, bytes]:
    with connect(port) as sock:
        sock.sendall(request_head("POST", port, path, len(body)) + body)
        answer = Response(sock)
        return answer.status, answer.read_all()


class StreamTiming:
    def __init__(self, first_line: float, gaps: list[float], total: float, lines: int) -> None:
        self.first_line = first_line
        self.gaps = gaps
        self.total = total
        self.lines = lines


def stream(port: int, path: str, body: bytes = b'{"prompt": "hi"}') -> StreamTiming:
    """One NDJSON answer, each line timestamped as it arrives (seconds since the send)."""
    with connect(port) as sock:
        start = time.perf_counter()
        sock.sendall(request_head("POST", port, path, len(body)) + body)
        answer = Response(sock)
        if answer.status != 200:
            raise HarnessError(f"stream {path} answered {answer.status}: {answer.read_all()!r}")
        stamps: list[float] = []
        while piece := answer.read(65536):
            now = time.perf_counter() - start
            stamps.extend([now] * piece.count(b"\n"))
        total = time.perf_counter() - start
    if not stamps:
        raise HarnessError(f"stream {path}: no lines")
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return StreamTiming(stamps[0], gaps, total, len(stamps))


def download(port: int, path: str, rate: float | None = None,
             rcvbuf: int | None = None) -> tuple[int, float]:
    """Reads a large answer, at ``rate`` bytes/s at most; returns (bytes, seconds)."""
    with connect(port, rcvbuf=rcvbuf, timeout=300) as sock:
        start = time.perf_counter()
        sock.sendall(request_head("POST", port, path, 2) + b"{}")
        answer = Response(sock)
        if answer.status != 200:
            raise HarnessError(f"download {path} answered {answer.status}: {answer.read_all()!r}")
        received = 0
        size = 65536 if rate else RECV_SIZE
        while piece := answer.read(size):
            received += len(piece)
            if rate:
                ahead = start + received / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
        return received, time.perf_counter() - start


def upload(port: int, path: str, size: int) -> tuple[int, float]:
    """Sends ``size`` bytes; returns (bytes the upstream says it received, seconds)."""
    block = b"u" * RECV_SIZE
    with connect(port, timeout=300) as sock:
        start = time.perf_counter()
        sock.sendall(request_head("POST", port, path, size, "application/octet-stream"))
        view = memoryview(block)
        left = size
        while left > 0:
            part = view[: min(left, len(block))]
            sock.sendall(part)
            left -= len(part)
        answer = Response(sock)
        body = answer.read_all()
        elapsed = time.perf_counter() - start
    if answer.status != 200:
        raise HarnessError(f"upload {path} answered {answer.status}: {body[:300]!r}")
    received: int = json.loads(body)["received"]
    return received, elapsed


class KeepAlive:
    """A persistent connection for many small GETs."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=30)

    def get(self, path: str) -> tuple[int, bytes]:
        self.connection.request("GET", path)
        answer = self.connection.getresponse()
        return answer.status, answer.read()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise HarnessError(f"GET {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def close(self) -> None:
        self.connection.close()


def send_and_hold(port: int, path: str, body: bytes = b"{}") -> socket.socket:
    """Sends a POST and leaves its answer unread (a queued client)."""
    sock = connect(port, timeout=120)
    sock.sendall(request_head("POST", port, path, len(body)) + body)
    return sock


def finish(sock: socket.socket) -> int:
    """Reads the answer of a held POST; returns its status."""
    try:
        answer = Response(sock)
        answer.read_all()
        return answer.status
    finally:
        sock.close()
