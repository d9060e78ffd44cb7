"""
The one request path: every request any of the daemon's ports answers goes
through a :class:`Dispatcher`.

Routes are matched on the raw request path, before any percent-decoding, so
that only the plain spelling of a route is that route (``/v1/%6Clm`` is not a
job, and cannot dodge a job's body limit), and so that a path forwarded to a
consumer reaches it byte for byte.  A route is an exact path or a prefix; its
handler answers with bytes, or with a Deferred that fires once it has written
the answer itself (a relayed stream).  The dispatcher alone turns failures into
the error envelope, cancels the work when the client goes away, and finishes
the request.

This replaces Klein on the request path: Klein's werkzeug routing and its
Deferred plumbing cost about 140 microseconds a request, a quarter of the CPU
a whole proxied GPU job takes, for matching a dozen fixed paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpumanager.common.errors import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    JSON_CONTENT_TYPE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    SHUTTING_DOWN,
    ApiError,
)
from mgpumanager.relay.proxy import UpstreamBroke

log = Logger()

#: What a handler is given: the request and the raw path after the route's
#: prefix (empty for an exact route).  It answers with the body, or with a
#: Deferred that fires once it has written the answer itself.
Handler = Callable[[Request, bytes], "bytes | Deferred[Any]"]

#: Renders a daemon error for a raw request path: the JSON document to send.
#: (OpenAI-compatible paths answer in OpenAI's shape; everything else in ours.)
ErrorShape = Callable[[bytes, ApiError], "JsonObject"]

#: A JSON document as the dispatcher renders it.
JsonObject = dict[str, object]

#: Any method (a passthrough forwards whatever the client sends).
ANY_METHOD = b"*"


def envelope_shape(path: bytes, error: ApiError) -> JsonObject:
    """The daemon's own error envelope, whatever the path."""
    return error.envelope()


@attrs.frozen
class _Route:
    prefix: bool
    handlers: dict[bytes, Handler]

    def allowed(self) -> str:
        return ", ".join(sorted(m.decode("ascii") for m in self.handlers if m != ANY_METHOD))


class Dispatcher(Resource):
    """
    A table of routes on raw paths, served as a twisted.web leaf resource.

    :param error_shape: how the daemon's errors look on a given path.
    """

    isLeaf = True

    def __init__(self, error_shape: ErrorShape = envelope_shape) -> None:
        super().__init__()
        self._exact: dict[bytes, _Route] = {}
        self._prefixes: list[tuple[bytes, _Route]] = []
        self._error_shape = error_shape

    def add(
        self, path: str, methods: Iterable[str], handler: Handler, *, prefix: bool = False
    ) -> None:
        """
        Serve ``path`` (or every path starting with it) for ``methods``;
        ``"*"`` is any method, and a GET route answers HEAD too.
        """
        raw = path.encode("ascii")
        route = self._route(raw, prefix)
        for method in methods:
            name = method.upper().encode("ascii")
            route.handlers[name] = handler
            if name == b"GET":
                route.handlers.setdefault(b"HEAD", handler)

    def remove(self, path: str, *, prefix: bool = False) -> None:
        """Stop serving ``path`` (a route whose path a reload changed)."""
        raw = path.encode("ascii")
        if prefix:
            self._prefixes = [(p, route) for p, route in self._prefixes if p != raw]
        else:
            self._exact.pop(raw, None)

    def _route(self, raw: bytes, prefix: bool) -> _Route:
        if not prefix:
            return self._exact.setdefault(raw, _Route(False, {}))
        for existing, route in self._prefixes:
            if existing == raw:
                return route
        route = _Route(True, {})
        self._prefixes.append((raw, route))
        # The longest prefix wins: /v1/plan/ before /v1/.
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        return route

    def match(self, path: bytes) -> tuple[_Route, bytes] | None:
        """The route serving a raw path, and the rest of the path after it."""
        route = self._exact.get(path)
        if route is not None:
            return route, b""
        for prefix, route in self._prefixes:
            if path.startswith(prefix):
                return route, path[len(prefix):]
        return None

    def render(self, request: Request) -> int:
        path = request.uri.partition(b"?")[0]
        found = self.match(path)
        if found is None:
            return self._answer_now(request, path, _unknown(path))
        route, rest = found
        handler = route.handlers.get(request.method) or route.handlers.get(ANY_METHOD)
        if handler is None:
            method = request.method.decode("ascii", "replace")
            error = ApiError(
                METHOD_NOT_ALLOWED,
                f"method {method} not allowed here",
                headers={"Allow": route.allowed()},
            )
            return self._answer_now(request, path, error)
        return serve(request, lambda: handler(request, rest), self._shape_for(path))

    def _shape_for(self, path: bytes) -> Callable[[ApiError], JsonObject]:
        return lambda error: self._error_shape(path, error)

    def _answer_now(self, request: Request, path: bytes, error: ApiError) -> int:
        request.write(render_error(request, error, self._shape_for(path)))
        request.finish()
        return NOT_DONE_YET


def _unknown(path: bytes) -> ApiError:
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return ApiError(BAD_REQUEST, "the request path is not UTF-8 once decoded")
    return ApiError(NOT_FOUND, "no such endpoint; see GET / for the routes")


def serve(
    request: Request,
    produce: Callable[[], bytes | Deferred[Any]],
    shape: Callable[[ApiError], JsonObject],
) -> int:
    """
    Answer ``request`` with what ``produce`` does: its bytes, or what it
    writes until its Deferred fires; a failure as the error envelope; and the
    work cancelled if the client goes away first.
    """
    gone = False

    def left(_: object) -> None:
        nonlocal gone
        gone = True

    finished = request.notifyFinish()
    finished.addBoth(left)
    work = maybeDeferred(produce)
    if not work.called:
        request.notifyFinish().addErrback(lambda _: work.cancel())

    def failed(failure: Failure) -> bytes | None:
        if gone:
            return None
        return answer_failure(request, failure, shape)

    def done(body: object) -> None:
        if gone:
            return
        if isinstance(body, bytes):
            request.write(body)
        request.finish()

    work.addErrback(failed).addCallback(done)
    return NOT_DONE_YET


def answer_failure(
    request: Request, failure: Failure, shape: Callable[[ApiError], JsonObject]
) -> bytes | None:
    """
    The body answering ``failure`` (status and headers set on ``request``),
    or None when nothing can be answered any more.
    """
    error = failure.value
    if isinstance(error, UpstreamBroke):
        # The client's connection is already being aborted.
        return None
    if isinstance(error, CancelledError):
        # A cancellation reaches us only while the client is still there:
        # the daemon itself cancelled the job (shutdown grace over).
        error = ApiError(SHUTTING_DOWN, "the daemon stopped before the job finished")
    elif not isinstance(error, ApiError):
        log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        error = ApiError(INTERNAL_ERROR, "internal error; see the daemon's log")
    if request.startedWriting:
        # Too late for an envelope: the answer is already on its way.
        transport: Any = request.transport
        if transport is not None:
            transport.abortConnection()
        return None
    return render_error(request, error, shape)


def render_error(
    request: Request, error: ApiError, shape: Callable[[ApiError], JsonObject]
) -> bytes:
    """Set the error's status and headers on ``request``; return its body."""
    for name, value in error.response_headers().items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return json_body(request, shape(error), error.status)


def json_body(request: Request, document: object, status: int = 200) -> bytes:
    """Set a JSON answer's status and headers; return its body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document).encode("utf-8")
