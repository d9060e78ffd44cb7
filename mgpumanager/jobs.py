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
from mgpumanager.errors import CONSUMER_DOWN, ApiError
from mgpumanager.proxy import ConsumerProxy
from mgpumanager.registry import Registry
from mgpumanager.scheduler import GpuScheduler


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
        return self._scheduler.submit(
            consumer.name, lambda: self._proxy.relay(request, consumer, method, path)
        )
