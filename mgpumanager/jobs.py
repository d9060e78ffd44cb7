"""
A GPU job, whichever door it came in by: the facade (``POST /v1/<kind>``), the
passthrough (``/upstream/<consumer>/…``), a consumer's own port, or an
OpenAI-compatible route.  Each door decides *that* a request is a GPU job and
of which consumer and kind; this module runs it, the same way for all.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from mgpumanager.config import ConsumerConfig
from mgpumanager.errors import BAD_REQUEST, CONSUMER_DOWN, ApiError
from mgpumanager.proxy import ConsumerProxy
from mgpumanager.registry import Registry
from mgpumanager.scheduler import GpuScheduler
from mgpumanager.scheduling_config import JOB_CLASSES


class GpuJobs:
    """Runs proxied requests as GPU jobs: refused fast, queued, relayed under the lock."""

    def __init__(self, registry: Registry, scheduler: GpuScheduler, proxy: ConsumerProxy) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._proxy = proxy

    def run(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str, kind: str
    ) -> Deferred[None]:
        """
        Relay ``request`` to ``consumer`` as ``method path`` once it holds the
        GPU.  Fires when the answer has been relayed; cancelling it (the
        client left) leaves the queue or cancels the relay.

        :param path: the consumer's path, sent as given (already encoded).
        :param kind: the endpoint kind the job is of.
        """
        state = self._registry[consumer.name]
        if state.healthy is False and not state.restartable:
            raise ApiError(
                CONSUMER_DOWN,
                f"upstream {consumer.name}: last health probe failed: {state.last_error}",
                consumer.name,
            )
        job_class, priority = job_class_and_priority(
            request, self._scheduler.scheduling.class_of(kind), consumer.priority)

        def relay() -> Deferred[None]:
            running = self._scheduler.running
            if running is not None:
                request.setHeader(b"server-timing", server_timing(
                    running.queue_ms, running.prepare_ms or 0))
            return self._proxy.relay(request, consumer, method, path)

        return self._scheduler.submit(
            consumer.name, relay, kind=kind, job_class=job_class, priority=priority)


def server_timing(queue_ms: int, prepare_ms: int) -> bytes:
    """How long the job waited for the GPU and how long making room and loading took."""
    return f"queue;dur={queue_ms}, prepare;dur={prepare_ms}".encode("ascii")


def job_class_and_priority(request: Request, job_class: str, priority: int) -> tuple[str, int]:
    """
    The job's class and priority: the defaults given, unless the request sets
    ``X-Mgpu-Class`` (``interactive`` | ``batch``) or ``X-Mgpu-Priority`` (0-4).

    :raises ApiError: ``bad_request`` for any other value, before the job queues.
    """
    given_class = _header(request, b"x-mgpu-class")
    if given_class is not None:
        job_class = given_class.strip().lower()
        if job_class not in JOB_CLASSES:
            raise ApiError(BAD_REQUEST, f"X-Mgpu-Class must be one of {', '.join(JOB_CLASSES)}, "
                                        f"not {given_class!r}")
    given_priority = _header(request, b"x-mgpu-priority")
    if given_priority is not None:
        text = given_priority.strip()
        if not (text.isascii() and text.isdigit() and 0 <= int(text) <= 4):
            raise ApiError(BAD_REQUEST, f"X-Mgpu-Priority must be a whole number from 0 to 4, "
                                        f"not {given_priority!r}")
        priority = int(text)
    return job_class, priority


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")
