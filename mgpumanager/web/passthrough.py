"""
The passthrough: ``/upstream/<consumer>/<rest>``, and a consumer's own port,
for clients that were written for the server itself.

The request goes to the consumer with ``<rest>`` and the query exactly as the
client sent them (ComfyUI reads ``%2F`` inside a segment); only a normalised
copy is shown to the consumer's adapter, which says whether the request is a
GPU job, so that no spelling of ``/api/generate`` slips past the lock.  A GPU
job runs through :class:`~mgpumanager.web.jobs.GpuJobs` like any other; anything
else (``/api/tags``, ``/history/<id>``, ``/view``) is relayed at once and never
waits for the GPU.  A WebSocket upgrade is tunnelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from mgpumanager.common.errors import BAD_REQUEST, NOT_FOUND, ApiError
from mgpumanager.common.paths import normalise
from mgpumanager.common.request_json import json_object
from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.relay.tunnel import WebSocketTunnels, is_websocket_upgrade
from mgpumanager.web.dispatch import Dispatcher
from mgpumanager.web.jobs import GpuJobs

#: Where the passthrough lives on the main port.
UPSTREAM_PREFIX = b"/upstream/"


def passthrough_consumer(config: Config, path: bytes) -> ConsumerConfig | None:
    """The consumer a raw ``/upstream/<name>/…`` path goes to, if it names one."""
    if not path.startswith(UPSTREAM_PREFIX):
        return None
    name = path[len(UPSTREAM_PREFIX):].partition(b"/")[0]
    return config.consumers.get(name.decode("latin-1"))


class Passthrough:
    """
    Forwards requests to a consumer as they came, as GPU jobs where its
    adapter says so.

    :param config: the consumers (a reload hands in a new one).
    """

    def __init__(
        self,
        config: Config,
        jobs: GpuJobs,
        proxy: ConsumerProxy,
        tunnels: WebSocketTunnels,
        adapters: Adapters | None = None,
    ) -> None:
        self.config = config
        self._adapters = adapters if adapters is not None else Adapters(config)
        self._jobs = jobs
        self._proxy = proxy
        self._tunnels = tunnels

    def reconfigure(self, config: Config) -> None:
        """Forward to the consumers of a reloaded configuration."""
        self.config = config

    def register(self, routes: Dispatcher) -> None:
        """Serve ``/upstream/<consumer>/…`` on ``routes``."""
        routes.add(UPSTREAM_PREFIX.decode(), ["*"], self._by_name, prefix=True)

    def _by_name(self, request: Request, rest: bytes) -> bytes | Deferred[Any]:
        name, slash, path = rest.partition(b"/")
        consumer = self.config.consumers.get(name.decode("latin-1"))
        if consumer is None:
            raise ApiError(NOT_FOUND, f"no consumer named {name.decode('latin-1')!r}")
        if not slash:
            # Relative links in the server's pages resolve only under the slash form.
            _, has_query, query = request.uri.partition(b"?")
            location = UPSTREAM_PREFIX + name + b"/" + (b"?" + query if has_query else b"")
            request.setResponseCode(308)
            request.setHeader(b"location", location)
            return b""
        return self.forward(request, consumer, b"/" + path)

    def handler_for(self, name: str) -> Callable[[Request, bytes], Deferred[Any]]:
        """A route handler that forwards everything to consumer ``name`` (a per-server port)."""
        return lambda request, rest: self.forward(
            request, self.config.consumers[name], b"/" + rest
        )

    def forward(self, request: Request, consumer: ConsumerConfig, raw: bytes) -> Deferred[Any]:
        """
        Send ``request`` to ``consumer`` at the raw path ``raw`` (the query
        is the client's): tunnelled, queued for the GPU, or relayed at once.
        """
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ApiError(BAD_REQUEST, "the request path is not ASCII") from None
        if is_websocket_upgrade(request):
            return self._tunnels.open(request, consumer, raw)
        method = request.method.decode("ascii", "replace")
        kind = self.kind_of(consumer, method, raw, request)
        if kind is None:
            return self._proxy.relay(request, consumer, method, path)
        return self._jobs.run(request, consumer, method, path, kind)

    def kind_of(
        self, consumer: ConsumerConfig, method: str, raw: bytes, request: Request
    ) -> str | None:
        """The GPU job kind of a request to ``consumer``, or None when it is none."""
        adapter = self._adapters.of(consumer)
        path = normalise(raw)
        body = json_object(request) if adapter.wants_body(method, path) else None
        return adapter.gpu_kind(consumer, method, path, body)
