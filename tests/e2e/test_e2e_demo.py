"""
The demo as a newcomer meets it: ``twistd -n mgpumanager --simulate`` on
``config/demo.yaml`` (only its ports moved to free ones), driven by the
official ``openai`` and ``ollama`` libraries pointed at the daemon by nothing
but its address.  Every door the README's tour shows must answer, and every
GPU call must go through the scheduler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import ollama
import openai
import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet.threads import deferToThread

from tests.daemon import REPO, Daemon, demo_config_on_free_ports

LLM, EMBED = "sim-llm:7b", "sim-embed:latest"
T = TypeVar("T")


async def in_thread(call: Callable[[], T]) -> T:
    result: T = await deferToThread(call)
    return result


@pytest_twisted.async_yield_fixture(scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    daemon = Daemon(demo_config_on_free_ports(), tmp_path_factory.mktemp("demo"),
                    ("--simulate",))
    await in_thread(daemon.start)
    yield daemon
    assert await in_thread(daemon.stop) == 0, daemon.log()


async def jobs_by_consumer(daemon: Daemon) -> dict[str, int]:
    status: dict[str, Any] = await (await treq.get(daemon.url + "/v1/status")).json()
    return {c["name"]: c["total_requests"] for c in status["consumers"]}


def test_the_demo_config_names_every_openai_door() -> None:
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    assert config["openai"] == {"chat": "ollama", "speech": "speech",
                                "transcriptions": "whisper"}


@pytest_twisted.ensureDeferred
async def test_the_openai_library_against_the_demo(demo: Daemon) -> None:
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    before = await jobs_by_consumer(demo)
    messages: Any = [{"role": "user", "content": "hi"}]
    chat = await in_thread(lambda: client.chat.completions.with_raw_response.create(
        model=LLM, messages=messages))
    assert chat.headers["server-timing"].startswith("queue;dur=")
    assert chat.parse().choices[0].message.content

    def streamed() -> list[str]:
        stream = client.chat.completions.create(model=LLM, messages=messages, stream=True)
        return [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]

    assert len([piece for piece in await in_thread(streamed) if piece]) >= 2
    vectors = await in_thread(lambda: client.embeddings.create(model=EMBED, input=["a"]))
    assert vectors.data[0].embedding
    speech = await in_thread(
        lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="hello"))
    audio = speech.read()
    assert audio[:4] == b"RIFF"
    text = await in_thread(lambda: client.audio.transcriptions.create(
        model="whisper-1", file=("hello.wav", audio)))
    assert "transcript" in text.text
    after = await jobs_by_consumer(demo)
    # Chat, stream and embeddings on Ollama, speech and transcription on their servers.
    assert {name: after[name] - before[name] for name in after} == {
        "ollama": 3, "speech": 1, "whisper": 1, "mvoice": 0, "comfyui": 0}


@pytest_twisted.ensureDeferred
async def test_the_ollama_library_against_the_demo(demo: Daemon) -> None:
    client = ollama.Client(host=demo.url + "/upstream/ollama")
    before = await jobs_by_consumer(demo)
    generated = await in_thread(lambda: client.generate(model=LLM, prompt="hello"))
    assert generated.done and generated.response

    def chat_chunks() -> list[str]:
        stream = client.chat(model=LLM, messages=[{"role": "user", "content": "hi"}],
                             stream=True)
        return [chunk.message.content for chunk in stream]

    assert len(await in_thread(chat_chunks)) >= 2
    embedded = await in_thread(lambda: client.embed(model=EMBED, input=["a", "b"]))
    assert len(embedded.embeddings) == 2
    assert LLM in [model.model for model in (await in_thread(client.ps)).models]
    after = await jobs_by_consumer(demo)
    assert after["ollama"] - before["ollama"] == 3, "generate, chat and embed; not ps"
