"""
Tests for the configuration keys of the spec's Part 2, parsed as values: a
consumer's ``adapter``, ``completion``, ``timeouts.keepalive_seconds``,
``gpu_routes`` and ``listen``, and the top-level ``openai`` section.
"""

from __future__ import annotations

from typing import Any

import pytest

from mgpumanager.config.document import (
    CompletionConfig,
    Config,
    ConfigError,
    Listen,
    Route,
    Timeouts,
)
from mgpumanager.config.parsing import parse_config
from tests.builders import consumer


def document(**top: Any) -> dict[str, Any]:
    """Three consumers: ollama (llm), comfy (image), voice (tts, stt)."""
    return {
        "consumers": {
            "ollama": consumer(11434, "llm"),
            "comfy": consumer(8188, "image"),
            "voice": consumer(8765, "tts", "stt"),
        },
        **top,
    }


def with_consumer(name: str, **keys: Any) -> dict[str, Any]:
    doc = document()
    doc["consumers"][name].update(keys)
    return doc


def error(doc: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="x.yaml")
    return info.value


def assert_error(doc: object, key_path: str, *hints: str) -> None:
    e = error(doc)
    assert e.key_path == key_path
    assert str(e).startswith(f"x.yaml: {key_path}: ")
    for hint in hints:
        assert hint in e.problem


# --- max_concurrency ---------------------------------------------------------------


def test_max_concurrency_of_one_is_accepted() -> None:
    config = parse_config(with_consumer("voice", max_concurrency=1))

    assert config.consumers["voice"].max_concurrency == 1


@pytest.mark.parametrize("value", [2, 8])
def test_max_concurrency_above_one_is_refused(value: int) -> None:
    assert_error(
        with_consumer("voice", max_concurrency=value),
        "consumers.voice.max_concurrency",
        "only 1 is supported",
        "one GPU lock",
        f"got {value}",
    )


# --- adapter -----------------------------------------------------------------------


def test_the_adapter_defaults_to_generic() -> None:
    assert parse_config(document()).consumers["voice"].adapter == "generic"


def test_an_adapter_name_is_kept_as_given() -> None:
    config = parse_config(with_consumer("comfy", adapter="comfyui"))

    assert config.consumers["comfy"].adapter == "comfyui"


@pytest.mark.parametrize("value", ["", "  ", "comfy ui", "my-adapter", "1st", 3, ["comfyui"]])
def test_an_adapter_must_be_a_name(value: object) -> None:
    assert_error(with_consumer("comfy", adapter=value), "consumers.comfy.adapter")


def test_an_unknown_consumer_key_near_adapter_gets_a_suggestion() -> None:
    assert_error(
        with_consumer("comfy", adaptor="comfyui"), "consumers.comfy.adaptor", "'adapter'"
    )


# --- completion --------------------------------------------------------------------


def test_completion_defaults() -> None:
    config = parse_config(with_consumer("comfy", adapter="comfyui"))

    assert config.consumers["comfy"].completion == CompletionConfig(0.5, 1800.0)


def test_completion_can_be_set_for_comfyui() -> None:
    doc = with_consumer(
        "comfy", adapter="comfyui", completion={"poll_seconds": 0.25, "timeout_seconds": 60}
    )

    assert parse_config(doc).consumers["comfy"].completion == CompletionConfig(0.25, 60.0)


def test_a_partial_completion_keeps_the_other_default() -> None:
    doc = with_consumer("comfy", adapter="comfyui", completion={"timeout_seconds": 90})

    assert parse_config(doc).consumers["comfy"].completion == CompletionConfig(0.5, 90.0)


@pytest.mark.parametrize("adapter", [None, "generic", "ollama"])
def test_completion_is_refused_for_other_adapters(adapter: str | None) -> None:
    doc = with_consumer("comfy", completion={"poll_seconds": 1})
    if adapter is not None:
        doc["consumers"]["comfy"]["adapter"] = adapter

    assert_error(doc, "consumers.comfy.completion", "only for adapter 'comfyui'")


@pytest.mark.parametrize(
    ("completion", "key_path"),
    [
        ({"poll_seconds": 0}, "consumers.comfy.completion.poll_seconds"),
        ({"timeout_seconds": -5}, "consumers.comfy.completion.timeout_seconds"),
        ({"poll_second": 1}, "consumers.comfy.completion.poll_second"),
        (5, "consumers.comfy.completion"),
    ],
)
def test_bad_completion_settings_are_refused(completion: object, key_path: str) -> None:
    assert_error(with_consumer("comfy", adapter="comfyui", completion=completion), key_path)


# --- timeouts.keepalive_seconds ----------------------------------------------------


def test_keepalive_defaults_to_four_seconds() -> None:
    assert parse_config(document()).consumers["voice"].timeouts.keepalive_seconds == 4.0


def test_keepalive_can_be_set_without_touching_the_other_timeouts() -> None:
    config = parse_config(with_consumer("voice", timeouts={"keepalive_seconds": 1.5}))

    assert config.consumers["voice"].timeouts == Timeouts(keepalive_seconds=1.5)


@pytest.mark.parametrize("value", [0, -1, "4s"])
def test_a_bad_keepalive_is_refused(value: object) -> None:
    assert_error(
        with_consumer("voice", timeouts={"keepalive_seconds": value}),
        "consumers.voice.timeouts.keepalive_seconds",
    )


# --- gpu_routes --------------------------------------------------------------------


def test_without_gpu_routes_every_post_is_a_job() -> None:
    assert parse_config(document()).consumers["voice"].gpu_routes is None


