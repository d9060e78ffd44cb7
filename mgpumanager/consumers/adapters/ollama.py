"""
Ollama: loads models on demand and keeps them for ``keep_alive`` afterwards.

Its answer ends the GPU work, but not the residency: the model stays on the
card for ``keep_alive`` (five minutes by default), so the daemon reads
``/api/ps`` to know what is loaded and unloads with ``keep_alive: 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mgpumanager.common.answers import JsonObject
from mgpumanager.common.paths import under
from mgpumanager.config.document import ConsumerConfig, Route
from mgpumanager.consumers.adapters.base import (
    AdapterDefaults,
    IConsumerAdapter,
    Observation,
    WorkEndsWithTheAnswer,
)
from mgpumanager.consumers.adapters.ollama_ps import loaded_models
from mgpumanager.consumers.adapters.polling import poll_until
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.state.registry import ConsumerState

#: Routes whose POSTs run a model.
MODEL_PATHS = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
#: Ollama's OpenAI-compatible API: every POST under it runs a model.
OPENAI_PREFIX = "/v1"
#: How often ``/api/ps`` is read while models are being unloaded.
UNLOAD_POLL_SECONDS = 0.25


@implementer(IPlugin, IConsumerAdapter)
class OllamaAdapter(WorkEndsWithTheAnswer):
    name = "ollama"

    def defaults(self) -> AdapterDefaults:
        return AdapterDefaults(
            health=Route("GET", "/api/version"),
            paths=MappingProxyType({"llm": Route("POST", "/api/generate")}),
        )

    def wants_body(self, method: str, path: str) -> bool:
        return method == "POST" and path in ("/api/generate", "/api/chat")

    def gpu_kind(
        self,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        body: JsonObject | None,
    ) -> str | None:
        if method != "POST":
            return None
        if path in MODEL_PATHS or under(path, OPENAI_PREFIX):
            return None if body is not None and is_unload_request(body) else "llm"
        return None

    async def observe(
        self,
        control: ConsumerControl,
        consumer: ConsumerConfig,
        health: JsonObject | None,
        timeout: float,
    ) -> Observation:
        models = await loaded_models(control, consumer, timeout)
        held = sum(model.size_vram_mib for model in models)
        return Observation(resident=held > 0, measured_mib=held, models=models)

    def can_unload(self, consumer: ConsumerConfig) -> bool:
        return True

    def unload_by(self, consumer: ConsumerConfig) -> str | None:
        return "POST /api/generate keep_alive 0, for each model /api/ps lists"

    async def unload(
        self, control: ConsumerControl, state: ConsumerState, clock: IReactorTime, timeout: float
    ) -> None:
        """
        ``keep_alive: 0`` for every model ``/api/ps`` lists, then wait until
        it lists none: Ollama answers before the model has left the card.
        """
        consumer = state.config
        for model in await loaded_models(control, consumer, timeout):
            code, _ = await control.get_json(
                consumer,
                "POST",
                "/api/generate",
                timeout,
                body={"model": model.name, "keep_alive": 0},
            )
            if not 200 <= code < 300:
                raise ControlFailed(
                    f"POST /api/generate keep_alive 0 for {model.name} answered HTTP {code}"
                )

        async def none_listed() -> bool:
            return not await loaded_models(control, consumer, timeout)

        if not await poll_until(clock, UNLOAD_POLL_SECONDS, timeout, none_listed):
            raise ControlFailed(f"/api/ps still lists models after {timeout:g} s")


def is_unload_request(body: Mapping[str, object]) -> bool:
    """
    ``keep_alive: 0`` without a prompt or messages (what ``ollama stop``
    sends) only unloads a model: no GPU work, so it never waits for the GPU.
    """
    # Ollama decodes JSON field names without regard to case: so must we, or
    # {"keep_alive": 0, "Prompt": "…"} would generate without the GPU lock.
    fields = {str(key).lower(): value for key, value in body.items()}
    keep_alive = fields.get("keep_alive")
    unloads = keep_alive in (0, "0", "0s", "0m") and not isinstance(keep_alive, bool)
    work = {key: value for key, value in fields.items() if key not in ("model", "keep_alive")}
    return unloads and not any(work.values())
