"""
``mgpumanager check`` says what the daemon will do, line for line: each
consumer's ``serves``, ``health``, ``load by`` and ``unload by`` are compared
with the daemon's own doing, on the example files and on one configuration
using each adapter, a unit, explicit keys over an adapter's defaults, a
consumer that is never evicted and a route to a consumer without the path.

The daemon's doing: the resolved configuration ``twistd`` runs on (the tap's
options), the main port's route table, the dry run behind ``/v1/plan``, and
the adapter's unload driven as the lifecycle drives it, its calls recorded.
Last, the real daemon in front of the simulated host: its ``/v1/plan``
agrees with ``check`` about what it would load and whom it may evict.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mgpumanager.app.cli import main
from mgpumanager.app.tap import Options
from mgpumanager.common.answers import Answer
from mgpumanager.config.document import ENDPOINT_KINDS, Config
from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.scheduling.eviction import dry_run_plan, rank_candidates
from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.registry import Registry
from mgpumanager.web.api import main_port_routes
from tests.daemon import Daemon, free_port
from tests.e2e.test_e2e_eviction import body_for, profile, started_host, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
NO_NVML = GpuSample(time=1.0, err="NVML Shared Library Not Found")

#: One consumer of each sort the daemon treats differently.
EACH_ADAPTER: dict[str, Any] = {
    "routing": {"tts": "plain", "stt": "whisper", "llm": "ollama", "image": "comfy"},
    "audio_proxy": "voice",
    "openai": {"chat": "ollama", "models": {"tiny": "voice"}},
    "lifecycle": {"systemctl": ["/bin/true"]},
    "consumers": {
        "voice": {
            "url": "http://127.0.0.1:9001", "health": {"path": "/health"},
            "paths": {"tts": {"path": "/tts"}}, "vram_resident_mib": 2000,
            "load": {"path": "/admin/load"}, "unload": {"method": "DELETE", "path": "/model"},
            "listen": f"127.0.0.1:{free_port()}",
        },
        "whisper": {
            "url": "http://127.0.0.1:9002", "health": {"path": "/health"},
            "paths": {"stt": {"path": "/inference"}}, "vram_resident_mib": 1500,
            "systemd_unit": "whisper-server.service",
        },
        "ollama": {"url": "http://127.0.0.1:9003", "adapter": "ollama"},
        "comfy": {
            "url": "http://127.0.0.1:9004", "adapter": "comfyui", "vram_resident_mib": 9000,
            "unload": {"path": "/api/free"},  # the file wins over the adapter's /free
        },
        "plain": {
            "url": "http://127.0.0.1:9005", "health": {"path": "/health"},
            "paths": {"stt": {"path": "/stt"}}, "vram_resident_mib": 500,
        },
        "managed": {
            "url": "http://127.0.0.1:9006", "health": {"path": "/health"}, "paths": {},
            "vram_managed": True, "unload": {"path": "/unload"},
        },
    },
}


def check(path: Path) -> dict[str, dict[str, str]]:
    """Run ``check`` and read its blocks: each consumer's labelled lines, and its head."""
    out = io.StringIO()
    assert main(["check", str(path)], out) == 0
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in out.getvalue().split("\n\n", 1)[1].splitlines():
        if not line.startswith("  "):
            name, url, adapter = line.split("  ", 2)
            current = blocks[name] = {"url": url, "adapter": adapter}
        else:
            label, value = line.strip().split("  ", 1)
            current[label] = value.strip()
    return blocks


def daemon_config(path: Path) -> Config:
    """The configuration ``twistd -n mgpumanager --config path`` runs on."""
    options = Options()
    options.parseOptions(["--config", str(path)])
    config: Config = options["loaded_config"]
    return config


