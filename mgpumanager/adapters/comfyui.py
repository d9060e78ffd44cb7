"""
ComfyUI: a prompt is queued at once and generated afterwards.

ComfyUI serves every route both at ``/x`` and ``/api/x``.  ``POST /prompt``
answers with a ``prompt_id`` as soon as the prompt is queued; the GPU work
happens afterwards, for seconds to minutes, so the daemon's job lasts until
``/history/<prompt_id>`` shows the prompt finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mgpumanager.adapters.base import AdapterDefaults, IConsumerAdapter
from mgpumanager.config import ConsumerConfig, Route

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
        body: Mapping[str, Any] | None,
    ) -> str | None:
        if method == "POST" and path in PROMPT_PATHS:
            return "image"
        return None
