"""
The daemon's own routes on the main port: the facade's GPU jobs, status, the
plan, the page, metrics, events, OpenAPI and audio files, each declared with
its policy beside its handler (:mod:`mgpumanager.web.routing`).

Every error the daemon answers itself is the JSON envelope of
:mod:`mgpumanager.common.errors` (Klein's HTML error pages never reach a client); an
answer a consumer gives passes through :mod:`mgpumanager.relay.proxy` untouched.
"""

from __future__ import annotations

import hmac
import unicodedata
from collections.abc import Iterable, Mapping
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
from mgpumanager.config.document import ENDPOINT_KINDS, Config, ConsumerConfig
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.scheduling.eviction import dry_run_plan
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.yields import CardYields
from mgpumanager.state.gpu import GpuSampler
from mgpumanager.state.guests import GuestWatch
from mgpumanager.state.registry import Registry
from mgpumanager.web.answers import json_body
from mgpumanager.web.card_routes import CardRoutes
from mgpumanager.web.declare import Does, Policy, Token, route
from mgpumanager.web.events import EventFeed
from mgpumanager.web.guard import query_token, token_cookie
from mgpumanager.web.jobs import GpuJobs
from mgpumanager.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mgpumanager.web.metrics import Metrics
from mgpumanager.web.openai_routes import OpenAIRoutes
from mgpumanager.web.openapi import openapi_document
from mgpumanager.web.page import status_page
from mgpumanager.web.passthrough import Passthrough
from mgpumanager.web.ports import ConsumerPort
from mgpumanager.web.routing import RouteTable, raw_rest
from mgpumanager.web.status import plan_document, status_document

log = Logger()

#: ``/v1/<kind>`` for each endpoint kind, as a Klein path pattern.
_JOB_PATH = "/v1/<any({}):kind>".format(",".join(ENDPOINT_KINDS))


def routed_consumer(config: Config, args: Mapping[str, Any]) -> Iterable[ConsumerConfig]:
    """A facade job is held to the limit of the consumer its kind is routed to."""
    target = config.route_for(args["kind"])
    return (target[0],) if target is not None else ()


#: The policies of the daemon's own routes.
JOB = Policy(
    Does.JOB, limit=routed_consumer,
    summary="Run a job of this kind on the GPU (queued, room made), on the routed consumer",
)
AUDIO = Policy(
    Does.PASSTHROUGH, summary="An audio file, relayed from the audio consumer (no GPU job)"
)


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
        adapters: Adapters | None = None,
        guests: GuestWatch | None = None,
        yields: CardYields | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._scheduler = scheduler
        self._proxy = proxy
        self._sampler = sampler
        self._lifecycle = lifecycle
        #: The daemon's resolved adapters, so the dry run plans as the real one.
        self._adapters = adapters
        self._guests = guests
        self._yields = yields
        self._clock = clock
        self._metrics = metrics or Metrics(clock)
        self._metrics.watch_status(self.status_document)
        self._jobs = jobs or GpuJobs(registry, scheduler, proxy, self._metrics)
        #: The ``/v1/events`` feed; the service starts and stops it.
        self.events = EventFeed(self.status_document, clock)
        #: What status reports as the listen address: an override wins.
        self._listen = listen or str(config.listen)

    def reconfigure(self, config: Config) -> None:
        """Serve a reloaded configuration."""
        self._config = config

    @route(_JOB_PATH, ["POST"], JOB)
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

    @route("/v1/status", ["GET"], Policy(
        Does.OWN, token=Token.PAGE,
        summary="The live state: card, consumers, queue, decisions"))
    def status(self, request: Request) -> bytes:
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
            samples=self._sampler.latest_by_card,
            unmanaged_cards=self._sampler.unmanaged_cards,
            guests=self._guests,
            yields=self._yields,
        )

    @route("/v1/plan/", ["GET"], Policy(Does.OWN, summary="No kind named: not found"))
    @route("/v1/plan/<path:kind>", ["GET"], Policy(
        Does.OWN, summary="What a job of this kind would evict and load now (a dry run)"))
    def plan(self, request: Request, kind: str = "") -> Deferred[bytes]:
        """
        ``GET /v1/plan/<kind>``: what a job of ``kind`` would evict and load if
        it ran now; touches nothing but a fresh GPU sample, as the real job
        would take.
        """
        if kind not in ENDPOINT_KINDS:
            raise ApiError(NOT_FOUND, "no such endpoint; see GET / for the routes")
        target = self._config.route_for(kind)
        if target is None:
            name = self._config.routing.get(kind)
            raise ApiError(NO_CONSUMER, f"no consumer serves {kind}", name)
        consumer, _ = target

        async def dry_run() -> bytes:
            samples = await self._sampler.sample_cards()
            plan = dry_run_plan(
                self._config, self._registry, consumer.name, samples, self._adapters
            )
            return json_body(request, {"kind": kind, **plan_document(plan)})

        return Deferred.fromCoroutine(dry_run())

    @route("/healthz", ["GET"], Policy(Does.OWN, token=Token.OPEN, summary="Liveness"))
    def healthz(self, request: Request) -> bytes:
        return json_body(request, {"status": "ok"})

    @route("/metrics", ["GET"], Policy(Does.OWN, summary="Prometheus metrics"))
    def metrics(self, request: Request) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.exposition()

    @route("/v1/events", ["GET"], Policy(
        Does.OWN, token=Token.PAGE,
        summary="The status document as Server-Sent Events, on each change"))
    def event_feed(self, request: Request) -> bytes | Deferred[None]:
        return self.events.serve(request)

    @route("/v1/openapi.json", ["GET"], Policy(Does.OWN, summary="This document"))
    def openapi(self, request: Request) -> bytes:
        config = self._config
        port = RouteTable([ConsumerPort], config)
        document = openapi_document(config, main_port_routes(config).declared, port.declared)
        return json_body(request, document)

    @route("/", ["GET"], Policy(
        Does.OWN, token=Token.PAGE_LINK,
        summary="The status page for browsers (Accept: text/html), a summary otherwise"))
    def index(self, request: Request) -> bytes:
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

    @route("{audio}/<path:name>", ["GET"], AUDIO)
    def audio(self, request: Request, name: str) -> Deferred[None]:
        """
        ``GET <audio_path_prefix><name>``: relayed to the audio consumer,
        outside the GPU scheduler.  The name is vetted in its raw form: it is
        decoded exactly once, here.
        """
        if self._config.audio_proxy is None:
            raise ApiError(NO_CONSUMER, "no audio_proxy consumer is configured")
        name = audio_name(raw_rest(request))
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


#: Whose declared routes the main port serves.
MAIN_PORT_ROUTES: tuple[type, ...] = (ManagerApp, OpenAIRoutes, Passthrough, CardRoutes)


def main_port_routes(config: Config) -> RouteTable:
    """The main port's route table for lookups and documentation (nothing served)."""
    return RouteTable(MAIN_PORT_ROUTES, config)