def test_gpu_routes_default_their_method_to_post() -> None:
    doc = with_consumer(
        "voice", gpu_routes=[{"path": "/api/synthesize"}, {"method": "put", "path": "/x"}]
    )

    assert parse_config(doc).consumers["voice"].gpu_routes == (
        Route("POST", "/api/synthesize"),
        Route("PUT", "/x"),
    )


@pytest.mark.parametrize("adapter", ["comfyui", "ollama"])
def test_gpu_routes_are_refused_for_other_adapters(adapter: str) -> None:
    doc = with_consumer("voice", adapter=adapter, gpu_routes=[{"path": "/x"}])

    assert_error(doc, "consumers.voice.gpu_routes", "only for adapter 'generic'", repr(adapter))


@pytest.mark.parametrize(
    ("routes", "key_path", "hint"),
    [
        ([], "consumers.voice.gpu_routes", "leave it out"),
        ({"path": "/x"}, "consumers.voice.gpu_routes", "list"),
        ([{"method": "POST"}], "consumers.voice.gpu_routes[0].path", "required"),
        ([{"path": "/a"}, {"path": "b"}], "consumers.voice.gpu_routes[1].path", "'/'"),
        ([{"path": "/a", "body": "x"}], "consumers.voice.gpu_routes[0].body", "unknown key"),
    ],
)
def test_bad_gpu_routes_are_refused(routes: object, key_path: str, hint: str) -> None:
    assert_error(with_consumer("voice", gpu_routes=routes), key_path, hint)


# --- consumers.<n>.listen ----------------------------------------------------------


def test_a_consumer_port_is_optional() -> None:
    assert parse_config(document()).consumers["ollama"].listen is None


def test_a_consumer_port_parses_like_the_main_listen() -> None:
    config = parse_config(with_consumer("ollama", listen="127.0.0.1:11435"))

    assert config.consumers["ollama"].listen == Listen("127.0.0.1", 11435)


@pytest.mark.parametrize("value", ["11435", "127.0.0.1", "h:70000", 11435])
def test_a_bad_consumer_port_is_refused(value: object) -> None:
    assert_error(with_consumer("ollama", listen=value), "consumers.ollama.listen")


def test_a_consumer_port_may_not_be_the_main_port() -> None:
    doc = with_consumer("ollama", listen="0.0.0.0:9000")
    doc["listen"] = "127.0.0.1:9000"

    assert_error(doc, "consumers.ollama.listen", "port 9000", "taken by listen")


def test_two_consumers_may_not_share_a_port() -> None:
    doc = document()
    doc["consumers"]["comfy"]["listen"] = "127.0.0.1:9100"
    doc["consumers"]["voice"]["listen"] = "127.0.0.2:9100"

    # The second in the file is the one named.
    assert_error(doc, "consumers.voice.listen", "port 9100", "consumers.comfy.listen")


def test_consumers_on_distinct_ports_are_accepted() -> None:
    doc = document()
    doc["consumers"]["comfy"]["listen"] = "127.0.0.1:9100"
    doc["consumers"]["voice"]["listen"] = "127.0.0.1:9101"

    ports = {name: c.listen for name, c in parse_config(doc).consumers.items()}

    assert ports == {
        "comfy": Listen("127.0.0.1", 9100),
        "ollama": None,
        "voice": Listen("127.0.0.1", 9101),
    }


# --- openai ------------------------------------------------------------------------

OPENAI = {
    "chat": "ollama",
    "speech": "voice",
    "transcriptions": "voice",
    "images": "comfy",
    "models": {"llama3.2:3b": "ollama", "kokoro": "voice"},
}


def test_openai_is_empty_by_default() -> None:
    openai = parse_config(document()).openai

    assert (openai.chat, openai.speech, openai.transcriptions, openai.images) == (None,) * 4
    assert dict(openai.models) == {}


def test_openai_names_a_consumer_per_route_family_and_per_model() -> None:
    config: Config = parse_config(document(openai=OPENAI))
    openai = config.openai

    assert (openai.chat, openai.speech, openai.transcriptions, openai.images) == (
        "ollama",
        "voice",
        "voice",
        "comfy",
    )
    assert dict(openai.models) == OPENAI["models"]
    with pytest.raises(TypeError):
        openai.models["x"] = "voice"  # type: ignore[index]


@pytest.mark.parametrize(
    ("openai", "key_path", "hints"),
    [
        ({"chat": "olama"}, "openai.chat", ("'olama'", "did you mean 'ollama'?")),
        ({"images": "nobody"}, "openai.images", ("unknown consumer 'nobody'",)),
        ({"models": {"m": "vocie"}}, "openai.models.m", ("did you mean 'voice'?",)),
        ({"models": {"": "voice"}}, "openai.models", ("non-empty",)),
        ({"models": ["ollama"]}, "openai.models", ("mapping",)),
        ({"speach": "voice"}, "openai.speach", ("did you mean 'speech'?",)),
        ({"chat": 3}, "openai.chat", ("non-empty string",)),
        ("ollama", "openai", ("mapping",)),
    ],
)
def test_bad_openai_settings_are_refused(
    openai: object, key_path: str, hints: tuple[str, ...]
) -> None:
    assert_error(document(openai=openai), key_path, *hints)


def test_with_an_adapter_health_and_paths_may_be_left_out() -> None:
    doc = document()
    doc["consumers"]["comfy"] = {"url": "http://127.0.0.1:8188", "adapter": "comfyui"}

    comfy = parse_config(doc).consumers["comfy"]

    assert (comfy.health, dict(comfy.paths)) == (None, {})


def test_the_generic_adapter_still_requires_health() -> None:
    doc = with_consumer("voice", adapter="generic")
    del doc["consumers"]["voice"]["health"]

    assert_error(doc, "consumers.voice.health", "required")
