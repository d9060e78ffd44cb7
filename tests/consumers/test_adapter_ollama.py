"""
The ollama adapter: what ``/api/ps`` lists is what Ollama holds, and an
unload sends ``keep_alive: 0`` for each listed model until it lists none.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.consumers.adapters.ollama_ps import parse_ps
from mgpumanager.consumers.control import ControlFailed
from mgpumanager.state.registry import ConsumerState, ModelResidency
from tests.adapter_fakes import ScriptedControl, registry_of
from tests.support import assert_no_result, failure_result_of, success_result_of

ADAPTER = adapter_named("ollama")
MIB = 1024 * 1024


def ollama() -> ConsumerState:
    return registry_of({"ollama": {"url": "http://127.0.0.1:11434", "adapter": "ollama"}})[
        "ollama"
    ]


def ps(*models: tuple[str, int]) -> dict[str, Any]:
    return {
        "models": [
            {"name": name, "size": size * 2, "size_vram": size, "expires_at": "2026-12-01T10:00Z"}
            for name, size in models
        ]
    }


def test_ps_sizes_are_bytes_rounded_up_to_mib() -> None:
    listed = parse_ps(ps(("llama3.2:3b", 3 * 1024 * MIB), ("nomic-embed", 300 * MIB + 5)))
    assert listed == (
        ModelResidency("llama3.2:3b", 3072, "2026-12-01T10:00Z"),
        ModelResidency("nomic-embed", 301, "2026-12-01T10:00Z"),
    )
    assert parse_ps({"models": [{"size_vram": 5}, "junk"]}) == ()
    assert parse_ps({}) == ()


def test_every_listed_model_counts_towards_what_ollama_holds() -> None:
    control = ScriptedControl(
        {("GET", "/api/ps"): lambda _: (200, ps(("a", 1000 * MIB), ("b", 500 * MIB)))}
    )
    seen = success_result_of(
        Deferred.fromCoroutine(ADAPTER.observe(control, ollama().config, None, 1.0))
    )
    assert (seen.resident, seen.measured_mib) == (True, 1500)
    assert [m.name for m in seen.models] == ["a", "b"]
    empty = ScriptedControl({("GET", "/api/ps"): lambda _: (200, {"models": []})})
    seen = success_result_of(
        Deferred.fromCoroutine(ADAPTER.observe(empty, ollama().config, None, 1.0))
    )
    assert (seen.resident, seen.measured_mib, seen.models) == (False, 0, ())


def test_unload_sends_keep_alive_0_for_each_model_and_waits_until_ps_is_empty() -> None:
    loaded = {"a": 1000 * MIB, "b": 500 * MIB}
    polls = []

    def list_models(_: Any) -> tuple[int, dict[str, Any]]:
        polls.append(1)
        if len(polls) > 3:  # Ollama drops them a moment after answering
            loaded.clear()
        return 200, ps(*loaded.items())

    control = ScriptedControl(
        {
            ("GET", "/api/ps"): list_models,
            ("POST", "/api/generate"): lambda body: (200, {"done": True}),
        }
    )
    clock = Clock()
    unloaded = Deferred.fromCoroutine(ADAPTER.unload(control, ollama(), clock, 5.0))
    sent = [body for method, _, body in control.calls if method == "POST"]
    assert sent == [{"model": "a", "keep_alive": 0}, {"model": "b", "keep_alive": 0}]
    assert_no_result(unloaded)
    clock.advance(0.25)
    clock.advance(0.25)
    success_result_of(unloaded)


def test_models_that_never_leave_fail_the_unload() -> None:
    control = ScriptedControl(
        {
            ("GET", "/api/ps"): lambda _: (200, ps(("a", MIB))),
            ("POST", "/api/generate"): lambda body: (200, {}),
        }
    )
    clock = Clock()
    unloaded = Deferred.fromCoroutine(ADAPTER.unload(control, ollama(), clock, 1.0))
    for _ in range(5):
        clock.advance(0.25)
    assert "still lists" in str(failure_result_of(unloaded, ControlFailed).value)


def test_ollama_can_always_be_unloaded() -> None:
    assert ADAPTER.can_unload(ollama().config)
