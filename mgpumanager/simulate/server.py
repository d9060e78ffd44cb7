"""
What every simulated inference server has in common.

A :class:`SimServer` owns a :class:`~mgpumanager.simulate.model.GpuModel` on the shared
card, answers errors as JSON the way the real servers do (a CUDA OOM is a 500 whose
``error`` is PyTorch's message), and records what it receives so a test can check what
the daemon forwarded.  Subclasses add the routes of one real server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, cast

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from mgpumanager.simulate.card import CudaOutOfMemory
from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.model import GpuModel
from mgpumanager.simulate.multipart import FormData, MultipartError, boundary_of, parse_form
from mgpumanager.simulate.recording import ActivityMeter, RecordedRequest, record_request

log = Logger()


class Refusal(Exception):
    """A request the server answers with an error status and a JSON ``error``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def number_field(body: dict[str, Any], key: str, default: float) -> float:
    """
    A non-negative number from a request's JSON, ``default`` when absent.

    :raises Refusal: 400 for anything else.
    """
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise Refusal(400, f"{key} must be a non-negative number")
    return float(value)


def json_answer(request: IRequest, document: object, status: int = 200) -> bytes:
    """``document`` as a JSON answer with ``status``."""
    body = json.dumps(document).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    # A sized answer, as the real (uvicorn, Go, aiohttp) servers give for JSON.
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


def default_clock() -> IReactorTime:
    """The global reactor, imported late so that tests may install another first."""
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


