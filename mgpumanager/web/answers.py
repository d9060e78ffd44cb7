"""
How the daemon writes its own answers: JSON documents, and its errors in the
shape the route's declaration names.  Every error any route, the site or the
guard answers goes through :func:`render_error`.
"""

from __future__ import annotations

import enum
import json

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpumanager.common.answers import JsonObject
from mgpumanager.common.errors import (
    INTERNAL_ERROR,
    JSON_CONTENT_TYPE,
    SHUTTING_DOWN,
    ApiError,
)
from mgpumanager.relay.streaming import UpstreamBroke, abort_client

log = Logger()


class Shape(enum.Enum):
    """How the daemon's own errors look on a route."""

    #: The daemon's envelope.
    OURS = "ours"
    #: OpenAI's ``{"error": {...}}``, which the OpenAI SDKs show.
    OPENAI = "openai"


def error_document(error: ApiError, shape: Shape) -> JsonObject:
    """The body of a daemon error in ``shape``."""
    return error.openai_envelope() if shape is Shape.OPENAI else error.envelope()


def answer_failure(request: Request, failure: Failure, shape: Shape) -> bytes | None:
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
        abort_client(request)
        return None
    return render_error(request, error, shape)


def render_error(request: Request, error: ApiError, shape: Shape) -> bytes:
    """Set the error's status and headers on ``request``; return its body."""
    for name, value in error.response_headers().items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return json_body(request, error_document(error, shape), error.status)


def json_body(request: Request, document: object, status: int = 200) -> bytes:
    """Set a JSON answer's status and headers; return its body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document).encode("utf-8")
