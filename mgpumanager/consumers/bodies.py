"""
Reading a consumer's small answers (health, load, unload) with a size cap, in a
way that can be cancelled.

treq's ``content()`` cannot be cancelled: when a time limit fires after the
headers have arrived, the connection stays open and keeps buffering, so a health
route that answers its headers and then stalls would leak one socket a probe.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone


class _CappedReader(Protocol):
    def __init__(self, done: Deferred[bytes | None], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.stop()
            self._done.callback(None)
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._done.called:
            return
        if reason.check(ResponseDone, http.PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)

    def stop(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def read_body(response: Any, limit: int) -> Deferred[bytes | None]:
    """
    The whole body of ``response`` (a treq or Twisted response), or None when
    it is longer than ``limit`` bytes (the rest is not read).  Cancelling it
    closes the connection.
    """
    reader: _CappedReader

    def cancel(_: Deferred[bytes | None]) -> None:
        reader.stop()

    done: Deferred[bytes | None] = Deferred(cancel)
    reader = _CappedReader(done, limit)
    response.deliverBody(reader)
    return done
