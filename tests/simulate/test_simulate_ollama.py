"""
The simulated Ollama answers what the official ``ollama`` and ``openai`` clients
parse, pointed straight at it over loopback, and keeps Ollama's memory habits:
models load on first use, stay for their ``keep_alive``, and ``keep_alive: 0``
unloads.  The clients are synchronous, so they run in a thread while the reactor
serves.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import ollama
import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from mgpumanager.simulate.host import HostConfig, SimulatedHost
from mgpumanager.simulate.ollama_models import parse_keep_alive
from mgpumanager.simulate.server import Refusal
from tests.simulate.test_simulate import body_json, eventually, started

MIB = 1024 * 1024
LLM, EMBED = "sim-llm:7b", "sim-embed:latest"
T = TypeVar("T")


@pytest_twisted.async_yield_fixture
async def host(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    config = HostConfig.fast(audio_dir=str(tmp_path / "audio"), ollama_lines=5)
    simulated = await started(config)
    yield simulated
    await simulated.stop()


async def in_thread(call: Callable[[], T]) -> T:
    result: T = await deferToThread(call)
    return result


def ollama_client(host: SimulatedHost) -> ollama.Client:
    return ollama.Client(host=host.urls()["ollama"])


def openai_client(host: SimulatedHost) -> openai.OpenAI:
    return openai.OpenAI(base_url=host.urls()["ollama"] + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("45", 45.0),
        (-1, None),
        ("-1m", None),
    ],
)
def test_keep_alive_reads_like_ollama(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value, 300.0) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "", "m5", True, [1]])
def test_keep_alive_refuses_what_ollama_refuses(value: object) -> None:
    with pytest.raises(Refusal) as caught:
        parse_keep_alive(value, 300.0)
    assert caught.value.status == 400


@pytest_twisted.ensureDeferred
async def test_the_ollama_client_generates_chats_and_lists(host: SimulatedHost) -> None:
    client = ollama_client(host)
    assert host.card.held_by("ollama") == 0
    answer = await in_thread(lambda: client.generate(model=LLM, prompt="hello"))
    assert answer.response == "tok0tok1tok2tok3tok4"
    assert answer.done is True and answer.done_reason == "stop"
    assert answer.eval_count == 5
    assert host.card.held_by("ollama") == 6000, "loaded on demand"

    def chat_chunks() -> list[Any]:
        stream = client.chat(model=LLM, messages=[{"role": "user", "content": "hi"}], stream=True)
        return list(stream)

    chunks = await in_thread(chat_chunks)
    assert [c.message.content for c in chunks[:-1]] == [f"tok{i}" for i in range(5)]
    assert all(c.done is False for c in chunks[:-1])
    assert chunks[-1].done is True and chunks[-1].message.role == "assistant"

    listed = await in_thread(client.list)
    assert {m.model for m in listed.models} == {LLM, EMBED}
    running = await in_thread(client.ps)
    [model] = running.models
    assert (model.name, model.size_vram) == (LLM, 6000 * MIB)
    assert model.expires_at is not None
    assert 290 < (model.expires_at - datetime.now(model.expires_at.tzinfo)).total_seconds() <= 300

    embedded = await in_thread(lambda: client.embed(model=EMBED, input=["a", "b", "a"]))
    vectors = embedded.embeddings
    assert len(vectors) == 3 and vectors[0] == vectors[2] != vectors[1]
    assert {m.name for m in (await in_thread(client.ps)).models} == {LLM, EMBED}
    assert host.card.held_by("ollama:" + EMBED) == 600, "a second runner on the card"


@pytest_twisted.ensureDeferred
async def test_an_unknown_model_is_not_found(host: SimulatedHost) -> None:
    client = ollama_client(host)
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(lambda: client.generate(model="missing:1b", prompt="hi"))
    assert caught.value.status_code == 404
    assert "not found" in caught.value.error


@pytest_twisted.ensureDeferred
async def test_keep_alive_zero_and_ollama_stop_unload(host: SimulatedHost) -> None:
    url = host.urls()["ollama"]
    client = ollama_client(host)
    await in_thread(lambda: client.generate(model=LLM, prompt="hi", keep_alive=0))
    await eventually(lambda: host.card.held_by("ollama") == 0)

    loaded = await in_thread(lambda: client.generate(model=LLM))  # no prompt: load only
    assert loaded.done_reason == "load" and loaded.response == ""
    assert host.card.held_by("ollama") == 6000
    stop = await treq.post(url + "/api/generate", json={"model": LLM, "keep_alive": 0})
    answer = await body_json(stop)
    assert set(answer) == {"model", "created_at", "response", "done", "done_reason"}
    assert (answer["response"], answer["done"], answer["done_reason"]) == ("", True, "unload")
    await eventually(lambda: host.card.held_by("ollama") == 0)
    assert (await body_json(await treq.get(url + "/api/ps"))) == {"models": []}


@pytest_twisted.ensureDeferred
async def test_a_model_expires_after_its_keep_alive(host: SimulatedHost) -> None:
    url = host.urls()["ollama"] + "/api/generate"
    response = await treq.post(url, json={"model": LLM, "prompt": "x", "keep_alive": "50ms"})
    lines = [json.loads(line) for line in (await response.content()).splitlines()]
    assert lines[-1]["done"] is True and len(lines) == 6
    assert host.card.held_by("ollama") == 6000
    await eventually(lambda: host.card.held_by("ollama") == 0)

    forever = await treq.post(url, json={"model": LLM, "prompt": "x", "keep_alive": -1})
    await forever.content()
    [model] = (await body_json(await treq.get(host.urls()["ollama"] + "/api/ps")))["models"]
    assert model["expires_at"].startswith("2318-")


@pytest_twisted.ensureDeferred
async def test_the_openai_client_talks_to_the_compatibility_layer(host: SimulatedHost) -> None:
    client = openai_client(host)
    messages: Any = [{"role": "user", "content": "hello"}]
    whole = await in_thread(lambda: client.chat.completions.create(model=LLM, messages=messages))
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content == "tok0tok1tok2tok3tok4"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == 5

    def stream() -> list[Any]:
        return list(client.chat.completions.create(model=LLM, messages=messages, stream=True))

    chunks = await in_thread(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0tok1tok2tok3tok4"
    assert chunks[-1].choices[0].finish_reason == "stop"

    text = await in_thread(lambda: client.completions.create(model=LLM, prompt="once"))
    assert text.choices[0].text == "tok0tok1tok2tok3tok4"

    embedded = await in_thread(lambda: client.embeddings.create(model=EMBED, input=["a", "b"]))
    assert [e.index for e in embedded.data] == [0, 1]
    assert len(embedded.data[0].embedding) == 8
    models = await in_thread(client.models.list)
    assert {m.id for m in models.data} == {LLM, EMBED}


@pytest_twisted.ensureDeferred
async def test_the_openai_stream_is_server_sent_events(host: SimulatedHost) -> None:
    response = await treq.post(
        host.urls()["ollama"] + "/v1/chat/completions",
        json={"model": LLM, "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    events = (await response.content()).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    first = json.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "tok0"}
    assert len(events) == 5 + 1 + 2, "a chunk per token, a final chunk, [DONE]"
