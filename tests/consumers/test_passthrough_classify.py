"""
Which requests sent straight to a server are GPU jobs: decided on a normalised
copy of the path, so that no spelling of a model route slips past the lock,
while everything else (model lists, history, images) never waits for the GPU.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from mgpumanager.common.paths import normalise
from mgpumanager.config.document import ConfigError, Route
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.adapters import (
    UnknownAdapter,
    adapter_named,
    known,
    with_adapter_defaults,
)
from tests.builders import consumer


def _consumer(**entry: Any) -> Any:
    config = parse_config({"consumers": {"c": entry}})
    return config.consumers["c"]


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/api//generate", "/api/generate"),
        (b"/api/./generate", "/api/generate"),
        (b"/api/%67enerate", "/api/generate"),
        (b"/x/../api/chat", "/api/chat"),
        (b"/../../api/chat", "/api/chat"),
        (b"//api/chat", "/api/chat"),
        (b"", "/"),
        (b"/api/tags/", "/api/tags/"),
    ],
)
def test_paths_are_classified_as_the_server_will_resolve_them(raw: bytes, normal: str) -> None:
    assert normalise(raw) == normal


@pytest.mark.parametrize(
    ("method", "path", "body", "kind"),
    [
        ("POST", "/api/generate", {"model": "m", "prompt": "hi"}, "llm"),
        ("POST", "/api/chat", {"model": "m", "messages": [{"role": "user"}]}, "llm"),
        ("POST", "/api/embed", None, "llm"),
        ("POST", "/api/embeddings", None, "llm"),
        ("POST", "/v1/chat/completions", None, "llm"),
        ("POST", "/v1/embeddings", None, "llm"),
        # What `ollama stop` sends: an unload, not a GPU job.
        ("POST", "/api/generate", {"model": "m", "keep_alive": 0}, None),
        ("POST", "/api/chat", {"model": "m", "keep_alive": 0, "messages": []}, None),
        # keep_alive 0 with a prompt still runs the model first.
        ("POST", "/api/generate", {"model": "m", "prompt": "x", "keep_alive": 0}, "llm"),
        # Ollama matches field names whatever their case: so no spelling slips by.
        ("POST", "/api/generate", {"model": "m", "keep_alive": 0, "Prompt": "x"}, "llm"),
        ("POST", "/api/chat", {"model": "m", "KEEP_ALIVE": 0, "Messages": [{}]}, "llm"),
        ("POST", "/api/generate", {"model": "m", "keep_alive": 0, "suffix": "x"}, "llm"),
        # What the Python client sends for generate(model, keep_alive=0).
        ("POST", "/api/generate", {"model": "m", "prompt": "", "stream": False,
                                   "keep_alive": 0, "options": {}}, None),
        ("GET", "/api/tags", None, None),
        ("GET", "/api/ps", None, None),
        ("POST", "/api/pull", None, None),
        ("POST", "/api/show", None, None),
        ("GET", "/v1/models", None, None),
    ],
)
def test_ollama_gpu_jobs(method: str, path: str, body: Any, kind: str | None) -> None:
    ollama = adapter_named("ollama")
    c = _consumer(url="http://127.0.0.1:11434", adapter="ollama")
    assert ollama.gpu_kind(c, method, path, body) == kind


def test_ollama_reads_the_body_only_where_an_unload_can_hide() -> None:
    ollama = adapter_named("ollama")
    assert ollama.wants_body("POST", "/api/generate")
    assert not ollama.wants_body("POST", "/api/embed")
    assert not ollama.wants_body("GET", "/api/generate")


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/prompt", "image"),
        ("POST", "/api/prompt", "image"),
        ("GET", "/prompt", None),
        ("GET", "/history/abc", None),
        ("GET", "/view", None),
        ("POST", "/queue", None),
        ("POST", "/upload/image", None),
        ("POST", "/interrupt", None),
        ("GET", "/object_info", None),
    ],
)
def test_comfyui_only_prompts_are_gpu_jobs(method: str, path: str, kind: str | None) -> None:
    comfy = adapter_named("comfyui")
    c = _consumer(url="http://127.0.0.1:8188", adapter="comfyui")
    assert comfy.gpu_kind(c, method, path, None) == kind


def test_generic_without_gpu_routes_makes_every_post_a_job_of_its_kind() -> None:
    generic = adapter_named("generic")
    c = _consumer(**consumer(9000, "tts", "stt"))
    assert generic.gpu_kind(c, "POST", "/tts", None) == "tts"
    assert generic.gpu_kind(c, "POST", "/stt", None) == "stt"
    assert generic.gpu_kind(c, "POST", "/admin/x", None) == "other"
    assert generic.gpu_kind(c, "GET", "/tts", None) is None


def test_generic_with_one_kind_names_every_job_by_it() -> None:
    generic = adapter_named("generic")
    c = _consumer(**consumer(9000, "tts"))
    assert generic.gpu_kind(c, "POST", "/anything", None) == "tts"


def test_generic_gpu_routes_match_at_a_segment_boundary() -> None:
    generic = adapter_named("generic")
    c = _consumer(
        **consumer(9000, "stt"),
        gpu_routes=[{"path": "/v1/audio"}, {"method": "PUT", "path": "/jobs"}],
    )
    assert generic.gpu_kind(c, "POST", "/v1/audio/transcriptions", None) == "stt"
    assert generic.gpu_kind(c, "POST", "/v1/audio", None) == "stt"
    assert generic.gpu_kind(c, "POST", "/v1/audiox", None) is None
    assert generic.gpu_kind(c, "POST", "/v1/models", None) is None
    assert generic.gpu_kind(c, "PUT", "/jobs/1", None) == "stt"
    assert generic.gpu_kind(c, "POST", "/jobs/1", None) is None


def test_adapters_are_found_by_name_and_an_unknown_name_lists_the_known() -> None:
    assert {"generic", "comfyui", "ollama"} <= set(known())
    with pytest.raises(UnknownAdapter, match="known: comfyui, generic, ollama"):
        adapter_named("comfy")


def test_adapter_defaults_fill_what_the_file_leaves_out_and_the_file_wins() -> None:
    config = with_adapter_defaults(
        parse_config(
            {
                "consumers": {
                    "comfy": {"url": "http://127.0.0.1:8188", "adapter": "comfyui"},
                    "llm": {
                        "url": "http://127.0.0.1:11434",
                        "adapter": "ollama",
                        "health": {"path": "/"},
                    },
                }
            }
        )
    )
    comfy, llm = config.consumers["comfy"], config.consumers["llm"]
    assert comfy.health == Route("GET", "/system_stats")
    assert comfy.paths["image"] == Route("POST", "/prompt")
    assert comfy.unload is not None and comfy.unload.path == "/free"
    assert json.loads(comfy.unload.body or b"") == {"unload_models": True, "free_memory": True}
    assert comfy.load is None
    assert llm.health == Route("GET", "/")
    assert llm.paths["llm"] == Route("POST", "/api/generate")


def test_an_unknown_adapter_is_a_config_error_naming_the_key() -> None:
    config = parse_config({"consumers": {"x": {"url": "http://127.0.0.1:1", "adapter": "vllm"}}})
    with pytest.raises(ConfigError, match=r"consumers\.x\.adapter: unknown adapter 'vllm'"):
        with_adapter_defaults(config)


def test_a_third_party_adapter_is_found_as_a_twisted_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "extra_adapters"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "vllm_adapter.py").write_text(
        "from twisted.plugin import IPlugin\n"
        "from zope.interface import implementer\n"
        "from mgpumanager.consumers.adapters import AdapterDefaults, IConsumerAdapter\n"
        "from mgpumanager.config.document import Route\n"
        "@implementer(IPlugin, IConsumerAdapter)\n"
        "class VllmAdapter:\n"
        "    name = 'vllm'\n"
        "    def defaults(self):\n"
        "        return AdapterDefaults(health=Route('GET', '/health'))\n"
        "    def wants_body(self, method, path):\n"
        "        return False\n"
        "    def gpu_kind(self, consumer, method, path, body):\n"
        "        return 'llm' if method == 'POST' else None\n"
        "vllm = VllmAdapter()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = importlib.import_module("extra_adapters")

    adapter = adapter_named("vllm", plugins)

    assert adapter.name == "vllm"
    assert adapter.defaults().health == Route("GET", "/health")
    assert "vllm" in known(plugins) and "comfyui" in known(plugins)
