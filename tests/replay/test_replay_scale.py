"""
The time scale of a replay: the simulated servers' durations and the daemon's
timers alike divided by it, polling never below the floor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mgpumanager.config.parsing import parse_config
from mgpumanager.replay.client import POLL_FLOOR_SECONDS
from mgpumanager.replay.run import Settings, daemon_config
from mgpumanager.replay.study_host import CARD_MIB, MODELS, StudyHost
from mgpumanager.simulate.host import HostConfig


def test_a_scaled_host_divides_every_duration_and_keeps_the_sizes() -> None:
    base = HostConfig()
    scaled = base.scaled(20)
    assert scaled.comfy.load_seconds == base.comfy.load_seconds / 20
    assert scaled.voice.unload_seconds == base.voice.unload_seconds / 20
    assert scaled.whisper.work_seconds == base.whisper.work_seconds / 20
    assert scaled.keep_alive_seconds == base.keep_alive_seconds / 20
    assert scaled.comfy.model_mib == base.comfy.model_mib
    with pytest.raises(ValueError):
        base.scaled(0)


def test_the_study_servers_load_in_scaled_time() -> None:
    host = StudyHost(CARD_MIB, 20, state_path=None, clock=Clock())  # type: ignore[arg-type]
    image = next(server for server in host.servers if "image" in server.study.kinds)
    assert image.model.load_seconds == pytest.approx(15 / 20)


def test_the_daemon_config_is_valid_scaled_and_floors_polling(tmp_path: Path) -> None:
    host = StudyHost(CARD_MIB, 20, state_path=str(tmp_path / "card.json"), clock=Clock())
    host.ports = {model.name: 9000 + n for n, model in enumerate(MODELS)}
    document = daemon_config(host, Settings("fifo", scale=20), trace_seconds=7200)
    config = parse_config(document)
    assert config.scheduling.policy == "fifo"
    assert config.scheduling.batch_guard_seconds == pytest.approx(300 / 20)
    assert config.scheduling.swap_bound_seconds == pytest.approx(30 / 20)
    assert config.gpu.poll_interval_seconds == pytest.approx(2.0 / 20)
    assert config.lifecycle.verify_interval_seconds == POLL_FLOOR_SECONDS
    # FIFO's waits run past the default: nothing times out inside the trace.
    assert config.queue.max_wait_seconds * 20 > 7200
    assert config.route_for("image")[0].vram_resident_mib == 13312  # type: ignore[index]
