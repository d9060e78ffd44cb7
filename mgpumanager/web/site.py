"""
The HTTP site, with a request-body limit enforced before the body is read.

twisted.web has no body limit: it buffers any upload into a temporary file, and
only then hands the request to a resource.  A client could fill the disk, or tie
up the GPU queue behind an upload we would refuse anyway.  So the limit is
checked as soon as the headers are in (``Content-Length``), and again as each
chunk of a chunked body arrives; a request over the limit gets a JSON 413 and
its connection is closed, and nothing of it reaches a resource or a consumer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mgpumanager.common.errors import BAD_REQUEST, BODY_TOO_LARGE, ApiError
from mgpumanager.common.log_text import LINE_FORMAT
from mgpumanager.relay.twisted_private import request_line
from mgpumanager.web.answers import Shape, error_document
from mgpumanager.web.guard import Guard

log = Logger()
access = Logger(namespace="mgpumanager.access")

#: How long a refused request's connection keeps draining what the client
#: still sends, so that the refusal reaches it (see ``LimitedRequest._refuse``).
LINGER_SECONDS = 2.0


class LimitedRequest(Request):
    """
    A request checked as soon as its head is in: refused by the guard, or
    with a body larger than its site's limit for it, it is answered and closed
    before a byte of the body is stored.
    """

    _limit = 0
    _received = 0
    _refused = False
    _path = b""
    _method = b"GET"

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        # The request line is parsed but not yet given to the request.
        method, target = request_line(channel)
        site: ManagerSite = channel.site
        self._method, self._path = method, target.partition(b"?")[0]
        refusal = site.refusal(method, target, self.requestHeaders)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._limit = site.body_limit_for(method, target)
        codings = self.requestHeaders.getRawHeaders(b"transfer-encoding")
        if codings is not None and [c.strip().lower() for c in codings] != [b"chunked"]:
            # twisted.web ignores "identity" (and so reads no body where a
            # front proxy may have seen one: a request-smuggling desync);
            # RFC 9112 section 6.1 says such a request is a 400.
            self._refuse(ApiError(BAD_REQUEST, "unsupported Transfer-Encoding"))
            return
        if length is not None and length > self._limit:
            self._refuse(ApiError(BODY_TOO_LARGE, self._too_large(f"{length} bytes")))
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse(ApiError(BODY_TOO_LARGE, self._too_large()))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _too_large(self, size: str | None = None) -> str:
        body = f"request body of {size}" if size else "request body"
        return f"{body} exceeds the limit of {self._limit // 2**20} MiB"

    def _refuse(self, error: ApiError) -> None:
        """
        Answer before the body is read, and close: nothing of it is kept.

        The close lingers: a client may still be sending the body we refuse,
        and a socket closed with unread data in it resets the connection, which
        can destroy our answer before the client reads it.  So only our side
        is shut at once; what still arrives is read and dropped until the
        client closes or :data:`LINGER_SECONDS` pass.
        """
        self._refused = True
        channel: Any = self.channel
        site: ManagerSite = channel.site
        shape = site.error_shape(self._method, self._path)
        body = json.dumps(error_document(error, shape)).encode("utf-8")
        # Nothing will be read: no "100 Continue" may follow our answer.
        self.requestHeaders.removeHeader(b"expect")
        extra = b"".join(
            b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii"))
            for name, value in error.response_headers().items()
        )
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n%s"
            % (error.status, RESPONSES.get(error.status, b"Error"), len(body), extra, body)
        )
        _close_lingering(transport, channel.site.reactor)
        log.info("refused a request: {message}", message=error.message)


def _close_lingering(transport: Any, clock: IReactorTime) -> None:
    """Shut our side of the connection now, the whole of it once the client is done."""
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is None:
        transport.loseConnection()
        return
    half_close()
    clock.callLater(LINGER_SECONDS, transport.loseConnection)


class ManagerSite(Site):
    """
    The daemon's site: no tracebacks to clients, the guard and a body limit
    per path applied to every request's head.

    :param body_limit_for: the limit in bytes for a request's method and
        target (the route table's :meth:`~mgpumanager.web.routing.RouteTable.body_limit`).
    :param guard: who may come in; None lets everyone.
    :param error_shape: how a refusal looks on a method and path (the route table's).
    """

    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        body_limit_for: Callable[[bytes, bytes], int],
        guard: Guard | None = None,
        error_shape: Callable[[bytes, bytes], Shape] = lambda method, path: Shape.OURS,
    ) -> None:
        # A proxy never reads form fields, and twisted.web would otherwise parse
        # a multipart upload (a whisper.cpp /inference call) whole into memory.
        super().__init__(resource, parsePOSTFormSubmission=False)
        self.body_limit_for = body_limit_for
        self._guard = guard
        self.error_shape = error_shape

    def refusal(self, method: bytes, target: bytes, headers: Headers) -> ApiError | None:
        """Why the guard refuses a request for ``target`` (path and query), or None."""
        return None if self._guard is None else self._guard.refusal(method, target, headers)

    def log(self, request: Request) -> None:  # type: ignore[override]
        """
        One structured access-log event a request: its fields for the
        observers that read them (JSON), and the line already joined in one
        ``line`` field for those that want text.  The daemon's own text
        observer (:mod:`mgpumanager.common.log_text`) writes that line as it
        is; any other formats ``{line}``, one field instead of five.

        The event is handed to the logger's observer as ``Logger.emit`` would
        make it, less its check that the level is a valid one (a sort of
        every level, on every call): ours is a constant.
        """
        client = _client(request)
        method = request.method.decode("ascii", "replace")
        uri = request.uri.decode("ascii", "backslashreplace")
        code = request.code
        length = request.sentLength
        access.observer({
            "log_logger": access,
            "log_level": LogLevel.info,
            "log_namespace": access.namespace,
            "log_source": None,
            "log_format": LINE_FORMAT,
            "log_time": time.time(),
            "line": f"{client} {method} {uri} {code} {length}",
            "client": client,
            "method": method,
            "uri": uri,
            "code": code,
            "length": length,
        })


def _client(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "-"))
