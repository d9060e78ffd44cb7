"""
The daemon's own errors: one JSON shape, one status per code.

Upstream errors never pass through here; they reach the client unchanged.  Every
error the daemon itself produces is an :class:`ApiError`, so a client can tell
"the consumer said no" from "the control plane said no" and knows whether to retry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

JSON_CONTENT_TYPE = b"application/json"


@attrs.frozen
class ErrorCode:
    """A documented error code: its HTTP status and whether a retry may help."""

    code: str
    status: int
    retryable: bool


@attrs.frozen
class JobTiming:
    """How long a job waited for the GPU, and how long making room and loading took."""

    queue_ms: int
    prepare_ms: int


NO_CONSUMER = ErrorCode("no_consumer", 501, False)
CONSUMER_DOWN = ErrorCode("consumer_unreachable", 503, True)
CONSUMER_UNREACHABLE = ErrorCode("consumer_unreachable", 502, True)
UNLOAD_FAILED = ErrorCode("unload_failed", 503, True)
LOAD_FAILED = ErrorCode("load_failed", 503, True)
SCHEDULER_ERROR = ErrorCode("scheduler_error", 500, True)
BAD_CONSUMER_URL = ErrorCode("bad_consumer_url", 500, False)
BAD_REQUEST = ErrorCode("bad_request", 400, False)
NOT_FOUND = ErrorCode("not_found", 404, False)
METHOD_NOT_ALLOWED = ErrorCode("method_not_allowed", 405, False)
SHUTTING_DOWN = ErrorCode("shutting_down", 503, True)
BODY_TOO_LARGE = ErrorCode("body_too_large", 413, False)
UPSTREAM_TIMEOUT = ErrorCode("upstream_timeout", 504, True)
QUEUE_FULL = ErrorCode("queue_full", 503, True)
QUEUE_TIMEOUT = ErrorCode("queue_timeout", 503, True)
FORBIDDEN = ErrorCode("forbidden", 403, False)
UNAUTHORIZED = ErrorCode("unauthorized", 401, False)
INTERNAL_ERROR = ErrorCode("internal_error", 500, True)
#: A yield given back (resumed) before the card was held for the guest.
YIELD_GIVEN_UP = ErrorCode("yield_given_up", 409, False)


class ApiError(Exception):
    """
    An error answered to the client as the JSON envelope.

    :param kind: which documented code this is.
    :param message: a sentence for a person; never a traceback or a file path.
    :param consumer: the consumer involved, if any.
    :param headers: extra response headers (``Allow``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        kind: ErrorCode,
        message: str,
        consumer: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.consumer = consumer
        self.headers = dict(headers or {})
        #: For an error that ended a GPU job: how long the job waited for the
        #: GPU and made room before it (the web layer's ``Server-Timing``).
        self.timing: JobTiming | None = None

    @property
    def status(self) -> int:
        return self.kind.status

    def envelope(self) -> dict[str, object]:
        """The JSON object sent to the client."""
        body: dict[str, object] = {"error": self.kind.code, "message": self.message}
        if self.consumer is not None:
            body["consumer"] = self.consumer
        body["retryable"] = self.kind.retryable
        return body

    def openai_envelope(self) -> dict[str, object]:
        """
        The same error in OpenAI's shape, for the OpenAI-compatible paths:
        the SDKs read ``error.message`` and ``error.code``.
        """
        return {
            "error": {
                "message": self.message,
                "type": self.kind.code,
                "code": self.kind.code,
                "consumer": self.consumer,
                "retryable": self.kind.retryable,
            }
        }

    def response_headers(self) -> dict[str, str]:
        """
        The headers sent with the error: its own, and ``x-should-retry:
        false`` when retrying cannot help soon (a non-retryable error, or a
        ``Retry-After`` past a minute), which the OpenAI SDKs honour instead
        of retrying by status.
        """
        headers = dict(self.headers)
        if not self.kind.retryable or _retry_after(headers) > MAX_SDK_RETRY_AFTER:
            headers["x-should-retry"] = "false"
        return headers

    def body(self) -> bytes:
        return json.dumps(self.envelope()).encode("utf-8")

    def __repr__(self) -> str:
        return f"ApiError({self.kind.code!r}, {self.message!r}, consumer={self.consumer!r})"


#: An SDK retrying on its own should not wait longer than this for a slot.
MAX_SDK_RETRY_AFTER = 60.0


def _retry_after(headers: Mapping[str, str]) -> float:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
