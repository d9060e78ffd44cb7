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
from mgpumanager.telemetry import NO_TELEMETRY, Telemetry


class GpuJobs:
    """Runs proxied requests as GPU jobs: refused fast, queued, relayed under the lock."""

    def __init__(
        self,
        registry: Registry,
        scheduler: GpuScheduler,
        proxy: ConsumerProxy,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._proxy = proxy
        self._telemetry = telemetry

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
            self._telemetry.job_refused(consumer.name, kind, CONSUMER_DOWN.code)
            raise ApiError(
                CONSUMER_DOWN,
                f"upstream {consumer.name}: last health probe failed: {state.last_error}",
                consumer.name,
            )
        watch = self._telemetry.job(consumer.name, kind)
        relay = watch.running(lambda: self._proxy.relay(request, consumer, method, path))
        return watch.ended(self._scheduler.submit(consumer.name, relay))
