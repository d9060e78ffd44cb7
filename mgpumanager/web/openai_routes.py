"""
OpenAI-compatible routes on the main port, so that the ``openai`` SDKs (and
every tool built on them) are scheduled with nothing changed but their
``base_url``.

Each route family is served by the consumer named under ``openai`` in the
configuration, at the same path; a JSON body's ``model`` that
``openai.models`` names routes first (the body is read only up to 1 MiB and is
forwarded byte for byte either way).  There is no fallback to ``routing``:
an unconfigured family is ``no_consumer``.  ``GET /v1/models`` merges what
the configured consumers list, skipping those that fail.

On these paths the daemon's own errors are rendered in OpenAI's shape
(:func:`error_shape`), so an SDK shows the daemon's message.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from mgpumanager.common.errors import NO_CONSUMER, ApiError
from mgpumanager.common.request_json import json_object
from mgpumanager.config.document import ENDPOINT_KINDS, OPENAI_ROLES, Config, ConsumerConfig
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.web.dispatch import Dispatcher, json_body
from mgpumanager.web.jobs import GpuJobs

log = Logger()

#: Each GPU route: the ``openai`` key naming its consumer, and its job kind.
GPU_ROUTES = {
    b"/v1/chat/completions": ("chat", "llm"),
    b"/v1/completions": ("chat", "llm"),
    b"/v1/embeddings": ("chat", "llm"),
    b"/v1/audio/speech": ("speech", "tts"),
    b"/v1/audio/transcriptions": ("transcriptions", "stt"),
    b"/v1/audio/translations": ("transcriptions", "stt"),
    b"/v1/images/generations": ("images", "image"),
}
MODELS_PATH = b"/v1/models"

#: The daemon's own paths under /v1/: they keep the daemon's error envelope.
_OWN_EXACT = frozenset(
    {b"/v1/status", b"/v1/events", b"/v1/openapi.json"}
    | {f"/v1/{kind}".encode() for kind in ENDPOINT_KINDS}
)
_OWN_PREFIXES = (b"/v1/plan/",)


def is_openai_path(path: bytes) -> bool:
    """Whether a raw path (no query) answers errors in OpenAI's shape."""
    if not path.startswith(b"/v1/") or path in _OWN_EXACT:
        return False
    return not path.startswith(_OWN_PREFIXES)


def error_shape(path: bytes, error: ApiError) -> dict[str, Any]:
    """The main port's error renderer: OpenAI's shape on OpenAI paths, ours elsewhere."""
    return error.openai_envelope() if is_openai_path(path) else error.envelope()


def family_consumer(config: Config, path: bytes) -> ConsumerConfig | None:
    """The consumer an OpenAI GPU route is configured to, ignoring ``model`` (for body limits)."""
    found = GPU_ROUTES.get(path)
    name = getattr(config.openai, found[0]) if found is not None else None
    return config.consumers.get(name) if name is not None else None


class OpenAIRoutes:
    """
    :param control: reads each consumer's ``/v1/models``.
    :param timeout: how long one consumer may take to list its models.
    """

    def __init__(
        self, config: Config, jobs: GpuJobs, control: ConsumerControl, timeout: float
    ) -> None:
        self.config = config
        self._jobs = jobs
        self._control = control
        #: How long one consumer may take to list its models (a reload may change it).
        self.timeout = timeout

    def reconfigure(self, config: Config) -> None:
        """Route to a reloaded configuration's consumers; list models within its probe timeout."""
        self.config = config
        self.timeout = config.probes.timeout_seconds

    def register(self, routes: Dispatcher) -> None:
        """Serve the OpenAI-compatible routes on ``routes``."""
        for path in GPU_ROUTES:
            routes.add(path.decode(), ["POST"], self.job)
        routes.add(MODELS_PATH.decode(), ["GET"], self.models)

    def job(self, request: Request, rest: bytes) -> Deferred[None]:
        """Run an OpenAI-compatible request as a GPU job on the consumer serving it."""
        path = request.uri.partition(b"?")[0]
        family, kind = GPU_ROUTES[path]
        try:
            consumer = self.consumer_for(request, family)
        except ApiError as refusal:
            self._jobs.refused("", kind, refusal)
            raise
        return self._jobs.run(request, consumer, "POST", path.decode("ascii"), kind)

    def consumer_for(self, request: Request, family: str) -> ConsumerConfig:
        """
        The consumer a request goes to: the one its JSON ``model`` is mapped
        to, else the family's.

        :raises ApiError: ``no_consumer`` when neither is configured.
        """
        openai = self.config.openai
        if openai.models and _is_json(request):
            body = json_object(request)
            model = body.get("model") if body is not None else None
            if isinstance(model, str) and model in openai.models:
                return self.config.consumers[openai.models[model]]
        name = getattr(openai, family)
        if name is None:
            raise ApiError(NO_CONSUMER, f"no consumer serves this route (set openai.{family})")
        return self.config.consumers[name]

    def models(self, request: Request, rest: bytes) -> Deferred[bytes]:
        """``GET /v1/models``: every configured consumer's models, each ``id`` once."""
        return Deferred.fromCoroutine(self._models(request))

    async def _models(self, request: Request) -> bytes:
        openai = self.config.openai
        names = [getattr(openai, family) for family in OPENAI_ROLES]
        names += list(openai.models.values())
        merged: dict[str, Any] = {}
        for name in dict.fromkeys(n for n in names if n is not None):
            consumer = self.config.consumers[name]
            try:
                code, document = await self._control.get_json(
                    consumer, "GET", MODELS_PATH.decode(), self.timeout
                )
            except ControlFailed as e:
                log.info("{consumer} listed no models: {why}", consumer=name, why=str(e))
                continue
            data = document.get("data") if document is not None and code == 200 else None
            for model in data if isinstance(data, list) else []:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    merged.setdefault(model["id"], model)
        return json_body(request, {"object": "list", "data": list(merged.values())})


def _is_json(request: Request) -> bool:
    content_type = request.getHeader(b"content-type") or b""
    return content_type.split(b";")[0].strip().lower() == b"application/json"
