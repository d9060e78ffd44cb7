"""
What the daemon is for, shown end to end on the simulated GPU host: the same
mixed concurrent workload runs the card out of memory when sent straight to the
servers, and runs clean through ``twistd -n mgpumanager``, which evicts and
loads consumers one job at a time and explains every eviction.  ComfyUI
answers ``POST /prompt`` at once and generates afterwards, and Ollama keeps
its model after its answer, as the real servers do.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from mgpumanager.simulate.consumers import fake_wav
from mgpumanager.simulate.host import HostConfig, SimulatedHost
from tests.daemon import Daemon

KINDS = ("tts", "stt", "llm", "image")


def profile(tmp_path: Path) -> HostConfig:
    """The 16 GiB demo card with millisecond timings; ComfyUI loads slower than Ollama."""
    config = HostConfig.fast(state_path=str(tmp_path / "card.json"))
    return attrs.evolve(config, comfy=attrs.evolve(config.comfy, load_seconds=0.15))


def workload(count: int = 40) -> list[str]:
    """
    A reproducible shuffle of every kind, ten of each.  Each test first warms
    Ollama with one chat, as a real host's usually is: from then on ComfyUI no
    longer fits beside mvoice and whisper.
    """
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]
    random.Random(7).shuffle(kinds)
    return kinds


def body_for(kind: str) -> bytes:
    if kind == "stt":
        return fake_wav("a short clip to transcribe")
    if kind == "llm":
        return json.dumps({"prompt": "hello", "num_lines": 3}).encode()
    if kind == "image":
        return json.dumps({"prompt": {"seed": 1}}).encode()
    return json.dumps({"text": "hello there"}).encode()


DIRECT_PATHS = {
    "tts": ("mvoice", "/api/synthesize"),
    "stt": ("whisper", "/inference"),
    "llm": ("ollama", "/api/generate"),
    "image": ("comfyui", "/prompt"),
}


async def send_all(urls: list[tuple[str, str]]) -> list[tuple[int, bytes]]:
    async def one(kind: str, url: str) -> tuple[int, bytes]:
        response = await treq.post(url, data=body_for(kind))
        return response.code, await response.content()

    return list(
        await gatherResults([Deferred.fromCoroutine(one(kind, url)) for kind, url in urls])
    )


def out_of_memory(answers: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(code, body) for code, body in answers if b"CUDA out of memory" in body]


async def comfy_failures(host: SimulatedHost) -> list[str]:
    """
    Wait for ComfyUI's queue to drain, then the prompts its history marks as
    failed: ComfyUI reports an out-of-memory there, not in ``/prompt``'s answer.
    """
    url = host.urls()["comfyui"]
    for _ in range(400):
        queue = await (await treq.get(url + "/queue")).json()
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        await deferLater(reactor, 0.05, lambda: None)
    history = await (await treq.get(url + "/history")).json()
    return [i for i, entry in history.items() if entry["status"]["status_str"] != "success"]


async def started_host(config: HostConfig) -> SimulatedHost:
    host = SimulatedHost(config)
    await host.start(reactor)
    return host


@pytest_twisted.async_yield_fixture
async def direct_host(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    host = await started_host(profile(tmp_path))
    yield host
    await host.stop()


@pytest_twisted.ensureDeferred
async def test_the_workload_sent_directly_runs_out_of_memory(direct_host: SimulatedHost) -> None:
    urls = direct_host.urls()
    jobs = [(kind, urls[DIRECT_PATHS[kind][0]] + DIRECT_PATHS[kind][1]) for kind in workload()]
    await send_all([("llm", urls["ollama"] + "/api/generate")])  # Ollama warm
    answers = await send_all(jobs)
    failed = out_of_memory(answers)
    assert all(code == 500 for code, _ in failed)
    failed_prompts = await comfy_failures(direct_host)
    assert failed or failed_prompts, "the unmanaged servers were expected to run out of memory"
    assert direct_host.card.oom_count >= 1
    assert direct_host.gpu_jobs.max_active > 1


@pytest_twisted.ensureDeferred
async def test_the_same_workload_through_the_daemon_never_runs_out_of_memory(
    tmp_path: Path,
) -> None:
    config = profile(tmp_path)
    host = await started_host(config)
    daemon_config: dict[str, Any] = host.daemon_config()
    daemon_config["routing"]["stt"] = "whisper"
    daemon_config["lifecycle"]["verify_interval_seconds"] = 0.05
    daemon_config["lifecycle"]["settle_seconds"] = 0.05
    daemon = Daemon(daemon_config, tmp_path, ("--simulated-card", str(config.state_path)))
    try:
        daemon.start()
        await wait_until_healthy(daemon)
        await send_all([("llm", daemon.url + "/v1/llm")])  # Ollama warm, as it usually is
        answers = await send_all([(kind, daemon.url + f"/v1/{kind}") for kind in workload()])
        assert out_of_memory(answers) == []
        assert [code for code, _ in answers] == [200] * len(answers), [
            body[:200] for code, body in answers if code != 200
        ]
        assert await comfy_failures(host) == []
        assert host.card.oom_count == 0
        assert host.gpu_jobs.max_active == 1
        assert host.card.peak_used_mib <= config.total_mib

        status = await (await treq.get(daemon.url + "/v1/status")).json()
        scheduler = status["scheduler"]
        assert scheduler["evictions"] >= 2
        assert scheduler["failed_unloads"] == scheduler["failed_loads"] == 0
        decisions = [d for d in scheduler["decisions"] if d["type"] == "evict"]
        assert decisions, "every eviction is explained in status"
        for decision in decisions:
            assert decision["victim"] is not None, json.dumps(decision)
            assert decision["victim"] in {"mvoice", "comfyui", "whisper", "ollama"}
            assert decision["outcome"] == "unloaded"
            assert decision["basis"] == "nvml"
            assert decision["needed_mib"] > decision["available_mib"]
            assert decision["unload_ms"] is not None
            assert decision["recovery_ms"] is not None
            reasons = {c["name"]: c["reason"] for c in decision["candidates"]}
            assert reasons[decision["victim"]] == "eligible"
            assert decision["target"] not in reasons
        assert status["gpu"]["total_mib"] == config.total_mib
        assert "err" not in status["gpu"]
        measured = {c["name"]: c["peak_resident_mib"] for c in status["consumers"]}
        assert measured["comfyui"] == config.comfy.model_mib
        assert "evicting" in daemon.log()
    finally:
        daemon.stop()
        await host.stop()


@pytest_twisted.ensureDeferred
async def test_plan_says_what_an_image_job_would_evict_and_touches_nothing(
    tmp_path: Path,
) -> None:
    config = profile(tmp_path)
    host = await started_host(config)
    daemon = Daemon(host.daemon_config(), tmp_path, ("--simulated-card", str(config.state_path)))
    try:
        daemon.start()
        await wait_until_healthy(daemon)
        # An LLM job leaves Ollama's model on the card: ComfyUI no longer fits.
        response = await treq.post(daemon.url + "/v1/llm", data=body_for("llm"))
        assert response.code == 200
        await response.content()
        used_before = host.card.used_mib
        plan = await (await treq.get(daemon.url + "/v1/plan/image")).json()
        assert plan["target"] == "comfyui"
        assert plan["would_evict"] == ["mvoice", "whisper"]  # both never used: name order
        assert plan["would_load"] is True
        assert plan["steps"][-1]["fit"]["fits"] is True
        assert host.card.used_mib == used_before
        status = await (await treq.get(daemon.url + "/v1/status")).json()
        assert status["scheduler"]["evictions"] == 0
    finally:
        daemon.stop()
        await host.stop()


async def wait_until_healthy(daemon: Daemon) -> None:
    for _ in range(200):
        status = await (await treq.get(daemon.url + "/v1/status")).json()
        if all(c["healthy"] for c in status["consumers"]) and "err" not in status["gpu"]:
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"daemon never saw a healthy host: {status}")