class SimServer:
    """
    Base of the simulated servers.

    :param card: the card shared with the other servers.
    :param name: the server's name, also its owner name on the card.
    :param model_mib: what its model occupies once loaded.
    :param load_seconds: how long loading takes.
    :param work_seconds: how long one job computes.
    :param unload_seconds: how long after an unload the memory comes back.
    :param clock: the reactor or a ``Clock``.
    :param gpu_meter: a meter shared with the other servers of a host, to see
        whether the GPU ran two jobs at once; by default one of its own.

    For tests: ``requests`` (every :class:`RecordedRequest`), ``jobs`` (its
    :class:`ActivityMeter`; also ``active`` / ``max_active``), ``disconnects``
    (clients gone before their job ended), ``oom_errors`` (CUDA OOM answers),
    ``interrupted`` (jobs whose model was unloaded under them).
    """

    app: ClassVar[Klein]

    def __init__(
        self,
        card: CardMemory,
        *,
        name: str,
        model_mib: int,
        load_seconds: float = 0.0,
        work_seconds: float = 0.05,
        unload_seconds: float = 0.1,
        clock: IReactorTime | None = None,
        gpu_meter: ActivityMeter | None = None,
    ) -> None:
        self.name = name
        self.card = card
        self.clock = clock if clock is not None else default_clock()
        self.model = GpuModel(card, name, model_mib, self.clock, load_seconds, unload_seconds)
        self.work_seconds = work_seconds
        self.requests: list[RecordedRequest] = []
        #: Told of every request as it arrives (a log another process reads).
        self.on_request: Callable[[SimServer, RecordedRequest], None] | None = None
        self.jobs = ActivityMeter()
        self.gpu_meter = gpu_meter if gpu_meter is not None else ActivityMeter()
        self.disconnects = 0
        self.oom_errors = 0
        self.interrupted = 0

    @property
    def active(self) -> int:
        return self.jobs.active

    @property
    def max_active(self) -> int:
        return self.jobs.max_active

    @property
    def oom_count(self) -> int:
        """How many requests this server answered with a CUDA OOM."""
        return self.oom_errors

    def resource(self) -> IResource:
        """The server's web resource, recording every request before routing it."""
        return _RecordingResource(self, self.app.resource())

    def site(self) -> Site:
        """
        The HTTP site serving :meth:`resource`.  Form bodies are left unparsed:
        twisted.web would read an upload into memory, the servers stream it.
        """
        return QuietSite(self.resource(), parsePOSTFormSubmission=False)

    async def load_answer(self, request: Request) -> bytes:
        """An explicit load route's answer (mvoice's ``/api/admin/load``)."""
        try:
            await self.model.load()
        except CudaOutOfMemory as e:
            self.oom_errors += 1
            return self.error(request, 500, str(e))
        return self.json(request, {"status": "loaded", **self.health_fields()})

    def unload_answer(self, request: Request) -> bytes:
        """An explicit unload route's answer: at once, the memory follows later."""
        self.model.unload()
        return self.json(request, {"status": "unloaded", **self.health_fields()})

    def close(self) -> None:
        """Free the card and cancel timers: the process is going away."""
        self.model.close()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests for ``path``, oldest first."""
        return [r for r in self.requests if r.path == path]

    def health_fields(self) -> dict[str, Any]:
        """What the daemon's probe reads as the server's own view of its residency."""
        return {"loaded": self.model.loaded, "gpu_resident_mib": self.model.resident_mib}

    async def run_job(self, request: Request, job: Callable[[], Awaitable[bytes]]) -> bytes:
        """
        Run one inference request, counted as a GPU job, with errors as JSON.

        A client that goes away cancels the route's Deferred (Klein does that), which
        arrives here as a ``CancelledError`` out of the ``await``; the meters still
        count the job as ended.
        """
        request.notifyFinish().addErrback(self._client_gone)
        try:
            with self.jobs.track(), self.gpu_meter.track():
                return await job()
        except CudaOutOfMemory as e:
            self.oom_errors += 1
            return self.error(request, 500, str(e))
        except Refusal as e:
            return self.error(request, e.status, e.message)

    async def work(self, seconds: float | None = None, model: GpuModel | None = None) -> None:
        """
        Compute for ``seconds`` (default ``work_seconds``) on the loaded ``model``
        (default the server's own).

        :raises Refusal: 500 when the model was unloaded meanwhile, as a real server
            whose weights vanish mid-inference fails the job.
        """
        model = self.model if model is None else model
        generation = model.generation
        await deferLater(self.clock, self.work_seconds if seconds is None else seconds)
        if not model.loaded or model.generation != generation:
            self.interrupted += 1
            log.warn("{name}: model unloaded during a job", name=self.name)
            raise Refusal(500, "the model was unloaded while a job was running")

    @staticmethod
    def json(request: IRequest, document: object, status: int = 200) -> bytes:
        return json_answer(request, document, status)

    def error(self, request: Request, status: int, message: str) -> bytes:
        return self.json(request, {"error": message}, status)

    @staticmethod
    def json_body(request: Request) -> dict[str, Any]:
        """
        The request's JSON object; an empty body is ``{}``.

        :raises Refusal: 400 for anything that is not a JSON object.
        """
        content = request.content
        raw = content.read() if content is not None else b""
        if content is not None:
            content.seek(0)
        if not raw.strip():
            return {}
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Refusal(400, f"body is not JSON: {e}") from None
        if not isinstance(document, dict):
            raise Refusal(400, "body must be a JSON object")
        return document

    @staticmethod
    def form_body(request: Request) -> FormData:
        """
        The request's ``multipart/form-data``, read as a stream; close it after use.

        :raises Refusal: 400 for any other body.
        """
        content = request.content
        try:
            if content is None:
                raise MultipartError("the body must be multipart/form-data")
            return parse_form(content, boundary_of(request.getHeader("content-type")))
        except MultipartError as e:
            raise Refusal(400, str(e)) from None

    def _client_gone(self, reason: Failure) -> None:
        self.disconnects += 1
        log.info("{name}: client went away during a job", name=self.name)


class _RecordingResource(Resource):
    """Records each request, then hands it to the server's Klein resource."""

    isLeaf = True

    def __init__(self, server: SimServer, inner: IResource) -> None:
        super().__init__()
        self._server = server
        self._inner = inner

    def render(self, request: Request) -> bytes | int:
        recorded = record_request(request, self._server.clock.seconds())
        self._server.requests.append(recorded)
        if self._server.on_request is not None:
            self._server.on_request(self._server, recorded)
        result: bytes | int = self._inner.render(request)
        return result


class QuietSite(Site):
    """
    A site without an access log: several simulated servers logging every request
    would drown the daemon's own log in a demo.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        pass
