"""
The simulated GPU host behaves like the real servers it stands for: over real loopback
sockets, a mixed workload sent directly runs the shared card out of memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pynvml
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import provider

from mgpumanager.config.parsing import parse_config
from mgpumanager.simulate import systemctl
from mgpumanager.simulate.card import CudaOutOfMemory, SimulatedCard
from mgpumanager.simulate.card_state import read_card_state
from mgpumanager.simulate.consumers import fake_wav
from mgpumanager.simulate.host import HostConfig, SimulatedHost
from mgpumanager.simulate.nvml import SimulatedNvml
from tests.support import sleep

reactor: Any = global_reactor
MIB = 1024 * 1024




async def eventually(check: Any, within: float = 2.0) -> None:
    """Wait until ``check()`` is true: the servers act on the reactor's time."""
    deadline = reactor.seconds() + within
    while not check():
        assert reactor.seconds() < deadline, "condition never became true"
        await sleep(0.005)


@pytest.fixture(autouse=True)
def no_logged_failures() -> Iterator[None]:
    """A traceback logged by a server is a bug even when the test's asserts pass."""
    failures: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield
    globalLogPublisher.removeObserver(observe)
    assert not failures, [e["log_failure"].getTraceback() for e in failures]


@pytest.fixture
def http() -> Iterator[HTTPClient]:
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield HTTPClient(Agent(reactor, pool=pool))
    pytest_twisted.blockon(pool.closeCachedConnections())


async def started(config: HostConfig) -> SimulatedHost:
    host = SimulatedHost(config, clock=reactor)
    await host.start(reactor)
    return host


