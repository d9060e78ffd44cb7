"""
The HTTP face: routes, the status document, and the error envelope.

Every error the daemon answers itself is the JSON envelope of
:mod:`mgpumanager.common.errors` (Klein's HTML error pages never reach a client); an
answer a consumer gives passes through :mod:`mgpumanager.relay.proxy` untouched.
"""

from __future__ import annotations

import hmac
import unicodedata
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from mgpumanager.common.errors import (
    BAD_REQUEST,
    NO_CONSUMER,
    NOT_FOUND,
    ApiError,
)
from mgpumanager.config.document import ENDPOINT_KINDS, Config
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.scheduling.eviction import dry_run_plan
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.gpu import GpuSampler
from mgpumanager.state.registry import Registry
from mgpumanager.web.dispatch import Dispatcher, json_body
from mgpumanager.web.events import EventFeed
from mgpumanager.web.guard import query_token, token_cookie
from mgpumanager.web.jobs import GpuJobs
from mgpumanager.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mgpumanager.web.metrics import Metrics
from mgpumanager.web.openai_routes import error_shape
from mgpumanager.web.openapi import openapi_document
from mgpumanager.web.page import status_page
from mgpumanager.web.status import plan_document, status_document

log = Logger()

#: The raw paths of GPU jobs: only this spelling is a job.
_JOB_PATHS = {f"/v1/{kind}".encode(): kind for kind in ENDPOINT_KINDS}


def job_kind(path: bytes) -> str | None:
    """The endpoint kind a raw request path (no query) is a GPU job of, if any."""
    return _JOB_PATHS.get(path)


