"""
A blocking raw-socket HTTP client for the tests that must see bytes exactly as
the daemon sends them (or that send what no well-behaved client would).  Run it
in a thread (``deferToThread``) so the test's reactor keeps serving upstreams.
"""

from __future__ import annotations

import socket
import time


def exchange(port: int, data: bytes, wait: float = 2.0, send_delay: float = 0.0) -> bytes:
    """
    Send ``data`` (in two halves ``send_delay`` apart when set), then read until
    the daemon closes the connection or ``wait`` seconds pass without a byte.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if send_delay:
            half = len(data) // 2
            sock.sendall(data[:half])
            time.sleep(send_delay)
            data = data[half:]
        try:
            sock.sendall(data)
        except OSError:
            pass  # the daemon may close before taking everything: that is the point
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return received


def closed_after_headers(port: int, head: bytes, wait: float = 2.0) -> tuple[bytes, bool]:
    """
    Send only a request head and read the answer; return it and whether the
    daemon closed the connection (without waiting for any body).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head)
        received = b""
        closed = False
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
        return received, closed


def status_of(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]
