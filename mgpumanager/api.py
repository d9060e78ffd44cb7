"""
The HTTP face: routes, the status document, and the error envelope.

Every error the daemon answers itself is the JSON envelope of
:mod:`mgpumanager.errors` (Klein's HTML error pages never reach a client); an
answer a consumer gives passes through :mod:`mgpumanager.proxy` untouched.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from functools import partial
from typing import Any, cast
from urllib.parse import quote, unquote_to_bytes

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mgpumanager.config import ENDPOINT_KINDS, Config
from mgpumanager.errors import (
    BAD_REQUEST,
    CONSUMER_DOWN,
    INTERNAL_ERROR,
    JSON_CONTENT_TYPE,
    METHOD_NOT_ALLOWED,
    NO_CONSUMER,
    NOT_FOUND,
    SHUTTING_DOWN,
    ApiError,
)
from mgpumanager.eviction import dry_run_plan
from mgpumanager.gpu import GpuSampler, rfc3339
from mgpumanager.lifecycle import Lifecycle
from mgpumanager.proxy import ConsumerProxy, UpstreamBroke
from mgpumanager.registry import Registry
from mgpumanager.scheduler import GpuScheduler

log = Logger()

_KIND = "<any({}):kind>".format(", ".join(ENDPOINT_KINDS))

#: The raw paths of GPU jobs: only this spelling is a job.
_JOB_PATHS = {f"/v1/{kind}".encode(): kind for kind in ENDPOINT_KINDS}


def job_kind(path: bytes) -> str | None:
    """The endpoint kind a raw request path (no query) is a GPU job of, if any."""
    return _JOB_PATHS.get(path)


def _json(request: Request, document: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document).encode("utf-8")


class ManagerApp:
    """
    The Klein application.  Holds no state of its own beyond its
    collaborators, which :mod:`mgpumanager.service` builds and hands in.
    """

    app = Klein()

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
    ) -> None:
        self._config = config
        self._registry = registry
        self._scheduler = scheduler
        self._proxy = proxy
        self._sampler = sampler
        self._lifecycle = lifecycle
        self._clock = clock
        #: What status reports as the listen address: an override wins.
        self._listen = listen or str(config.listen)

    def resource(self) -> Resource:
        return _Front(self)

    @app.route(f"/v1/{_KIND}", methods=["POST"])
    def gpu_job(self, request: Request, kind: str) -> Deferred[None]:
        """Proxy one GPU job to the consumer routed for ``kind``."""
        if request.path != f"/v1/{kind}".encode():
            # werkzeug also matches /v1/%6Clm and //v1/llm; only the plain
            # spelling is a job, so per-path limits cannot be sidestepped.
            raise ApiError(NOT_FOUND, "no such endpoint; see GET / for the routes")
        target = self._config.route_for(kind)
        if target is None:
            name = self._config.routing.get(kind)
            why = (
                f"consumer {name} has no paths.{kind}"
                if name
                else f"no consumer is routed for {kind}"
            )
            raise ApiError(NO_CONSUMER, why, name)
        consumer, route = target
        state = self._registry[consumer.name]
        if state.healthy is False and not state.restartable:
            raise ApiError(
                CONSUMER_DOWN,
                f"upstream {consumer.name}: last health probe failed: {state.last_error}",
                consumer.name,
            )
        return self._scheduler.submit(
            consumer.name,
            lambda: self._proxy.relay(request, consumer, route.method, route.path),
        )

    @app.route("/v1/status", methods=["GET"])
    def status(self, request: Request) -> bytes:
        return _json(request, self.status_document())

    def status_document(self) -> dict[str, Any]:
        config = self._config
        return {
            "listen": self._listen,
            "time": rfc3339(self._clock.seconds()),
            "gpu": self._sampler.latest.as_status(
                config.gpu.total_mib, config.gpu.reserved_mib
            ),
            "routing": dict(config.routing),
            "consumers": self._registry.as_status(),
            "scheduler": {**self._scheduler.as_status(), **self._lifecycle.as_status()},
        }

    @app.route(f"/v1/plan/{_KIND}", methods=["GET"])
    async def plan(self, request: Request, kind: str) -> bytes:
        """
        What a job of ``kind`` would evict and load if it ran now; touches
        nothing but a fresh GPU sample, as the real job would take.
        """
        target = self._config.route_for(kind)
        if target is None:
            name = self._config.routing.get(kind)
            raise ApiError(NO_CONSUMER, f"no consumer serves {kind}", name)
        consumer, _ = target
        sample = await self._sampler.sample()
        document = dry_run_plan(self._config, self._registry, consumer.name, sample)
        return _json(request, {"kind": kind, **document})

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: Request) -> bytes:
        return _json(request, {"status": "ok"})

    @app.route("/", methods=["GET"])
    def index(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        kinds = ", ".join(f"POST /v1/{kind}" for kind in ENDPOINT_KINDS)
        return (
            "mgpumanager: one GPU, several inference servers, one job at a time.\n"
            f"Live state: GET /v1/status\nGPU jobs: {kinds}\n"
            "What a job would evict now: GET /v1/plan/<kind>\n"
            f"Audio files: GET {self._config.audio_path_prefix}<name>\n"
            "Liveness: GET /healthz\n"
        ).encode()

    def audio(self, request: Request) -> Deferred[None]:
        """
        ``GET <audio_path_prefix><name>``: relayed to the audio consumer, outside
        the GPU scheduler.  Served before Klein's routing: the prefix is
        configurable, and werkzeug would decode the name before we could vet it.
        """
        if request.method != b"GET":
            raise ApiError(
                METHOD_NOT_ALLOWED, "audio files are read with GET", headers={"Allow": "GET"}
            )
        if self._config.audio_proxy is None:
            raise ApiError(NO_CONSUMER, "no audio_proxy consumer is configured")
        raw_path = request.uri.partition(b"?")[0]
        name = audio_name(raw_path[len(self._config.audio_path_prefix):])
        consumer = self._config.consumers[self._config.audio_proxy]
        path = self._config.audio_path_prefix + quote_segment(name)
        return self._proxy.relay(request, consumer, "GET", path)

    @app.handle_errors  # type: ignore[call-overload]
    def on_error(self, request: Request, failure: Failure) -> bytes | None:
        return answer_error(request, failure)


def answer_error(request: Request, failure: Failure) -> bytes | None:
    """
    The body of the JSON envelope for ``failure`` (status and headers set on
    ``request``), or None when nothing can be answered any more.
    """
    error = failure.value
    if isinstance(error, UpstreamBroke):
        # The client's connection is already being aborted.
        return None
    if isinstance(error, CancelledError):
        # A cancellation reaches us only while the client is still there:
        # the daemon itself cancelled the job (shutdown grace over).
        error = ApiError(SHUTTING_DOWN, "the daemon stopped before the job finished")
    if isinstance(error, NotFound):
        error = ApiError(NOT_FOUND, "no such endpoint; see GET / for the routes")
    elif isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(error.valid_methods or []))
        error = ApiError(
            METHOD_NOT_ALLOWED,
            f"method {request.method.decode('ascii', 'replace')} not allowed here",
            headers={"Allow": allowed},
        )
    elif not isinstance(error, ApiError):
        log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        error = ApiError(INTERNAL_ERROR, "internal error; see the daemon's log")
    if request.startedWriting:
        # Too late for an envelope: the answer is already on its way.
        transport: Any = request.transport
        if transport is not None:
            transport.abortConnection()
        return None
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return _json(request, error.envelope(), error.status)


class _Front(Resource):
    """
    What the site serves: audio requests and unusable paths are answered here,
    everything else by the Klein app.
    """

    isLeaf = True

    def __init__(self, manager: ManagerApp) -> None:
        super().__init__()
        self._manager = manager
        self._klein = manager.app.resource()
        self._audio_prefix = manager._config.audio_path_prefix.encode("ascii")

    def render(self, request: Request) -> bytes | int:
        raw_path = request.uri.partition(b"?")[0]
        kind = job_kind(raw_path)
        if kind is not None and request.method == b"POST":
            # The hot path: a GPU job needs no URL routing, so Klein is skipped.
            return _serve(request, partial(self._manager.gpu_job, request, kind))
        if raw_path.startswith(self._audio_prefix):
            return _serve(request, lambda: self._manager.audio(request))
        try:
            unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            return _serve(request, _not_utf8)
        result: Any = self._klein.render(request)
        return cast(int, result)


def _not_utf8() -> Deferred[None]:
    raise ApiError(BAD_REQUEST, "the request path is not UTF-8 once decoded")


def _serve(request: Request, produce: Callable[[], Deferred[None]]) -> int:
    """
    Answer ``request`` with what ``produce`` does, as Klein would: errors as
    the envelope, and the work cancelled if the client goes away.
    """
    finished = False

    def gone(_: object) -> None:
        nonlocal finished
        finished = True

    request.notifyFinish().addBoth(gone)
    work = maybeDeferred(produce)
    request.notifyFinish().addErrback(lambda _: work.cancel())

    def failed(failure: Failure) -> None:
        if finished:
            return
        body = answer_error(request, failure)
        if body is not None:
            request.write(body)

    def done(_: object) -> None:
        if not finished:
            request.finish()

    work.addErrback(failed).addCallback(done)
    return NOT_DONE_YET


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