class ManagerApp:
    """
    The daemon's own routes on the main port.  Holds no state of its own
    beyond its collaborators, which :mod:`mgpumanager.app.service` builds and
    hands in.
    """

    def __init__(
        self,
        config: Config,
        registry: Registry,
        scheduler: GpuScheduler,
        proxy: ConsumerProxy,
        sampler: GpuSampler,
        lifecycle: Lifecycle,
        clock: IReactorTime,
        listen: str | None = None,
        jobs: GpuJobs | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._scheduler = scheduler
        self._proxy = proxy
        self._sampler = sampler
        self._lifecycle = lifecycle
        self._clock = clock
        self._metrics = metrics or Metrics(clock)
        self._metrics.watch_status(self.status_document)
        self._jobs = jobs or GpuJobs(registry, scheduler, proxy, self._metrics)
        #: The ``/v1/events`` feed; the service starts and stops it.
        self.events = EventFeed(self.status_document, clock)
        #: What status reports as the listen address: an override wins.
        self._listen = listen or str(config.listen)
        self._routes: Dispatcher | None = None

    def resource(self) -> Dispatcher:
        """
        The main port's routes; the other doors (passthrough, OpenAI routes)
        register theirs on it.  Errors on OpenAI paths take OpenAI's shape.
        """
        routes = Dispatcher(error_shape)
        for kind in ENDPOINT_KINDS:
            routes.add(f"/v1/{kind}", ["POST"], self._job_handler(kind))
        routes.add("/v1/status", ["GET"], self.status)
        routes.add("/v1/plan/", ["GET"], self.plan, prefix=True)
        routes.add("/healthz", ["GET"], self.healthz)
        routes.add("/metrics", ["GET"], self.metrics)
        routes.add("/v1/events", ["GET"], self.events.serve)
        routes.add("/v1/openapi.json", ["GET"], self.openapi)
        routes.add("/", ["GET"], self.index)
        routes.add(self._config.audio_path_prefix, ["GET"], self.audio, prefix=True)
        self._routes = routes
        return routes

    def reconfigure(self, config: Config) -> None:
        """Serve a reloaded configuration (the audio prefix may have moved)."""
        old, self._config = self._config, config
        routes = self._routes
        if routes is not None and old.audio_path_prefix != config.audio_path_prefix:
            routes.remove(old.audio_path_prefix, prefix=True)
            routes.add(config.audio_path_prefix, ["GET"], self.audio, prefix=True)

    def _job_handler(self, kind: str) -> Any:
        return lambda request, rest: self.gpu_job(request, kind)

    def gpu_job(self, request: Request, kind: str) -> Deferred[None]:
        """Proxy one GPU job to the consumer routed for ``kind``."""
        target = self._config.route_for(kind)
        if target is None:
            name = self._config.routing.get(kind)
            why = (
                f"consumer {name} has no paths.{kind}"
                if name
                else f"no consumer is routed for {kind}"
            )
            refusal = ApiError(NO_CONSUMER, why, name)
            self._jobs.refused(name or "", kind, refusal)
            raise refusal
        consumer, route = target
        return self._jobs.run(request, consumer, route.method, route.path, kind)

    def status(self, request: Request, rest: bytes) -> bytes:
        return json_body(request, self.status_document())

    def status_document(self) -> dict[str, Any]:
        return status_document(
            listen=self._listen,
            now=self._clock.seconds(),
            config=self._config,
            sample=self._sampler.latest,
            registry=self._registry,
            scheduler=self._scheduler,
            lifecycle=self._lifecycle,
        )

    def plan(self, request: Request, rest: bytes) -> Deferred[bytes]:
        """
        ``GET /v1/plan/<kind>``: what a job of ``kind`` would evict and load if
        it ran now; touches nothing but a fresh GPU sample, as the real job
        would take.
        """
        kind = rest.decode("ascii", "replace")
        if kind not in ENDPOINT_KINDS:
            raise ApiError(NOT_FOUND, "no such endpoint; see GET / for the routes")
        target = self._config.route_for(kind)
        if target is None:
            name = self._config.routing.get(kind)
            raise ApiError(NO_CONSUMER, f"no consumer serves {kind}", name)
        consumer, _ = target

        async def dry_run() -> bytes:
            sample = await self._sampler.sample()
            plan = dry_run_plan(self._config, self._registry, consumer.name, sample)
            return json_body(request, {"kind": kind, **plan_document(plan)})

        return Deferred.fromCoroutine(dry_run())

    def healthz(self, request: Request, rest: bytes) -> bytes:
        return json_body(request, {"status": "ok"})

    def metrics(self, request: Request, rest: bytes) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.exposition()

    def openapi(self, request: Request, rest: bytes) -> bytes:
        return json_body(request, openapi_document(self._config))

    def index(self, request: Request, rest: bytes) -> bytes:
        """The status page for browsers, a plain summary for everything else."""
        token = query_token(request.uri.partition(b"?")[2])
        secret = self._config.auth_token
        if token is not None and secret is not None and hmac.compare_digest(token, secret):
            # The guard let ?token= in: a browser keeps it for the page's own reads.
            request.setHeader(b"set-cookie", token_cookie(token))
        request.setHeader(b"vary", b"accept")
        if wants_html(request):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            return status_page()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        kinds = ", ".join(f"POST /v1/{kind}" for kind in ENDPOINT_KINDS)
        return (
            "mgpumanager: one GPU, several inference servers, one job at a time.\n"
            f"Live state: GET /v1/status\nGPU jobs: {kinds}\n"
            "What a job would evict now: GET /v1/plan/<kind>\n"
            f"Audio files: GET {self._config.audio_path_prefix}<name>\n"
            "Liveness: GET /healthz\n"
            "Live feed: GET /v1/events; metrics: GET /metrics; "
            "the API: GET /v1/openapi.json\n"
        ).encode()

    def audio(self, request: Request, rest: bytes) -> Deferred[None]:
        """
        ``GET <audio_path_prefix><name>``: relayed to the audio consumer,
        outside the GPU scheduler.  The name is vetted in its raw form: it is
        decoded exactly once, here.
        """
        if self._config.audio_proxy is None:
            raise ApiError(NO_CONSUMER, "no audio_proxy consumer is configured")
        name = audio_name(rest)
        consumer = self._config.consumers[self._config.audio_proxy]
        path = self._config.audio_path_prefix + quote_segment(name)
        return self._proxy.relay(request, consumer, "GET", path)


def wants_html(request: Request) -> bool:
    """Whether the client asks for HTML (a browser), from its ``Accept`` header."""
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    for item in accept.split(b","):
        media, _, params = item.partition(b";")
        refused = params.replace(b" ", b"") in (b"q=0", b"q=0.0")
        if media.strip().lower() == b"text/html" and not refused:
            return True
    return False


def audio_name(encoded: bytes) -> str:
    """
    The file name of an audio request, decoded exactly once; anything that
    could name another path on the consumer is refused.
    """
    decoded = unquote_to_bytes(encoded)
    try:
        name = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(BAD_REQUEST, "audio file name is not UTF-8") from None
    if name in ("", ".", ".."):
        raise ApiError(BAD_REQUEST, "audio file name is empty or a dot segment")
    for forbidden in ("/", "\\", "%"):
        if forbidden in name:
            raise ApiError(BAD_REQUEST, f"audio file name may not contain {forbidden!r}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ApiError(BAD_REQUEST, "audio file name may not contain control characters")
    return name


def quote_segment(name: str) -> str:
    """Percent-encode a validated name for the upstream path."""
    return quote(name, safe="-_.~!$&'()*+,;=:@")
