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

from collections.abc import Iterable, Mapping
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
from mgpumanager.web.declare import Does, Policy, route
from mgpumanager.web.jobs import GpuJobs
from mgpumanager.web.routing import raw_rest


def named_consumer(config: Config, args: Mapping[str, Any]) -> Iterable[ConsumerConfig]:
    """A passthrough request is held to the limit of the consumer it names."""
    consumer = config.consumers.get(args["consumer"])
    return (consumer,) if consumer is not None else ()


#: Every passthrough route: forwarded as it came, a GPU job where the adapter says so.
FORWARDED = Policy(
    Does.PASSTHROUGH, limit=named_consumer,
    summary="Forwarded to the consumer as sent; a GPU job where its adapter says so",
)


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

    @route("/upstream/<consumer>", None, Policy(
        Does.PASSTHROUGH, limit=named_consumer,
        summary="Redirects to /upstream/<consumer>/ (308), where the consumer's root is"))
    def to_root(self, request: Request, consumer: str) -> bytes:
        """Redirect to the slash form: relative links in a server's pages resolve only there."""
        self._consumer(consumer)
        _, has_query, query = request.uri.partition(b"?")
        location = request.path + b"/" + (b"?" + query if has_query else b"")
        request.setResponseCode(308)
        request.setHeader(b"location", location)
        return b""

    @route("/upstream/<consumer>/", None, FORWARDED)
    @route("/upstream/<consumer>/<path:rest>", None, FORWARDED)
    def by_name(self, request: Request, consumer: str, rest: str = "") -> Deferred[Any]:
        """``/upstream/<consumer>/<rest>``: to ``consumer`` at ``/<rest>``, spelled as sent."""
        return self.forward(request, self._consumer(consumer), b"/" + raw_rest(request))

    def _consumer(self, name: str) -> ConsumerConfig:
        consumer = self.config.consumers.get(name)
        if consumer is None:
            raise ApiError(NOT_FOUND, f"no consumer named {name!r}")
        return consumer

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
