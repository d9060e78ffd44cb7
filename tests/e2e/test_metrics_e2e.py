"""
``GET /metrics`` of the real daemon on the simulated host, parsed back with
``prometheus_client``'s own parser: after known jobs, evictions and a refused
job, every family carries the labels and counts a dashboard relies on, and the
figures agree with ``/v1/status``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from mgpumanager.web.metrics import MIB
from tests.daemon import Daemon
from tests.e2e.test_e2e_eviction import body_for, profile, started_host, wait_until_healthy

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """The family names, and every sample by name and labels."""
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


async def post(url: str, kind: str) -> int:
    response = await treq.post(url, data=body_for(kind))
    await response.content()
    code: int = response.code
    return code


@pytest_twisted.ensureDeferred
async def test_metrics_count_jobs_evictions_loads_and_a_refusal(tmp_path: Path) -> None:
    config = profile(tmp_path)
    host = await started_host(config)
    daemon_config: dict[str, Any] = host.daemon_config()
    del daemon_config["routing"]["stt"]  # a job of this kind is refused: no_consumer
    daemon = Daemon(daemon_config, tmp_path, ("--simulated-card", str(config.state_path)))
    try:
        daemon.start()
        await wait_until_healthy(daemon)
        # llm leaves Ollama resident; image then evicts mvoice and whisper;
        # tts loads mvoice back.
        for kind in ("llm", "image", "tts"):
            assert await post(daemon.url + f"/v1/{kind}", kind) == 200, daemon.log()[-2000:]
        assert await post(daemon.url + "/v1/stt", "stt") == 501

        response = await treq.get(daemon.url + "/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
        families, samples = parse((await response.content()).decode())
        status = await (await treq.get(daemon.url + "/v1/status")).json()
    finally:
        daemon.stop()
        await host.stop()

    assert {
        "mgpumanager_jobs", "mgpumanager_queue_depth", "mgpumanager_jobs_running",
        "mgpumanager_queue_wait_seconds", "mgpumanager_job_duration_seconds",
        "mgpumanager_load_duration_seconds", "mgpumanager_unload_duration_seconds",
        "mgpumanager_evictions", "mgpumanager_consumer_up", "mgpumanager_consumer_resident",
        "mgpumanager_consumer_vram_bytes", "mgpumanager_gpu_memory_total_bytes",
        "mgpumanager_gpu_memory_used_bytes", "mgpumanager_gpu_memory_free_bytes",
        "mgpumanager_gpu_guest_bytes", "mgpumanager_card_yielded",
    } <= families

    jobs = "mgpumanager_jobs_total"
    assert value(samples, jobs, consumer="ollama", kind="llm", outcome="ok") == 1
    assert value(samples, jobs, consumer="comfyui", kind="image", outcome="ok") == 1
    assert value(samples, jobs, consumer="mvoice", kind="tts", outcome="ok") == 1
    assert value(samples, jobs, consumer="", kind="stt", outcome="no_consumer") == 1
    assert total(samples, jobs) == 4

    # Every job that ran waited once and ran once, under its own labels.
    assert total(samples, "mgpumanager_queue_wait_seconds_count") == 3
    for consumer, kind in (("ollama", "llm"), ("comfyui", "image"), ("mvoice", "tts")):
        count = "mgpumanager_job_duration_seconds_count"
        assert value(samples, count, consumer=consumer, kind=kind) == 1
        bucket = "mgpumanager_job_duration_seconds_bucket"
        assert value(samples, bucket, consumer=consumer, kind=kind, le="600.0") == 1
        assert value(samples, bucket, consumer=consumer, kind=kind, le="+Inf") == 1

    evictions = "mgpumanager_evictions_total"
    assert value(samples, evictions, victim="mvoice", outcome="unloaded") == 1
    assert value(samples, evictions, victim="whisper", outcome="unloaded") == 1
    assert total(samples, evictions) == status["scheduler"]["evictions"]
    assert total(samples, "mgpumanager_unload_duration_seconds_count") == total(
        samples, evictions)
    assert value(samples, "mgpumanager_load_duration_seconds_count", consumer="mvoice") == 1
    assert total(samples, "mgpumanager_load_duration_seconds_count") == status["scheduler"][
        "loads"]

    assert value(samples, "mgpumanager_queue_depth") == 0
    # The card's gauges carry its number, card 0 on a one-card host.
    assert value(samples, "mgpumanager_jobs_running", card="0") == 0
    assert value(samples, "mgpumanager_card_yielded", card="0") == 0
    assert value(samples, "mgpumanager_gpu_guest_bytes", card="0") == 0
    for consumer in status["consumers"]:
        name = consumer["name"]
        up = value(samples, "mgpumanager_consumer_up", consumer=name)
        assert up == (1 if consumer["healthy"] else 0), name
        resident = value(samples, "mgpumanager_consumer_resident", consumer=name)
        assert resident == (1 if consumer["loaded"] else 0), name
        vram = value(samples, "mgpumanager_consumer_vram_bytes", consumer=name)
        assert vram == consumer["size_mib"] * MIB, "the size the budget uses"
    assert value(samples, "mgpumanager_consumer_resident", consumer="mvoice") == 1
    assert value(samples, "mgpumanager_consumer_up", consumer="ollama") == 1
    assert value(samples, "mgpumanager_gpu_memory_total_bytes", card="0") == (
        config.total_mib * MIB)
    used = value(samples, "mgpumanager_gpu_memory_used_bytes", card="0")
    free = value(samples, "mgpumanager_gpu_memory_free_bytes", card="0")
    assert used is not None and free is not None and used + free == config.total_mib * MIB
