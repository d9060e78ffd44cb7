"""
The simulated host with several cards: each server holds its model on each of its
cards, out-of-memory is counted on the card that refused, the NVML stand-in answers
per index and uuid (from the card objects or the state file), ``--cards`` and
``--place`` build such a host, ``--simulate`` builds it from ``gpus``, and
``config/demo-2cards.yaml`` parses and starts.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mgpumanager.app.demo import simulated_in_process
from mgpumanager.config.parsing import load_config, parse_config
from mgpumanager.simulate.__main__ import host_config, parse_args
from mgpumanager.simulate.card import CudaOutOfMemory
from mgpumanager.simulate.card_state import read_cards_state
from mgpumanager.simulate.cards import CardBank, CardSpan, card_uuid
from mgpumanager.simulate.host import HostConfig, SimulatedHost
from mgpumanager.simulate.nvml import SimulatedNvml
from mgpumanager.state.gpu import MIB, GpuSampler
from tests.daemon import REPO, Daemon, free_port
from tests.support import success_result_of

DEMO = REPO / "config" / "demo-2cards.yaml"


def test_a_server_on_two_cards_holds_its_model_on_each() -> None:
    bank = CardBank([8000, 8000])
    span = bank.memory_for([0, 1])
    assert isinstance(span, CardSpan)
    span.allocate("wide", 5000)
    assert [card.held_by("wide") for card in bank.cards] == [5000, 5000]
    assert span.held_by("wide") == 5000
    assert span.free_mib == 3000
    bank.cards[1].allocate("other", 2000)
    assert span.free_mib == 1000
    assert span.release("wide") == 5000
    assert [card.used_mib for card in bank.cards] == [0, 2000]


def test_out_of_memory_on_one_card_holds_nothing_anywhere_and_counts_there() -> None:
    bank = CardBank([8000, 8000])
    bank.cards[1].allocate("other", 6000)
    span = bank.memory_for([0, 1])
    span.allocate("wide", 1000)
    with pytest.raises(CudaOutOfMemory) as caught:
        span.allocate("wide", 3000)
    assert "GPU 1" in str(caught.value)
    assert [card.held_by("wide") for card in bank.cards] == [1000, 1000]
    assert [card.oom_count for card in bank.cards] == [0, 1]
    assert bank.oom_count == 1


def test_a_server_on_one_card_gets_that_card() -> None:
    bank = CardBank([8000, 8000])
    assert bank.memory_for([1]) is bank.cards[1]
    with pytest.raises(ValueError, match="no simulated card 2"):
        bank.memory_for([2])


@pytest.mark.parametrize("from_file", [False, True])
def test_nvml_answers_per_index_and_uuid(tmp_path: Path, from_file: bool) -> None:
    path = tmp_path / "cards.json"
    bank = CardBank([24576, 12288], state_path=str(path))
    bank.register("wide", 4242)
    bank.memory_for([0, 1]).allocate("wide", 3000)
    bank.cards[1].allocate("comfy", 9000)
    nvml = SimulatedNvml(str(path) if from_file else bank.cards)

    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2
    second = nvml.nvmlDeviceGetHandleByUUID(card_uuid(1))
    assert second == nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetUUID(second) == card_uuid(1)
    memory = nvml.nvmlDeviceGetMemoryInfo(second)
    assert (memory.total, memory.used) == (12288 * MIB, 12000 * MIB)
    first = nvml.nvmlDeviceGetHandleByIndex(0)
    processes = nvml.nvmlDeviceGetComputeRunningProcesses(first)
    assert [(p.pid, p.usedGpuMemory) for p in processes] == [(4242, 3000 * MIB)]
    pids = {p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(second)}
    assert 4242 in pids and len(pids) == 2
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetHandleByUUID("GPU-nothing")
    nvml.nvmlShutdown()
    assert [state.uuid for state in read_cards_state(str(path))] == [card_uuid(0), card_uuid(1)]


def test_the_sampler_reads_two_simulated_cards_by_uuid() -> None:
    bank = CardBank([24576, 24576])
    bank.cards[1].allocate("comfy", 9000)
    config = parse_config(
        {
            "gpus": [{"uuid": card_uuid(1)}, {"uuid": card_uuid(0)}],
            "consumers": {"comfy": {"url": "http://127.0.0.1:1", "health": {"path": "/"}}},
        }
    )
    sampler = GpuSampler(
        load_nvml=lambda: SimulatedNvml(bank.cards), run_blocking=maybeDeferred,
        clock=Clock(), interval=1, timeout=5, cards=config.cards,
    )
    samples = success_result_of(sampler.sample_cards())
    first, second = samples[0].reading, samples[1].reading
    assert first is not None and second is not None
    assert (first.uuid, first.used_mib, second.used_mib) == (card_uuid(1), 9000, 0)
    assert sampler.unmanaged_cards == 0


def test_one_card_stays_the_default_of_the_command_line(tmp_path: Path) -> None:
    config = host_config(parse_args(["--card-file", str(tmp_path / "c.json")]))
    assert config.card_sizes == (16384,)
    assert config.cards_of("comfyui") == (0,)


def test_cards_and_placement_from_the_command_line(tmp_path: Path) -> None:
    options = parse_args(
        ["--cards", "24576,24576", "--place", "ollama=0,1", "--card-file", str(tmp_path / "c")]
    )
    config = host_config(options)
    assert config.card_sizes == (24576, 24576)
    assert (config.cards_of("comfyui"), config.cards_of("ollama")) == ((1,), (0, 1))
    assert config.cards_of("mvoice") == (0,)
    with pytest.raises(SystemExit):
        parse_args(["--cards", "24576,lots"])
    with pytest.raises(SystemExit):
        host_config(parse_args(["--cards", "24576", "--place", "comfyui=1"]))


@pytest_twisted.async_yield_fixture(name="two_card_host")
async def two_card_host_fixture(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    config = HostConfig.fast(
        total_mib=24576, cards_mib=(24576, 24576), state_path=str(tmp_path / "cards.json"),
        audio_dir=str(tmp_path / "audio"),
    )
    host = SimulatedHost(config)
    await host.start()
    yield host
    await host.stop()


@pytest_twisted.ensureDeferred
async def test_the_servers_sit_on_their_cards(two_card_host: SimulatedHost) -> None:
    host = two_card_host
    await host.comfy.model.load()
    await host.ollama.runners.models[next(iter(host.ollama.runners.models))].load()
    card0, card1 = host.cards
    assert card1.held_by("comfyui") == 9000 and card0.held_by("comfyui") == 0
    assert card0.held_by("ollama") == 6000 and card1.held_by("ollama") == 0
    assert card0.used_mib == 6000 + 3000 + 1500
    states = read_cards_state(str(host.config.state_path))
    assert [state.used_mib for state in states] == [10500, 9000]

    daemon_config = parse_config(host.daemon_config())
    assert daemon_config.card_indexes == (0, 1)
    assert daemon_config.card(1).settings.total_mib == 24576
    assert daemon_config.consumers["comfyui"].cards == (1,)
    assert daemon_config.consumers["ollama"].cards == (0,)


@pytest_twisted.ensureDeferred
async def test_the_daemon_config_of_one_card_is_unchanged(tmp_path: Path) -> None:
    host = SimulatedHost(HostConfig.fast(audio_dir=str(tmp_path)))
    await host.start()
    try:
        document = host.daemon_config()
    finally:
        await host.stop()
    assert "gpus" not in document and document["gpu"]["total_mib"] == 16384
    assert all("gpus" not in consumer for consumer in document["consumers"].values())


def test_the_two_card_demo_parses() -> None:
    config = load_config(DEMO)
    assert config.card_indexes == (0, 1)
    assert [card.settings.total_mib for card in config.cards] == [24576, 24576]
    assert config.consumers["comfyui"].cards == (1,)
    assert config.consumers["ollama"].cards == (0,)
    assert config.consumers["comfyui"].vram_mib_on(1) == 9000


def test_simulate_builds_the_cards_from_gpus() -> None:
    stand_ins = simulated_in_process(load_config(DEMO), Clock())
    host: Any = stand_ins.services[0]._host  # type: ignore[attr-defined]
    assert host.config.card_sizes == (24576, 24576)
    assert host.comfy.model.card is host.cards[1]
    assert host.voice.model.card is host.cards[0]
    nvml = stand_ins.load_nvml()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2
    nvml.nvmlShutdown()


def test_simulate_on_one_card_is_the_host_it_always_was() -> None:
    config = load_config(REPO / "config" / "demo.yaml")
    host: Any = simulated_in_process(config, Clock()).services[0]._host  # type: ignore[attr-defined]
    assert host.config.card_sizes == (16384,)
    assert len(host.cards) == 1


def test_the_two_card_demo_starts_with_simulate(tmp_path: Path) -> None:
    config: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    for consumer in config["consumers"].values():
        consumer["url"] = f"http://127.0.0.1:{free_port()}"
    daemon = Daemon(config, tmp_path, ("--simulate",))
    daemon.start()
    try:
        with urllib.request.urlopen(daemon.url + "/v1/status", timeout=5) as answer:
            status = json.load(answer)
        assert {c["name"] for c in status["consumers"]} == set(config["consumers"])
        assert status["gpu"]["total_mib"] == 24576
        request = urllib.request.Request(
            daemon.url + "/v1/llm",
            data=json.dumps({"model": "sim-llm:7b", "prompt": "hi", "stream": False}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=20) as answer:
            assert answer.status == 200
    finally:
        assert daemon.stop() == 0, daemon.log()
