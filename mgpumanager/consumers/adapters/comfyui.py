"""
ComfyUI: a prompt is queued at once and generated afterwards.

ComfyUI serves every route both at ``/x`` and ``/api/x``.  ``POST /prompt``
answers with a ``prompt_id`` as soon as the prompt is queued; the GPU work
happens afterwards, for seconds to minutes, so the daemon's job lasts until
``/history/<prompt_id>`` shows the prompt finished.
"""

from __future__ import annotations

from types import MappingProxyType

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mgpumanager.common.answers import Answer, JsonObject
from mgpumanager.config.document import ConsumerConfig, Route
from mgpumanager.consumers.adapters.base import AdapterDefaults, IConsumerAdapter, Observation
from mgpumanager.consumers.adapters.comfy_completion import PromptCompletion, queue_is_empty
from mgpumanager.consumers.adapters.ollama_ps import bytes_to_mib
from mgpumanager.consumers.adapters.polling import (
    configured_unload,
    poll_until,
    unload_as_configured,
)
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.state.registry import RESIDENT_SHARE, ConsumerState

#: What ComfyUI's /free takes to drop its models and cached memory.
FREE_BODY = b'{"unload_models": true, "free_memory": true}'
#: The routes that queue GPU work.
PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})


@implementer(IPlugin, IConsumerAdapter)
class ComfyAdapter:
    name = "comfyui"

    def defaults(self) -> AdapterDefaults:
        return AdapterDefaults(
            health=Route("GET", "/system_stats"),
            paths=MappingProxyType({"image": Route("POST", "/prompt")}),
            unload=Route("POST", "/free", FREE_BODY),
        )

    def wants_body(self, method: str, path: str) -> bool:
        return False

    def gpu_kind(
        self,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        body: JsonObject | None,
    ) -> str | None:
        if method == "POST" and path in PROMPT_PATHS:
            return "image"
        return None

    async def observe(
        self,
        control: ConsumerControl,
        consumer: ConsumerConfig,
        health: JsonObject | None,
        timeout: float,
    ) -> Observation | None:
        held = torch_vram_mib(health)
        if held is None:
            return None
        declared = consumer.vram_resident_mib
        resident = held >= RESIDENT_SHARE * declared if declared > 0 else held > 0
        try:
            busy: bool | None = await _queue_busy(control, consumer, timeout)
        except ControlFailed:
            busy = None  # the residency reading stands without it
        return Observation(resident=resident, measured_mib=held, busy=busy)

    def can_unload(self, consumer: ConsumerConfig) -> bool:
        return consumer.unloadable

    def unload_by(self, consumer: ConsumerConfig) -> str | None:
        configured = configured_unload(consumer)
        return f"{configured}, once its queue is empty" if configured else None

    async def unload(
        self, control: ConsumerControl, state: ConsumerState, clock: IReactorTime, timeout: float
    ) -> None:
        """
        ``/free`` once ComfyUI's own queue is empty: it frees only when idle,
        and work someone queued around the daemon must not be cut short.
        """
        consumer = state.config
        completion = consumer.completion

        async def idle() -> bool:
            try:
                return not await _queue_busy(control, consumer, timeout)
            except ControlFailed:
                return False  # one failed poll proves nothing: ask again

        if not await poll_until(
            clock, completion.poll_seconds, completion.timeout_seconds, idle
        ):
            raise ControlFailed("busy with work submitted around the daemon")
        await unload_as_configured(control, consumer, timeout)

    def completes_later(self, method: str, path: str) -> bool:
        return method == "POST" and path in PROMPT_PATHS

    async def settle(
        self, control: ConsumerControl, state: ConsumerState, clock: IReactorTime
    ) -> None:
        """
        ``POST /prompt`` broke before its ``prompt_id`` was read: ComfyUI may
        have queued it all the same, so wait until its queue is empty (or it
        stops answering), at most ``completion.timeout_seconds``.
        """
        await _settle(control, state, clock)

    def follow(
        self,
        control: ConsumerControl,
        state: ConsumerState,
        answer: Answer,
        clock: IReactorTime,
    ) -> PromptCompletion | None:
        document = answer.json_object()
        if not 200 <= answer.code < 300 or document is None:
            return None
        prompt_id = document.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            return None
        return PromptCompletion(control, state, clock, prompt_id)


async def _settle(control: ConsumerControl, state: ConsumerState, clock: IReactorTime) -> None:
    consumer = state.config
    completion = consumer.completion
    failures = 0

    async def idle() -> bool:
        nonlocal failures
        try:
            busy = await _queue_busy(control, consumer, completion.poll_seconds * 4)
        except ControlFailed:
            failures += 1
            return failures >= 2  # not answering: nothing of ours runs there
        failures = 0
        return not busy

    await poll_until(clock, completion.poll_seconds, completion.timeout_seconds, idle)


def torch_vram_mib(health: JsonObject | None) -> int | None:
    """``devices[0].torch_vram_total`` of ``/system_stats``, in MiB."""
    devices = health.get("devices") if health is not None else None
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
        return None
    total = devices[0].get("torch_vram_total")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        return None
    return bytes_to_mib(total)


async def _queue_busy(control: ConsumerControl, consumer: ConsumerConfig, timeout: float) -> bool:
    code, queue = await control.get_json(consumer, "GET", "/queue", timeout, cap=1024 * 1024)
    if code != 200 or queue is None:
        raise ControlFailed(f"GET /queue answered HTTP {code}")
    return not queue_is_empty(queue)
