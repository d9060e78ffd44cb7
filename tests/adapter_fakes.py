"""A scripted consumer control surface for adapter tests: answers by method and path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mgpumanager.common.answers import Answer, JsonObject
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.control import ControlFailed
from mgpumanager.state.registry import Registry

Reply = Callable[[JsonObject | None], tuple[int, JsonObject | None]]


class ScriptedControl:
    """
    Stands in for :class:`~mgpumanager.consumers.control.ConsumerControl`: each
    ``(method, path)`` answers with its reply function (given the JSON body),
    and every call is recorded as ``(method, path, body)``.
    """

    def __init__(self, replies: dict[tuple[str, str], Reply]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, str, JsonObject | None]] = []

    async def get_json(
        self,
        consumer: Any,
        method: str,
        path: str,
        timeout: float,
        cap: int = 0,
        body: JsonObject | None = None,
    ) -> tuple[int, JsonObject | None]:
        self.calls.append((method, path, body))
        reply = self.replies.get((method, path))
        if reply is None:
            raise ControlFailed(f"{method} {path}: connection refused", "connection refused")
        return reply(body)

    async def call_route(self, consumer: Any, route: Any, timeout: float) -> Answer:
        code, _ = await self.get_json(consumer, route.method, route.path, timeout)
        if code != 200:
            raise ControlFailed(f"{route.method} {route.path} answered HTTP {code}")
        return Answer(code, b"{}")

    def paths(self, method: str) -> list[str]:
        return [path for m, path, _ in self.calls if m == method]


def registry_of(consumers: dict[str, Any]) -> Registry:
    from mgpumanager.consumers.adapters import with_adapter_defaults

    return Registry(with_adapter_defaults(parse_config({"consumers": consumers})))
