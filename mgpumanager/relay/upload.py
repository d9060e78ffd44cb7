"""
The request body on its way up to the consumer.

twisted.web keeps a small body in memory and a large one in a temporary
file.  ``FileBodyProducer`` reads a file in chunks on the cooperator, which
costs a scheduled task and a turn of the reactor even for a body of a few
bytes; a body already in memory is written in one call instead.
"""

from __future__ import annotations

import io
from typing import IO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


def body_producer(content: IO[bytes]) -> IBodyProducer:
    """The producer for a request's body, read from the start whatever was read before."""
    if isinstance(content, io.BytesIO):
        return InMemoryBody(content.getvalue())
    content.seek(0)
    return FileBodyProducer(content)


@implementer(IBodyProducer)
class InMemoryBody:
    """A body already in memory, written whole as soon as it is asked for."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Written whole at the start: nothing is left to pause."""

    def resumeProducing(self) -> None:
        """Written whole at the start: nothing is left to resume."""

    def stopProducing(self) -> None:
        """Written whole at the start: nothing is left to stop."""