@pytest_twisted.async_yield_fixture
async def host(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    config = HostConfig.fast(
        state_path=str(tmp_path / "card.json"), audio_dir=str(tmp_path / "audio")
    )
    simulated = await started(config)
    yield simulated
    await simulated.stop()


async def body_json(response: Any) -> Any:
    return json.loads(await response.content())


# -- the card -----------------------------------------------------------------------


def test_card_refuses_what_does_not_fit_like_pytorch() -> None:
    card = SimulatedCard(10000)
    card.allocate("a", 6000)
    with pytest.raises(CudaOutOfMemory) as caught:
        card.allocate("b", 5000)
    assert str(caught.value) == (
        "CUDA out of memory. Tried to allocate 5000 MiB "
        "(GPU 0; 10000 MiB total capacity; 4000 MiB free)"
    )
    assert (card.used_mib, card.free_mib, card.held_by("b"), card.oom_count) == (6000, 4000, 0, 1)
    card.allocate("b", 4000)
    assert card.free_mib == 0
    assert card.release("a") == 6000
    assert (card.used_mib, card.held_by("a"), card.peak_used_mib) == (4000, 0, 10000)


def test_card_pids_are_stable_and_distinct() -> None:
    card = SimulatedCard(1000)
    card.register("voice", 4101)
    with pytest.raises(ValueError):
        card.register("other", 4101)
    card.allocate("voice", 100)
    card.allocate("llm", 200)
    again = SimulatedCard(1000)
    assert card.pid_of("llm") == again.pid_of("llm") != 4101
    assert sorted(card.processes()) == sorted([(4101, 100), (card.pid_of("llm"), 200)])


def test_card_mirrors_every_change_to_its_state_file(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    card = SimulatedCard(8000, state_path=str(path))
    assert json.loads(path.read_text()) == {
        "name": "Simulated GPU",
        "total_mib": 8000,
        "used_mib": 0,
        "processes": [],
    }
    card.register("voice", 77)
    card.allocate("voice", 3000)
    document = json.loads(path.read_text())
    assert document["used_mib"] == 3000
    assert document["processes"] == [{"pid": 77, "owner": "voice", "used_mib": 3000}]
    card.release("voice")
    assert read_card_state(str(path)).used_mib == 0
    assert os.listdir(tmp_path) == ["card.json"], "no temporary files left behind"


# -- the NVML stand-in --------------------------------------------------------------


@pytest.mark.parametrize("from_file", [False, True])
def test_nvml_reports_the_card_in_bytes(tmp_path: Path, from_file: bool) -> None:
    path = tmp_path / "card.json"
    card = SimulatedCard(16384, state_path=str(path))
    card.register("voice", 4101)
    card.register("comfy", 4103)
    card.allocate("voice", 3000)
    card.allocate("comfy", 9000)
    nvml = SimulatedNvml(str(path) if from_file else card)

    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 1
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(nvml.nvmlDeviceGetName(handle), str)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert (memory.total, memory.used, memory.free) == (
        16384 * MIB,
        12000 * MIB,
        4384 * MIB,
    )
    processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert sorted((p.pid, p.usedGpuMemory) for p in processes) == [
        (4101, 3000 * MIB),
        (4103, 9000 * MIB),
    ]

    card.release("comfy")
    assert nvml.nvmlDeviceGetMemoryInfo(handle).used == 3000 * MIB
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetHandleByIndex(1)
    nvml.nvmlShutdown()
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetMemoryInfo(handle)


def test_nvml_without_a_card_file_fails_like_nvml(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    nvml = SimulatedNvml(str(path))
    with pytest.raises(pynvml.NVMLError) as caught:
        nvml.nvmlInit()
    assert isinstance(caught.value, nvml.NVMLError)
    assert "Driver Not Loaded" in str(caught.value)

    SimulatedCard(1000, state_path=str(path))
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    path.write_text("{not json")
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetMemoryInfo(handle)
    path.unlink()
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetComputeRunningProcesses(handle)


# -- the servers over loopback ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_host_boots_with_the_preloaded_models(host: SimulatedHost, http: HTTPClient) -> None:
    assert set(host.urls()) == {"mvoice", "ollama", "comfyui", "whisper", "speech"}
    assert all(port > 0 for port in host.ports.values())
    assert host.card.used_mib == 3000 + 1500
    state = read_card_state(str(host.config.state_path))
    assert {p.owner: p.pid for p in state.processes} == {"mvoice": 4101, "whisper": 4104}

    voice = await body_json(await http.get(host.urls()["mvoice"] + "/api/health"))
    assert voice == {"status": "ok", "loaded": True, "gpu_resident_mib": 3000}
    whisper = await body_json(await http.get(host.urls()["whisper"] + "/health"))
    assert whisper == {"status": "ok", "loaded": True, "gpu_resident_mib": 1500}
    version = await body_json(await http.get(host.urls()["ollama"] + "/api/version"))
    assert version == {"version": "0.0.0-sim"}
    stats = await body_json(await http.get(host.urls()["comfyui"] + "/system_stats"))
    assert stats["loaded"] is False
    assert stats["devices"][0]["vram_total"] == 16384 * MIB
    assert stats["devices"][0]["vram_free"] == (16384 - 4500) * MIB


@pytest_twisted.ensureDeferred
async def test_voice_loads_only_when_told_and_unload_frees_later(
    tmp_path: Path, http: HTTPClient
) -> None:
    config = HostConfig.fast(audio_dir=str(tmp_path / "audio"))
    config = attrs.evolve(
        config, voice=attrs.evolve(config.voice, preload=False, unload_seconds=0.05)
    )
    host = await started(config)
    try:
        url = host.urls()["mvoice"]
        refused = await http.post(url + "/api/synthesize", json={"text": "hi"})
        assert refused.code == 503
        assert await body_json(refused) == {"error": "model not loaded"}

        loaded = await http.post(url + "/api/admin/load")
        assert loaded.code == 200
        assert host.card.held_by("mvoice") == 3000

        spoken = await http.post(url + "/api/synthesize", json={"text": "hello"})
        assert spoken.code == 200
        assert spoken.headers.getRawHeaders("content-type") == ["audio/wav"]
        audio = await spoken.content()
        assert audio == fake_wav("hello") and audio[:4] == b"RIFF"
        [name] = spoken.headers.getRawHeaders("x-audio-file")
        served = await http.get(f"{url}/api/audio/{name}")
        assert served.code == 200
        assert await served.content() == audio
        missing = await http.get(url + "/api/audio/nope.wav")
        assert missing.code == 404
        assert "error" in await body_json(missing)

        transcript = await http.post(url + "/api/transcribe", data=b"x" * 1000)
        assert await body_json(transcript) == {"text": "simulated transcript of 1000 bytes"}

        unloaded = await http.post(url + "/api/admin/unload")
        assert unloaded.code == 200
        # Like a real process, the memory lingers briefly after the unload answer.
        assert host.card.held_by("mvoice") == 3000
        health = await body_json(await http.get(url + "/api/health"))
        assert health["loaded"] is False
        await eventually(lambda: host.card.held_by("mvoice") == 0)
        health = await body_json(await http.get(url + "/api/health"))
        assert health == {"status": "ok", "loaded": False, "gpu_resident_mib": 0}
    finally:
        await host.stop()


@pytest_twisted.ensureDeferred
async def test_comfy_loads_on_the_first_prompt_and_frees_on_request(
    host: SimulatedHost, http: HTTPClient
) -> None:
    url = host.urls()["comfyui"]
    assert host.card.held_by("comfyui") == 0
    first = await http.post(url + "/prompt", json={"prompt": {}})
    assert first.code == 200
    assert "prompt_id" in await body_json(first)
    # ComfyUI answers at once and loads its model as the prompt runs.
    await eventually(lambda: host.card.held_by("comfyui") == 9000)
    assert host.comfy.model.generation == 1
    second = await http.post(url + "/prompt", json={"prompt": {}})
    assert second.code == 200
    await second.content()
    await eventually(lambda: host.comfy.queue.remaining == 0)
    assert host.comfy.model.generation == 1, "the second prompt reuses the loaded model"

    freed = await http.post(url + "/api/free", data=b'{"unload_models":true,"free_memory":true}')
    assert freed.code == 200
    await freed.content()
    await eventually(lambda: host.card.held_by("comfyui") == 0)
    assert (await body_json(await http.get(url + "/system_stats")))["loaded"] is False


@pytest_twisted.ensureDeferred
async def test_ollama_streams_lines_as_they_are_made(
    host: SimulatedHost, http: HTTPClient
) -> None:
    arrivals: list[tuple[float, bytes]] = []

    def collect(data: bytes) -> None:
        arrivals.append((reactor.seconds(), data))

    response = await http.post(
        host.urls()["ollama"] + "/api/generate",
        json={"prompt": "hi", "num_lines": 5, "interval": 0.03},
        unbuffered=True,
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
    await treq.collect(response, collect)

    lines = [json.loads(line) for line in b"".join(d for _, d in arrivals).splitlines()]
    assert [line.get("response") for line in lines[:-1]] == [f"tok{i}" for i in range(5)]
    assert all(line["done"] is False for line in lines[:-1])
    assert lines[-1]["done"] is True
    times = [t for t, _ in arrivals]
    assert len(arrivals) >= 4, "the lines arrived separately"
    assert times == sorted(times)
    assert times[-1] - times[0] >= 0.03 * 3
    assert host.card.held_by("ollama") == 6000, "ollama loaded itself on demand"


@pytest_twisted.ensureDeferred
async def test_ollama_unloads_itself_after_keep_alive(tmp_path: Path, http: HTTPClient) -> None:
    host = await started(HostConfig.fast(keep_alive_seconds=0.05))
    try:
        url = host.urls()["ollama"] + "/api/generate"
        answer = await http.post(url, json={"prompt": "hi", "num_lines": 2, "stream": False})
        assert (await body_json(answer))["response"] == "tok0tok1"
        assert host.ollama.model.loaded
        await eventually(lambda: host.card.held_by("ollama") == 0)
    finally:
        await host.stop()


@pytest_twisted.ensureDeferred
async def test_servers_record_what_they_received(host: SimulatedHost, http: HTTPClient) -> None:
    body = os.urandom(200_000)  # over twisted.web's in-memory limit: a temporary file
    response = await http.post(
        host.urls()["whisper"] + "/inference?lang=en&x=1",
        data=body,
        headers=Headers({"Content-Type": ["audio/wav"], "X-Trace": ["a", "b"]}),
    )
    assert await body_json(response) == {"text": "simulated transcript of 200000 bytes"}
    [seen] = host.whisper.requests_to("/inference")
    assert (seen.method, seen.path, seen.query) == ("POST", "/inference", "lang=en&x=1")
    assert seen.body_size == len(body)
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header("content-type") == "audio/wav"
    assert seen.headers["x-trace"] == ("a", "b")
    assert (host.whisper.active, host.whisper.max_active) == (0, 1)


@pytest_twisted.ensureDeferred
async def test_a_client_going_away_mid_job_is_counted(host: SimulatedHost) -> None:
    """The daemon cancels upstream requests when its client leaves; this sees it."""

    class HangUpAfterFirstLine(Protocol):
        def connectionMade(self) -> None:
            body = b'{"prompt": "hi", "num_lines": 50, "interval": 0.02}'
            self.transport.write(  # type: ignore[union-attr]
                b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )

        def dataReceived(self, data: bytes) -> None:
            if b"tok0" in data:
                self.transport.loseConnection()  # type: ignore[union-attr]

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", host.ports["ollama"])
    await connectProtocol(endpoint, HangUpAfterFirstLine())
    await eventually(lambda: host.ollama.disconnects == 1)
    await eventually(lambda: host.ollama.active == 0)
    assert host.gpu_jobs.active == 0


@pytest_twisted.ensureDeferred
async def test_a_mixed_workload_sent_directly_runs_out_of_memory(
    host: SimulatedHost, http: HTTPClient
) -> None:
    urls = host.urls()
    # Ollama keeps its model after a chat; mvoice and whisper are loaded at start.
    code, _ = await _call(http, urls["ollama"] + "/api/generate", {"prompt": "hi", "num_lines": 3})
    assert code == 200
    answers = await gatherResults(
        [
            Deferred.fromCoroutine(_call(http, urls["comfyui"] + "/prompt", {"prompt": {}})),
            Deferred.fromCoroutine(_call(http, urls["mvoice"] + "/api/synthesize", {"text": "x"})),
        ]
    )
    failed = [(code, text) for code, text in answers if code == 500]
    assert all("CUDA out of memory" in text for _, text in failed)
    # ComfyUI answers at once: its out-of-memory shows in its history, later.
    await eventually(lambda: host.comfy.queue.remaining == 0)
    assert host.card.oom_count >= 1
    assert host.comfy.oom_errors + host.ollama.oom_errors >= 1
    assert host.card.used_mib <= host.card.total_mib
    assert host.gpu_jobs.max_active >= 2, "nothing serialized these jobs"


async def _call(http: HTTPClient, url: str, body: dict[str, Any]) -> tuple[int, str]:
    response = await http.post(url, json=body)
    return response.code, (await response.content()).decode("utf-8", "replace")


@pytest_twisted.ensureDeferred
async def test_one_job_at_a_time_fits(host: SimulatedHost, http: HTTPClient) -> None:
    """What the daemon does by hand here: unload mvoice and whisper before ComfyUI."""
    urls = host.urls()
    await (await http.post(urls["mvoice"] + "/api/admin/unload")).content()
    await host.whisper.stop()
    await eventually(lambda: host.card.used_mib == 0)
    jobs: list[tuple[str, dict[str, Any]]] = [
        (urls["comfyui"] + "/prompt", {"prompt": {}}),
        (urls["ollama"] + "/api/generate", {"prompt": "hi", "num_lines": 2}),
    ]
    for url, body in jobs:
        code, _ = await _call(http, url, body)
        assert code == 200
        # One job at a time: a prompt's job lasts until ComfyUI has run it.
        await eventually(lambda: host.comfy.queue.remaining == 0)
    assert host.card.used_mib == 15000
    assert host.card.oom_count == 0
    assert host.gpu_jobs.max_active == 1


@pytest_twisted.ensureDeferred
async def test_whisper_is_driven_like_a_systemd_unit(
    host: SimulatedHost, http: HTTPClient
) -> None:
    url = host.urls()["whisper"]
    unit = host.whisper.unit

    def ctl(*args: str) -> Deferred[int]:
        # A subprocess in real life; a thread here, since it blocks on our own servers.
        return deferToThread(systemctl.main, ["--url", url, *args])

    assert await ctl("is-active", unit) == 0
    assert await ctl("stop", unit) == 0
    assert host.card.held_by("whisper") == 0, "stop returns once the memory is back"
    assert await ctl("is-active", unit) == systemctl.EXIT_INACTIVE
    probe = await http.get(url + "/health")
    assert probe.code == 503
    await probe.content()
    refused = await http.post(url + "/inference", data=b"x")
    assert refused.code == 503
    await refused.content()

    assert await ctl("start", unit) == 0
    assert host.card.held_by("whisper") == 1500
    assert (await http.get(url + "/health")).code == 200
    assert await ctl("stop", "other.service") == systemctl.EXIT_NO_UNIT


@pytest_twisted.ensureDeferred
async def test_daemon_config_describes_the_host(host: SimulatedHost) -> None:
    config = parse_config(host.daemon_config(), "<simulated>")
    assert {name: c.url for name, c in config.consumers.items()} == host.urls()
    assert config.consumers["ollama"].adapter == "ollama"
    assert config.consumers["comfyui"].adapter == "comfyui"
    assert config.consumers["whisper"].systemd_unit == host.whisper.unit


def test_a_failed_load_leaves_nothing_behind() -> None:
    """Loading on a full card fails every waiter and can be retried once there is room."""
    from twisted.internet.task import Clock

    from mgpumanager.simulate.model import GpuModel

    clock = Clock()
    card = SimulatedCard(1000)
    card.allocate("other", 900)
    model = GpuModel(card, "m", 500, clock, load_seconds=1.0, unload_seconds=1.0)
    first, second = model.load(), model.load()
    clock.advance(1.0)
    errors: list[Failure] = []
    first.addErrback(errors.append)
    second.addErrback(errors.append)
    assert [e.check(CudaOutOfMemory) for e in errors] == [CudaOutOfMemory, CudaOutOfMemory]
    assert (model.loaded, model.oom_count, card.held_by("m")) == (False, 1, 0)

    card.release("other")
    done = model.load()
    clock.advance(1.0)
    assert done.called and model.loaded and card.held_by("m") == 500
    released = model.unload()
    assert card.held_by("m") == 500 and not released.called
    clock.advance(1.0)
    assert released.called and card.held_by("m") == 0


@pytest_twisted.ensureDeferred
async def test_stopping_mid_job_frees_the_card_quietly(http: HTTPClient) -> None:
    config = HostConfig.fast(comfy_answers_when_done=True)  # a request open mid-job
    config = attrs.evolve(config, comfy=attrs.evolve(config.comfy, load_seconds=0.2))
    host = await started(config)
    url = host.urls()["comfyui"] + "/prompt"
    pending = http.post(url, json={"prompt": {}})
    await eventually(lambda: host.comfy.model.loading)
    await host.stop()
    with pytest.raises(ResponseNeverReceived):
        await pending
    assert host.card.used_mib == 0
    assert host.comfy.active == 0
