"""
What a simulated server remembers about its traffic, so tests can check the daemon.

A proxy's mistakes are invisible from the client side: a dropped query string, a
forwarded ``Connection`` header, a body that arrived truncated, two jobs on the GPU at
once.  The simulated servers record each request and their job concurrency so a test
can assert on what actually reached the "GPU".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import attrs
from twisted.web.server import Request

_CHUNK = 64 * 1024


@attrs.frozen
class RecordedRequest:
    """
    One request as the server saw it.

    ``headers`` maps lower-cased names to every value received, in order, so a test
    can tell a header that was dropped from one that was repeated.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, tuple[str, ...]]
    body_size: int
    body_sha256: str
    received_at: float

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or ``None``."""
        values = self.headers.get(name.lower())
        return values[0] if values else None


def record_request(request: Request, now: float) -> RecordedRequest:
    """
    Describe ``request``, hashing its body without holding it in memory twice.

    twisted.web has already buffered the body (in memory or a temporary file); it is
    read in chunks and rewound so the route can read it again.
    """
    raw_uri: bytes = request.uri
    _, _, query = raw_uri.partition(b"?")
    headers: dict[str, tuple[str, ...]] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        key = name.decode("latin-1").lower()
        headers[key] = headers.get(key, ()) + tuple(v.decode("latin-1") for v in values)
    digest = hashlib.sha256()
    size = 0
    content = request.content
    if content is not None:
        content.seek(0)
        while chunk := content.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        content.seek(0)
    return RecordedRequest(
        method=request.method.decode("latin-1"),
        path=request.path.decode("latin-1"),
        query=query.decode("latin-1"),
        headers=MappingProxyType(headers),
        body_size=size,
        body_sha256=digest.hexdigest(),
        received_at=now,
    )


class ActivityMeter:
    """
    Counts jobs running now and the most ever running at once.

    One meter per server says whether that server was asked to do two things at
    once; one shared by every server on a host says whether the GPU was.
    """

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.started = 0
        self.finished = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed block as one running job, however it ends."""
        self.active += 1
        self.started += 1
        self.max_active = max(self.max_active, self.active)
        try:
            yield
        finally:
            self.active -= 1
            self.finished += 1
