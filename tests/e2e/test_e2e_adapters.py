"""
The adapters end to end, on the simulated host that behaves like the real
servers: ComfyUI answers ``POST /prompt`` at once and generates afterwards,
Ollama keeps its model after the answer, and an HTTP/1.0 speech server closes
every connection.  Through ``twistd -n mgpumanager`` none of it runs the card
out of memory or fails a job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from mgpumanager.simulate.host import HostConfig, SimulatedHost
from tests.daemon import Daemon
from tests.e2e.test_e2e_eviction import body_for, comfy_failures, wait_until_healthy


def profile(tmp_path: Path) -> HostConfig:
    """Prompts long enough that a job sent while one runs would overlap it."""
    config = HostConfig.fast(state_path=str(tmp_path / "card.json"))
    return attrs.evolve(
        config,
        comfy=attrs.evolve(config.comfy, load_seconds=0.15, work_seconds=0.5),
    )


@attrs.define
class Stack:
    host: SimulatedHost
    daemon: Daemon

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        response = await treq.post(self.daemon.url + path, data=body)
        return response.code, await response.content()

    async def status(self) -> dict[str, Any]:
        document: dict[str, Any] = await (await treq.get(self.daemon.url + "/v1/status")).json()
        return document

    async def consumer(self, name: str) -> dict[str, Any]:
        consumers = (await self.status())["consumers"]
        return next(c for c in consumers if c["name"] == name)


async def started_stack(
    tmp_path: Path, edit: Any = None, nvml: bool = True
) -> AsyncIterator[Stack]:
    config = profile(tmp_path)
    host = SimulatedHost(config)
    await host.start(reactor)
    document = host.daemon_config()
    document["lifecycle"]["verify_interval_seconds"] = 0.05
    document["lifecycle"]["settle_seconds"] = 0.05
    if edit is not None:
        edit(document)
    extra = ("--simulated-card", str(config.state_path)) if nvml else ()
    daemon = Daemon(document, tmp_path, extra)
    try:
        daemon.start()
        yield Stack(host, daemon)
    finally:
        daemon.stop()
        await host.stop()


@pytest_twisted.async_yield_fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async for started in started_stack(tmp_path):
        await wait_until_healthy(started.daemon)
        yield started


@pytest_twisted.ensureDeferred
async def test_a_tts_job_right_after_a_prompt_waits_for_the_generation(stack: Stack) -> None:
    image = Deferred.fromCoroutine(stack.post("/v1/image", body_for("image")))
    tts = Deferred.fromCoroutine(stack.post("/v1/tts", body_for("tts")))
    (image_code, answer), (tts_code, _) = await gatherResults([image, tts])
    assert image_code == tts_code == 200
    prompt_id = json.loads(answer)["prompt_id"]
    history = await (
        await treq.get(stack.host.urls()["comfyui"] + f"/history/{prompt_id}")
    ).json()
    assert history[prompt_id]["status"]["status_str"] == "success"
    assert stack.host.gpu_jobs.max_active == 1, "TTS ran beside the generation"
    assert stack.host.card.oom_count == 0


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_after_the_prompts_answer_keeps_the_gpu_held(
    stack: Stack,
) -> None:
    closing = HTTPConnectionPool(reactor, persistent=False)
    url = stack.daemon.url + "/v1/image"
    response = await treq.post(url, data=body_for("image"), pool=closing)
    assert response.code == 200
    await response.content()  # the connection closes with the answer
    running = (await stack.status())["scheduler"]["in_flight"]
    assert running == 1, "the prompt's job ended with its client"
    assert (await stack.post("/v1/tts", body_for("tts")))[0] == 200
    assert await comfy_failures(stack.host) == []
    assert stack.host.gpu_jobs.max_active == 1
    assert stack.host.card.oom_count == 0


@pytest_twisted.async_yield_fixture
async def ollama_in_the_way(tmp_path: Path) -> AsyncIterator[Stack]:
    """mvoice and whisper may share the card with ComfyUI: only Ollama is in its way."""

    def coexist(document: dict[str, Any]) -> None:
        document["consumers"]["comfyui"]["can_coexist_with"] = ["mvoice", "whisper"]

    async for started in started_stack(tmp_path, coexist):
        await wait_until_healthy(started.daemon)
        yield started


@pytest_twisted.ensureDeferred
async def test_an_image_job_unloads_ollama_through_keep_alive_0_first(
    ollama_in_the_way: Stack,
) -> None:
    stack = ollama_in_the_way
    assert (await stack.post("/v1/llm", body_for("llm")))[0] == 200
    ollama = await until(stack, "ollama", lambda c: bool(c.get("models")))
    assert [m["name"] for m in ollama["models"]] == ["sim-llm:7b"]
    assert (await stack.post("/v1/image", body_for("image")))[0] == 200
    await until_idle(stack)
    assert await comfy_failures(stack.host) == []
    status = await stack.status()
    victims = [d["victim"] for d in status["scheduler"]["decisions"]]
    assert "ollama" in victims
    ps = await (await treq.get(stack.host.urls()["ollama"] + "/api/ps")).json()
    assert ps["models"] == []
    assert stack.host.card.oom_count == 0
    assert stack.host.gpu_jobs.max_active == 1


@pytest_twisted.ensureDeferred
async def test_an_llm_job_frees_a_resident_comfyui_once_ollama_was_measured(
    stack: Stack,
) -> None:
    assert (await stack.post("/v1/llm", body_for("llm")))[0] == 200
    await until(stack, "ollama", lambda c: c["peak_resident_mib"] > 0)
    # What `ollama stop` sends, straight to Ollama: its model leaves the card.
    stop = {"model": "sim-llm:7b", "keep_alive": 0}
    await (await treq.post(stack.host.urls()["ollama"] + "/api/generate", json=stop)).content()
    await until(stack, "ollama", lambda c: not c["loaded"])
    assert (await stack.post("/v1/image", body_for("image")))[0] == 200
    await until(stack, "comfyui", lambda c: c["loaded"])
    assert (await stack.post("/v1/llm", body_for("llm")))[0] == 200
    decisions = (await stack.status())["scheduler"]["decisions"]
    assert any(d["target"] == "ollama" and d["victim"] == "comfyui" for d in decisions)
    assert stack.host.card.oom_count == 0
    assert stack.host.gpu_jobs.max_active == 1


@pytest_twisted.ensureDeferred
async def test_a_deleted_prompt_ends_its_job_within_two_polls(stack: Stack) -> None:
    comfy = stack.host.urls()["comfyui"]
    # Keep ComfyUI busy with work of its own, so the daemon's prompt waits in its queue.
    await (await treq.post(comfy + "/prompt", json={"prompt": {}, "work_seconds": 3})).content()
    code, answer = await stack.post("/v1/image", body_for("image"))
    assert code == 200
    prompt_id = json.loads(answer)["prompt_id"]
    await (await treq.post(comfy + "/queue", json={"delete": [prompt_id]})).content()
    deleted_at = reactor.seconds()
    # The next job gets the GPU once the daemon saw the prompt gone (polls every 0.05 s).
    code, _ = await stack.post("/v1/llm", body_for("llm"))
    assert code == 200
    assert reactor.seconds() - deleted_at < 2.5, "the job outlived its deleted prompt"


@pytest_twisted.ensureDeferred
async def test_jobs_right_after_loads_of_an_http10_server_never_fail(tmp_path: Path) -> None:
    def budget_only(document: dict[str, Any]) -> None:
        # Without NVML, by declared sizes on a card where speech and mvoice
        # cannot both fit: every job unloads the other and loads its own.
        document["gpu"]["total_mib"] = 3500
        document["routing"]["tts"] = "speech"
        document["routing"]["stt"] = "mvoice"
        # Every job here needs a swap, with the default scheduling: tts and
        # stt are interactive, so none waits out the linger.

    async for started in started_stack(tmp_path, budget_only, nvml=False):
        await until_probed(started)
        codes = []
        for i in range(50):
            path = "/v1/tts" if i % 2 == 0 else "/v1/stt"
            speech = json.dumps({"model": "tts-1", "input": "hello", "voice": "alloy"}).encode()
            code, body = await started.post(path, speech if i % 2 == 0 else body_for("stt"))
            codes.append((code, body[:120]))
        assert [c for c, _ in codes] == [200] * 50, [b for c, b in codes if c != 200]
        status = await started.status()
        speech = next(c for c in status["consumers"] if c["name"] == "speech")
        assert speech["loads"] >= 25


async def until(stack: Stack, name: str, check: Any) -> dict[str, Any]:
    for _ in range(200):
        consumer = await stack.consumer(name)
        if check(consumer):
            return consumer
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{name} never got there: {consumer}")


async def until_idle(stack: Stack) -> None:
    for _ in range(400):
        if (await stack.status())["scheduler"]["in_flight"] == 0:
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the GPU never came free")


async def until_probed(stack: Stack) -> None:
    for _ in range(200):
        consumers = (await stack.status())["consumers"]
        if all(c["healthy"] is not None for c in consumers):
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("never probed")
