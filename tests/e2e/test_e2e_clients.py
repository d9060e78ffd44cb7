"""
Unmodified clients through a real ``twistd -n mgpumanager`` in front of the
simulated host: the official ``ollama`` and ``openai`` libraries and a
ComfyUI script (``websocket-client`` for the progress feed), each pointed at
the daemon by nothing but its address, and all scheduled.  The clients are
synchronous, so they run in threads while the reactor serves the host.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import attrs
import ollama
import openai
import pytest
import pytest_twisted
import treq
import websocket
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mgpumanager.simulate.host import HostConfig, SimulatedHost
from tests.comfy_feed import messages_until_idle
from tests.daemon import Daemon, free_port

LLM, EMBED = "sim-llm:7b", "sim-embed:latest"
GRAPH = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
T = TypeVar("T")


@attrs.frozen
class Stage:
    host: SimulatedHost
    daemon: Daemon
    ollama_port: int

    @property
    def url(self) -> str:
        return self.daemon.url


async def in_thread(call: Callable[[], T]) -> T:
    result: T = await deferToThread(call)
    return result


@pytest_twisted.async_yield_fixture(scope="module")
async def stage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stage]:
    workdir = tmp_path_factory.mktemp("clients")
    profile = HostConfig.fast(
        state_path=str(workdir / "card.json"),
        audio_dir=str(workdir / "audio"),
        ollama_lines=5,
        total_mib=32768,
        comfy=attrs.evolve(HostConfig.fast().comfy, work_seconds=1.5),
        comfy_answers_when_done=False,
    )
    host = SimulatedHost(profile, clock=reactor)
    await host.start(reactor)
    ollama_port = free_port()
    config = host.daemon_config()
    config["consumers"]["ollama"].update(adapter="ollama", listen=f"127.0.0.1:{ollama_port}")
    config["consumers"]["comfyui"]["adapter"] = "comfyui"
    config["openai"] = {"chat": "ollama", "speech": "speech", "transcriptions": "whisper"}
    daemon = Daemon(config, workdir, ("--simulated-card", str(profile.state_path)))
    await in_thread(daemon.start)
    yield Stage(host, daemon, ollama_port)
    await in_thread(daemon.stop)
    await host.stop()


async def quiet(stage: Stage) -> None:
    """Wait until ComfyUI has no work left, and count overlaps from now on."""
    while stage.host.comfy.queue.remaining:
        await deferLater(reactor, 0.02)
    stage.host.gpu_jobs.max_active = stage.host.gpu_jobs.active


def openai_client(stage: Stage) -> openai.OpenAI:
    return openai.OpenAI(base_url=stage.url + "/v1", api_key="unused", max_retries=0)


async def total_jobs(stage: Stage) -> int:
    status = await (await treq.get(stage.url + "/v1/status")).json()
    jobs: int = status["scheduler"]["total_jobs"]
    return jobs


async def ollama_calls(client: ollama.Client) -> None:
    generated = await in_thread(lambda: client.generate(model=LLM, prompt="hello"))
    assert generated.done and generated.response

    def chat_chunks() -> list[tuple[float, str]]:
        stream = client.chat(
            model=LLM, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return [(time.monotonic(), chunk.message.content) for chunk in stream]

    chunks = await in_thread(chat_chunks)
    assert len(chunks) >= 5
    assert chunks[-1][0] - chunks[0][0] > 0.02, "chunks arrive as made, not at the end"
    names = [model.model for model in (await in_thread(client.list)).models]
    assert LLM in names
    assert LLM in [model.model for model in (await in_thread(client.ps)).models]
    embedded = await in_thread(lambda: client.embed(model=EMBED, input=["a", "b"]))
    assert len(embedded.embeddings) == 2


@pytest_twisted.ensureDeferred
async def test_the_ollama_library_through_the_passthrough(stage: Stage) -> None:
    before = await total_jobs(stage)
    await ollama_calls(ollama.Client(host=stage.url + "/upstream/ollama"))
    assert await total_jobs(stage) - before == 3, "generate, chat and embed; not list or ps"


@pytest_twisted.ensureDeferred
async def test_the_ollama_library_on_the_per_server_port(stage: Stage) -> None:
    await ollama_calls(ollama.Client(host=f"http://127.0.0.1:{stage.ollama_port}"))


@pytest_twisted.ensureDeferred
async def test_the_openai_library_against_the_daemon(stage: Stage) -> None:
    client = openai_client(stage)
    messages: Any = [{"role": "user", "content": "hi"}]
    answer = await in_thread(
        lambda: client.chat.completions.create(model=LLM, messages=messages)
    )
    assert answer.choices[0].message.content

    def streamed() -> list[str]:
        stream = client.chat.completions.create(model=LLM, messages=messages, stream=True)
        return [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]

    pieces = await in_thread(streamed)
    assert len([p for p in pieces if p]) >= 2, "the SSE stream arrives chunk by chunk"
    vectors = await in_thread(lambda: client.embeddings.create(model=EMBED, input=["a"]))
    assert len(vectors.data) == 1 and vectors.data[0].embedding
    speech = await in_thread(
        lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    )
    audio = speech.read()
    assert audio[:4] == b"RIFF"
    text = await in_thread(
        lambda: client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    )
    assert isinstance(text.text, str)
    ids = [model.id for model in await in_thread(lambda: list(client.models.list()))]
    assert LLM in ids and len(ids) == len(set(ids))


@pytest_twisted.ensureDeferred
async def test_an_unrouted_openai_route_is_an_sdk_error_with_the_daemons_message(
    stage: Stage,
) -> None:
    client = openai_client(stage)
    with pytest.raises(openai.APIStatusError) as caught:
        await in_thread(lambda: client.images.generate(model="sd", prompt="a cat"))
    assert caught.value.status_code == 501
    assert "openai.images" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    body: Any = caught.value.body
    assert body["code"] == "no_consumer" and body["retryable"] is False


@pytest_twisted.ensureDeferred
async def test_a_comfyui_script_through_the_passthrough(stage: Stage) -> None:
    base = stage.url + "/upstream/comfyui"
    socket = await in_thread(
        lambda: websocket.create_connection(
            base.replace("http://", "ws://") + "/ws?clientId=script", timeout=10
        )
    )
    try:
        greeting = json.loads(await in_thread(socket.recv))
        assert greeting["data"]["sid"] == "script"
        response = await treq.post(base + "/prompt", json={"prompt": GRAPH, "client_id": "script"})
        assert response.code == 200
        prompt_id = (await response.json())["prompt_id"]
        started = time.monotonic()
        history = await treq.get(f"{base}/history/{prompt_id}")
        assert history.code == 200 and time.monotonic() - started < 1.0, "polling never waits"

        messages = await in_thread(lambda: messages_until_idle(socket))
    finally:
        await in_thread(socket.close)
    assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3, 4]
    entry = await (await treq.get(f"{base}/history/{prompt_id}")).json()
    image = entry[prompt_id]["outputs"]["9"]["images"][0]
    view = await treq.get(base + "/view", params={"filename": image["filename"], "type": "output"})
    assert view.code == 200 and (await view.content())[:4] == b"\x89PNG"


@pytest_twisted.ensureDeferred
async def test_a_gpu_job_waits_for_a_prompt_submitted_through_the_passthrough(
    stage: Stage,
) -> None:
    await quiet(stage)
    response = await treq.post(stage.url + "/upstream/comfyui/prompt", json={"prompt": GRAPH})
    assert response.code == 200
    spoken = await treq.post(
        stage.url + "/v1/tts", data=b'{"text":"x"}', headers={"content-type": "application/json"}
    )
    assert spoken.code == 200, await spoken.text()
    assert stage.host.gpu_jobs.max_active == 1, "the speech job ran while the prompt did"


@pytest_twisted.ensureDeferred
async def test_a_model_list_answers_at_once_while_an_image_job_holds_the_gpu(
    stage: Stage,
) -> None:
    await quiet(stage)
    stage.host.comfy.answer_when_done = True
    try:
        image = treq.post(stage.url + "/upstream/comfyui/prompt", json={"prompt": GRAPH})
        await deferLater(reactor, 0.2)
        started = time.monotonic()
        tags = await treq.get(stage.url + "/upstream/ollama/api/tags")
        assert tags.code == 200
        assert time.monotonic() - started < 0.5
        chat = deferToThread(
            lambda: openai_client(stage).chat.completions.create(
                model=LLM, messages=[{"role": "user", "content": "hi"}]
            )
        )
        await gatherResults([image, chat])
        assert (await image).code == 200
    finally:
        stage.host.comfy.answer_when_done = False
    assert stage.host.gpu_jobs.max_active == 1
