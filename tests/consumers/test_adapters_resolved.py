"""Each consumer's adapter is resolved once per start and reload, not at each use."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.consumers.adapters import resolved as resolved_module
from mgpumanager.consumers.adapters.resolved import Adapters
from tests.builders import consumer

BEFORE = parse_config({"consumers": {
    "voice": consumer(9001, "tts"),
    "ollama": {"url": "http://127.0.0.1:11434", "adapter": "ollama", "health": {"path": "/"}},
}})
AFTER = parse_config({"consumers": {"voice": consumer(9001, "tts")}})


def test_adapters_are_looked_up_at_start_and_reload_only(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []

    def counting(name: str, plugins: ModuleType | None = None) -> Any:
        looked_up.append(name)
        return adapter_named(name, plugins)

    monkeypatch.setattr(resolved_module, "adapter_named", counting)
    adapters = Adapters(BEFORE)
    ollama = BEFORE.consumers["ollama"]
    for _ in range(5):
        assert adapters.of(ollama).name == "ollama"
        assert adapters.of(BEFORE.consumers["voice"]).name == "generic"
    assert sorted(looked_up) == ["generic", "ollama"]

    adapters.reconfigure(AFTER)
    assert looked_up[2:] == ["generic"]
    # A consumer the reload removed may still be finishing a job.
    assert adapters.of(ollama).name == "ollama"
    assert len(looked_up) == 3
