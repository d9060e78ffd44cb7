"""
``/v1/status`` and ``/metrics`` of the real daemon on the simulated two-card
host (``config/demo-2cards.yaml`` under ``--simulate``): both cards with their
figures, each consumer on its cards with its memory measured on the card it
uses, and the card gauges under their ``card`` label agreeing with status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mgpumanager.web.metrics import MIB
from tests.daemon import REPO, Daemon, free_port
from tests.support import sleep


@pytest_twisted.async_yield_fixture(name="two_cards")
async def two_cards_fixture(tmp_path: Path) -> AsyncIterator[Daemon]:
    config: dict[str, Any] = yaml.safe_load((REPO / "config" / "demo-2cards.yaml").read_text())
    for consumer in config["consumers"].values():
        consumer["url"] = f"http://127.0.0.1:{free_port()}"
    daemon = Daemon(config, tmp_path, ("--simulate",))
    daemon.start()
    yield daemon
    daemon.stop()


async def status_of(daemon: Daemon) -> dict[str, Any]:
    document: dict[str, Any] = await (await treq.get(daemon.url + "/v1/status")).json()
    return document


async def post(daemon: Daemon, kind: str, body: bytes) -> None:
    answer = await treq.post(daemon.url + f"/v1/{kind}", data=body)
    assert answer.code == 200, (await answer.text(), daemon.log()[-2000:])
    await answer.content()


def consumer(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in status["consumers"] if c["name"] == name)
    return found


@pytest_twisted.ensureDeferred
async def test_both_cards_and_each_consumer_on_its_cards(two_cards: Daemon) -> None:
    await post(two_cards, "llm", b'{"model": "sim-llm:7b", "prompt": "hi", "stream": false}')
    await post(two_cards, "image", b'{"prompt": {"seed": 1}}')
    # ComfyUI loads its model as its prompt starts; wait until card 1 shows it.
    for _ in range(200):
        status = await status_of(two_cards)
        comfyui = consumer(status, "comfyui")
        if comfyui["gpu_resident_mib_by_card"].get("1", 0) >= comfyui["vram_budget_mib"] // 2:
            break
        await sleep(0.05)
    else:
        raise AssertionError(f"card 1 never showed ComfyUI: {status['gpus']}")

    zero, one = status["gpus"]
    assert [zero["index"], one["index"]] == [0, 1]
    for card in (zero, one):
        assert card["total_mib"] == 24576 and card["reserved_mib"] == 0
        assert card["err"] is None and card["name"] and card["uuid"]
        assert card["used_mib"] + card["free_mib"] == 24576
        assert (card["guests"], card["guest_mib"], card["yielded"]) == ([], 0, None)
    assert zero["uuid"] != one["uuid"]
    assert status["unmanaged_cards"] == 0
    assert {key: status["gpu"][key] for key in ("total_mib", "reserved_mib", "name")} == {
        key: zero[key] for key in ("total_mib", "reserved_mib", "name")}

    assert comfyui["gpus"] == [1]
    assert set(comfyui["gpu_resident_mib_by_card"]) == {"1"}, "nothing of it on card 0"
    assert one["used_mib"] >= comfyui["gpu_resident_mib_by_card"]["1"]
    ollama = consumer(status, "ollama")
    assert ollama["gpus"] == [0] and ollama["gpu_resident_mib_by_card"]["0"] > 0
    assert zero["used_mib"] >= ollama["gpu_resident_mib_by_card"]["0"]

    # The image may still be generating: every running job is shown on each
    # card it holds, and the earliest one is still ``running``.
    scheduler = status["scheduler"]
    jobs = scheduler["running_jobs"]
    assert scheduler["running"] == (jobs[0] if jobs else None)
    held = {card: job["id"] for job in jobs for card in job["cards"]}
    assert [zero["running"], one["running"]] == [held.get(0), held.get(1)]


@pytest_twisted.ensureDeferred
async def test_the_card_gauges_are_labelled_and_agree_with_status(two_cards: Daemon) -> None:
    await post(two_cards, "llm", b'{"model": "sim-llm:7b", "prompt": "hi", "stream": false}')
    text = await (await treq.get(two_cards.url + "/metrics")).text()
    status = await status_of(two_cards)
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for card in status["gpus"]:
        label = (("card", str(card["index"])),)
        assert found[("mgpumanager_gpu_memory_total_bytes", label)] == card["total_mib"] * MIB
        assert found[("mgpumanager_jobs_running", label)] == 0
        assert found[("mgpumanager_card_yielded", label)] == 0
        assert found[("mgpumanager_gpu_guest_bytes", label)] == 0
        used = found[("mgpumanager_gpu_memory_used_bytes", label)]
        free = found[("mgpumanager_gpu_memory_free_bytes", label)]
        assert used + free == card["total_mib"] * MIB
    assert found[("mgpumanager_gpu_memory_used_bytes", (("card", "0"),))] > 0, "the chat's model"
