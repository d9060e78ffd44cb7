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

On these paths the daemon's own errors are rendered in OpenAI's shape (their
declarations say so), so an SDK shows the daemon's message.  At header time
a request is held to the largest limit among the consumers its route may
reach; once ``model`` has chosen one, to that consumer's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from mgpumanager.common.errors import BODY_TOO_LARGE, NO_CONSUMER, ApiError
from mgpumanager.common.request_json import json_object
from mgpumanager.config.document import OPENAI_ROLES, Config, ConsumerConfig
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.web.answers import Shape, json_body
from mgpumanager.web.declare import Does, LimitSource, Policy, route
from mgpumanager.web.jobs import GpuJobs
from mgpumanager.web.routing import declared_path

log = Logger()

_F = TypeVar("_F", bound=Callable[..., Any])

MODELS_PATH = "/v1/models"


def family_and_models(family: str) -> LimitSource:
    """The consumers a route of ``family`` may reach: the family's and the mapped models'."""

    def reachable(config: Config, args: Mapping[str, Any]) -> Iterable[ConsumerConfig]:
        names = [getattr(config.openai, family), *config.openai.models.values()]
        return [config.consumers[name] for name in dict.fromkeys(names) if name is not None]

    return reachable


def gpu_route(path: str, family: str, kind: str) -> Callable[[_F], _F]:
    """Declare an OpenAI-compatible GPU route: a ``kind`` job on ``openai.<family>``."""
    policy = Policy(
        Does.JOB, shape=Shape.OPENAI, limit=family_and_models(family), kind=kind,
        summary=f"OpenAI-compatible: a {kind} GPU job on openai.{family} "
        "or the model's consumer",
    )
    return route(path, ["POST"], policy, family=family, kind=kind)


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

    @gpu_route("/v1/chat/completions", "chat", "llm")
    @gpu_route("/v1/completions", "chat", "llm")
    @gpu_route("/v1/embeddings", "chat", "llm")
    @gpu_route("/v1/audio/speech", "speech", "tts")
    @gpu_route("/v1/audio/transcriptions", "transcriptions", "stt")
    @gpu_route("/v1/audio/translations", "transcriptions", "stt")
    @gpu_route("/v1/images/generations", "images", "image")
    def job(self, request: Request, family: str, kind: str) -> Deferred[None]:
        """
        Run an OpenAI-compatible request as a GPU job on the consumer serving
        it, at the same path (the one the route declares: the consumer gets
        the plain spelling).
        """
        path = declared_path(request)
        try:
            consumer = self.consumer_for(request, family)
            self._check_body_limit(request, consumer)
        except ApiError as refusal:
            self._jobs.refused("", kind, refusal)
            raise
        return self._jobs.run(request, consumer, "POST", path, kind)

    def _check_body_limit(self, request: Request, consumer: ConsumerConfig) -> None:
        """Hold the body to the limit of the consumer ``model`` chose, now that it is known."""
        limit = self.config.body_limit_of(consumer)
        content = request.content
        size = content.seek(0, os.SEEK_END) if content is not None else 0
        if content is not None:
            content.seek(0)
        if size > limit:
            raise ApiError(
                BODY_TOO_LARGE,
                f"request body of {size} bytes exceeds the limit of {limit // 2**20} MiB",
                consumer.name,
            )

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

    @route(MODELS_PATH, ["GET"], Policy(
        Does.OWN, shape=Shape.OPENAI,
        summary="OpenAI-compatible: the models of every configured consumer, merged"))
    def models(self, request: Request) -> Deferred[bytes]:
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
                    consumer, "GET", MODELS_PATH, self.timeout
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