class RecordingControl:
    """A consumer that is idle, holds one Ollama model until told ``keep_alive: 0``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.models = ["llama3"]

    async def get_json(
        self, consumer: Any, method: str, path: str, timeout: float, cap: int = 0,
        body: Any = None,
    ) -> tuple[int, Any]:
        self.calls.append((method, path, body))
        if path == "/api/ps":
            return 200, {"models": [{"name": m, "size": 1, "size_vram": 2**20} for m in
                                    self.models]}
        if path == "/queue":
            return 200, {"queue_running": [], "queue_pending": []}
        if isinstance(body, dict) and body.get("keep_alive") == 0:
            self.models.clear()
        return 200, {}

    async def call_route(self, consumer: Any, route: Any, timeout: float) -> Answer:
        self.calls.append((route.method, route.path, None))
        return Answer(200, b"{}")

    async def systemctl(self, action: str, unit: str, timeout: float) -> None:
        self.calls.append(("systemctl", f"{action} {unit}", None))


def unload_calls(config: Config, name: str) -> list[tuple[str, str, Any]]:
    """What the adapter sends to take ``name`` off the card, as the lifecycle calls it."""
    state = Registry(config)[name]
    control = RecordingControl()
    done = Deferred.fromCoroutine(
        adapter_named(state.config.adapter).unload(control, state, Clock(), 5.0)  # type: ignore[arg-type]
    )
    SynchronousTestCase().successResultOf(done)
    return [call for call in control.calls if call[0] != "GET"]


def eviction_reason(config: Config, name: str) -> str:
    """Why the eviction planner (the one plan step the scheduler takes) would or would not
    pick ``name`` as a victim, everything else resident."""
    registry = Registry(config)
    for state in registry:
        state.mark_loaded(True, 0.0)
    target = next(n for n in config.consumers if n != name and not config.may_coexist(n, name))
    registry[target].mark_loaded(False, 0.0)
    candidates = rank_candidates(config, target, list(registry))
    return {c.name: c.reason for c in candidates}[name]


def load_by(config: Config, name: str) -> str | None:
    """What ``/v1/plan`` says a job for an unloaded ``name`` would load it by."""
    registry = Registry(config)
    registry[name].mark_loaded(False, 0.0)
    return dry_run_plan(config, registry, name, NO_NVML).load_by


def assert_check_tells_what_the_daemon_does(path: Path) -> None:
    config = daemon_config(path)
    told = check(path)
    assert set(told) == set(config.consumers)
    table = main_port_routes(config)
    for name, consumer in config.consumers.items():
        lines = told[name]
        assert lines["url"] == consumer.url
        assert lines["adapter"] == f"(adapter {consumer.adapter})"
        assert consumer.health is not None
        assert lines["health"] == f"{consumer.health.method} {consumer.health.path}"
        serves = lines["serves"].split("; ")
        for kind in ENDPOINT_KINDS:
            reached = list(table.lookup(b"POST", f"/v1/{kind}".encode()).policy.limit(
                config, {"kind": kind}))
            route = consumer.paths.get(kind)
            if reached == [consumer]:
                assert route is not None and f"{kind} {route.method} {route.path}" in serves
            elif config.routing.get(kind) == name:
                assert f"{kind}: refused, no paths.{kind}" in serves
            else:
                assert not any(s.startswith(f"{kind} ") for s in serves), (name, kind)
        assert ("audio GET " + config.audio_path_prefix + "<name>" in serves) == (
            config.audio_proxy == name)
        assert lines["load by"] == load_by(config, name)
        reason = eviction_reason(config, name)
        if reason == "manages its own VRAM":
            assert lines["unload by"].startswith("never: it manages its own VRAM")
        elif reason == "no unload route or systemd unit":
            assert lines["unload by"] == "never: no unload route or systemd unit"
        else:
            assert reason == "eligible", (name, reason)
            first, *_ = unload_calls(config, name)
            said = lines["unload by"]
            if first[0] == "systemctl":
                assert said == f"systemctl {first[1]}"
            else:
                assert said.startswith(f"{first[0]} {first[1]}"), (name, said, first)
            if isinstance(first[2], dict) and "keep_alive" in first[2]:
                assert f"keep_alive {first[2]['keep_alive']}" in said


@pytest.mark.parametrize("example", ["consumers.yaml", "demo.yaml"])
def test_check_on_the_examples_says_what_the_daemon_does(example: str) -> None:
    assert_check_tells_what_the_daemon_does(REPO / "config" / example)


def test_check_on_each_adapter_a_unit_and_explicit_keys(tmp_path: Path) -> None:
    path = tmp_path / "each.yaml"
    path.write_text(yaml.safe_dump(EACH_ADAPTER))
    assert_check_tells_what_the_daemon_does(path)
    told = check(path)
    # The cases spelled out, so that a regression reads plainly.
    assert told["comfy"]["unload by"] == "POST /api/free, once its queue is empty"
    assert told["ollama"]["unload by"].startswith("POST /api/generate keep_alive 0")
    assert told["whisper"]["load by"] == "systemctl start whisper-server.service"
    assert told["whisper"]["unload by"] == "systemctl stop whisper-server.service"
    assert told["voice"]["unload by"] == "DELETE /model"
    assert told["voice"]["serves"] == "models tiny; audio GET /api/audio/<name>"
    assert told["voice"]["own port"].startswith(EACH_ADAPTER["consumers"]["voice"]["listen"])
    assert told["ollama"]["serves"] == "llm POST /api/generate; openai chat"
    assert told["plain"]["serves"] == "tts: refused, no paths.tts"
    assert told["plain"]["unload by"] == "never: no unload route or systemd unit"
    assert told["managed"]["serves"] == "no routed kind (only /upstream/managed/)"


def test_check_on_consumers_yaml_no_longer_says_comfyui_and_ollama_stay() -> None:
    told = check(REPO / "config" / "consumers.yaml")
    assert told["comfyui"]["unload by"] == "POST /free, once its queue is empty"
    assert "keep_alive 0" in told["ollama"]["unload by"]
    assert told["ollama"]["health"] == "GET /api/version"


@pytest_twisted.ensureDeferred
async def test_the_running_daemon_plans_as_check_says(tmp_path: Path) -> None:
    config = profile(tmp_path)
    host = await started_host(config)
    daemon = Daemon(host.daemon_config(), tmp_path, ("--simulated-card", str(config.state_path)))
    try:
        daemon.start()
        await wait_until_healthy(daemon)
        told = check(daemon.config_path)
        # An LLM job leaves Ollama's model on the card: ComfyUI must make room.
        response = await treq.post(daemon.url + "/v1/llm", data=body_for("llm"))
        assert response.code == 200
        await response.content()
        for kind in ENDPOINT_KINDS:
            plan = await (await treq.get(f"{daemon.url}/v1/plan/{kind}")).json()
            target = told[plan["target"]]
            assert any(s.startswith(f"{kind} ") for s in target["serves"].split("; "))
            if plan["would_load"]:
                assert plan["load_by"] == target["load by"]
            for victim in plan["would_evict"]:
                assert not told[victim]["unload by"].startswith("never"), victim
            for step in plan["steps"]:
                for candidate in step["candidates"]:
                    never = told[candidate["name"]]["unload by"].startswith("never")
                    assert never == (candidate["reason"] in (
                        "manages its own VRAM", "no unload route or systemd unit"))
        plan = await (await treq.get(daemon.url + "/v1/plan/image")).json()
        assert plan["would_load"] and plan["would_evict"]
    finally:
        daemon.stop()
        await host.stop()


def test_the_readme_shows_what_check_prints_today(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the example names the file as given, relative to the checkout
    out = io.StringIO()
    assert main(["check", "config/consumers.yaml"], out) == 0
    readme = (REPO / "README.md").read_text()
    assert f"$ mgpumanager check config/consumers.yaml\n{out.getvalue()}```" in readme
