"""
The OpenAI-compatible routes over loopback: each family goes to the consumer
``openai`` names (or the one a JSON body's ``model`` is mapped to) at the same
path, ``GET /v1/models`` merges, and the daemon's own errors on these paths are
in OpenAI's shape, with ``x-should-retry: false`` where a retry cannot help.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq

from mgpumanager.common.errors import NO_CONSUMER, QUEUE_FULL, ApiError
from mgpumanager.config.parsing import parse_config
from mgpumanager.web.answers import Shape, error_document
from mgpumanager.web.api import main_port_routes
from tests.builders import consumer
from tests.web.test_upstream import Stage, start_stage, stop_stage

DOCUMENT = {
    "openai": {"chat": "a", "transcriptions": "b", "models": {"big-model": "b"}},
    "consumers": {
        "a": consumer(0, "llm") | {"url": "http://127.0.0.1:{a}"},
        "b": consumer(0, "stt") | {"url": "http://127.0.0.1:{b}"},
        # Listed under no openai key: never asked for its models.
        "c": consumer(0, "tts") | {"url": "http://127.0.0.1:{c}"},
        "gone": consumer(1, "tts"),
    },
}


@pytest_twisted.async_yield_fixture
async def stage() -> AsyncIterator[Stage]:
    document = json.loads(json.dumps(DOCUMENT))
    document["openai"]["speech"] = "gone"
    started = await start_stage(document, ("a", "b", "c"))
    yield started
    await stop_stage(started)


async def post_json(stage: Stage, path: str, body: bytes) -> Any:
    return await treq.post(
        stage.url + path, data=body, headers={"content-type": "application/json"}
    )


@pytest_twisted.ensureDeferred
async def test_a_family_goes_to_its_consumer_at_the_same_path_as_a_gpu_job(
    stage: Stage,
) -> None:
    body = b'{"model": "small", "messages": []}'
    response = await post_json(stage, "/v1/chat/completions?x=1", body)
    seen = await response.json()
    assert (seen["server"], seen["uri"], seen["body"]) == (
        "a", "/v1/chat/completions?x=1", body.decode()
    )
    assert stage.scheduler.total_jobs == 1


@pytest_twisted.ensureDeferred
async def test_a_mapped_model_routes_first_and_the_body_is_forwarded_unchanged(
    stage: Stage,
) -> None:
    body = b'{"model":  "big-model", "input": "x"}'
    seen = await (await post_json(stage, "/v1/embeddings", body)).json()
    assert (seen["server"], seen["body"]) == ("b", body.decode())


@pytest.mark.parametrize(
    "body",
    [b'{"model": "big-model"', b"x" * (1024 * 1024 + 1), b'["big-model"]'],
    ids=["not-json", "over-1-MiB", "not-an-object"],
)
@pytest_twisted.ensureDeferred
async def test_a_body_that_cannot_be_read_routes_by_path(stage: Stage, body: bytes) -> None:
    seen = await (await post_json(stage, "/v1/completions", body)).json()
    assert seen["server"] == "a"
    assert len(seen["body"]) == len(body)


@pytest_twisted.ensureDeferred
async def test_an_unrouted_family_is_no_consumer_in_openais_shape(stage: Stage) -> None:
    response = await post_json(stage, "/v1/images/generations", b"{}")
    assert response.code == 501
    assert response.headers.getRawHeaders("x-should-retry") == ["false"]
    error = (await response.json())["error"]
    assert error["code"] == error["type"] == "no_consumer"
    assert "openai.images" in error["message"] and error["retryable"] is False


@pytest_twisted.ensureDeferred
async def test_an_unknown_v1_path_is_not_found_in_openais_shape(stage: Stage) -> None:
    response = await treq.get(stage.url + "/v1/assistants")
    assert response.code == 404
    assert (await response.json())["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_a_consumer_down_is_an_openai_error_the_sdk_may_retry(stage: Stage) -> None:
    response = await post_json(stage, "/v1/audio/speech", b"{}")
    assert response.code == 502
    assert response.headers.getRawHeaders("x-should-retry") is None
    error = (await response.json())["error"]
    assert (error["code"], error["consumer"], error["retryable"]) == (
        "consumer_unreachable", "gone", True
    )


@pytest_twisted.ensureDeferred
async def test_the_site_refuses_an_oversized_body_in_openais_shape(stage: Stage) -> None:
    response = await treq.post(
        stage.url + "/v1/audio/transcriptions", data=b"x" * (stage.config.max_body_mib * 2**20 + 1)
    )
    assert response.code == 413
    assert (await response.json())["error"]["code"] == "body_too_large"


@pytest_twisted.ensureDeferred
async def test_models_merge_the_configured_consumers_skipping_failures(stage: Stage) -> None:
    response = await treq.get(stage.url + "/v1/models")
    document = await response.json()
    assert document["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in document["data"]] == [
        ("shared", "a"), ("a", "a"), ("b", "b")
    ]
    assert stage.servers["c"].seen == []
    assert stage.scheduler.total_jobs == 0


SHAPES = {"consumers": {"ollama": consumer(1, "llm")}}


@pytest.mark.parametrize(
    ("path", "openai"),
    [
        (b"/v1/chat/completions", True),
        (b"/v1/models", True),
        (b"/v1/anything", True),
        (b"/v1/status", False),
        (b"/v1/events", False),
        (b"/v1/openapi.json", False),
        (b"/v1/plan/llm", False),
        (b"/v1/tts", False),
        (b"/healthz", False),
        (b"/upstream/ollama/v1/chat/completions", False),
    ],
)
def test_which_paths_answer_in_openais_shape(path: bytes, openai: bool) -> None:
    shape = main_port_routes(parse_config(SHAPES)).error_shape(b"GET", path)
    assert (shape is Shape.OPENAI) is openai
    shaped: Any = error_document(ApiError(NO_CONSUMER, "nope", "x"), shape)
    assert ("message" in shaped["error"]) if openai else (shaped["error"] == "no_consumer")


@pytest.mark.parametrize(
    ("retry_after", "should_retry"), [(None, None), ("5", None), ("61", "false")]
)
def test_a_refusal_waiting_past_a_minute_tells_sdks_not_to_retry(
    retry_after: str | None, should_retry: str | None
) -> None:
    headers = {"Retry-After": retry_after} if retry_after else {}
    error = ApiError(QUEUE_FULL, "full", headers=headers)
    assert error.response_headers().get("x-should-retry") == should_retry
