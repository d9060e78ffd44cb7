"""
The daemon as an operator meets it: twistd options, a bad configuration, the
built service, the packaged plugin, and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock

from mgpumanager.app import service, tap
from mgpumanager.config.parsing import load_config
from mgpumanager.consumers.adapters import load_resolved_config
from tests.daemon import REPO, TWISTD, Daemon, free_port
from tests.support import sleep
from tests.upstream import ScriptedUpstream, Tracker, listen

EXAMPLE = REPO / "config" / "consumers.yaml"




def test_help_documents_every_option() -> None:
    result = subprocess.run(
        [TWISTD, "mgpumanager", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--config" in result.stdout
    assert "--listen" in result.stdout


def test_twistd_lists_the_plugin() -> None:
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert "mgpumanager" in result.stdout


def test_bad_config_exits_with_one_line_naming_file_and_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    text = EXAMPLE.read_text().replace("vram_resident_mib: 13000", "vram_resident_mb: 13000")
    broken.write_text(text)
    port = free_port()
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mgpumanager", "--config", str(broken),
         "--listen", f"tcp:{port}:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"mgpumanager: {broken}: consumers.comfyui.vram_resident_mb: "
        "unknown key; did you mean 'vram_resident_mib'?"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tap.Options().parseOptions(["--config", str(tmp_path / "absent.yaml")])
    assert exit_info.value.code == 2


def test_options_load_the_config_and_take_a_listen_override() -> None:
    options = tap.Options()
    options.parseOptions(["--config", str(EXAMPLE), "--listen", "tcp:0:interface=127.0.0.1"])
    assert options["loaded_config"] == load_resolved_config(str(EXAMPLE))
    assert options["listen"] == "tcp:0:interface=127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_built_service_serves_and_stops() -> None:
    port = free_port()
    daemon = service.build(load_config(EXAMPLE), f"tcp:{port}:interface=127.0.0.1", reactor)
    daemon.startService()
    try:
        response = await treq.get(f"http://127.0.0.1:{port}/healthz")
        assert await response.json() == {"status": "ok"}
    finally:
        await daemon.stopService()
    with pytest.raises(ConnectionRefusedError):
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_wheel_contains_the_plugin(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mgpumanager_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert "mgpumanager/app/tap.py" in names


@pytest_twisted.ensureDeferred
async def test_sigterm_finishes_running_jobs_and_refuses_queued_ones(tmp_path: Path) -> None:
    upstream = ScriptedUpstream("voice", Tracker())
    port = listen(upstream)
    own_port = free_port()
    config: dict[str, Any] = {
        "shutdown_grace_seconds": 10,
        "probes": {"interval_seconds": 0.5, "timeout_seconds": 3},
        "routing": {"tts": "voice"},
        "consumers": {
            "voice": {
                "url": f"http://127.0.0.1:{port.getHost().port}",
                "health": {"path": "/health"},
                "paths": {"tts": {"path": "/api/tts"}},
                "listen": f"127.0.0.1:{own_port}",
            }
        },
    }
    daemon = Daemon(config, tmp_path)
    daemon.start()
    try:
        running = treq.post(daemon.url + "/v1/tts?ms=1500", data=b"long job")
        await sleep(0.3)
        queued = [treq.post(daemon.url + f"/v1/tts?n={i}", data=b"q") for i in range(3)]
        await sleep(0.3)
        assert daemon.process is not None
        assert await _accepts(own_port), "the consumer's own port is open while running"
        os.kill(daemon.process.pid, signal.SIGTERM)
        await sleep(0.3)
        # Every port stops accepting at once, while the running job finishes.
        assert daemon.process.poll() is None, "still running the long job"
        assert not await _accepts(daemon.port)
        assert not await _accepts(own_port)
        answers = await gatherResults([running, *queued])
        bodies = await gatherResults([answer.content() for answer in answers])
        assert answers[0].code == 200
        assert json.loads(bodies[0])["body_length"] == len(b"long job")
        for answer, body in zip(answers[1:], bodies[1:], strict=True):
            assert answer.code == 503
            envelope = json.loads(body)
            assert envelope["error"] == "shutting_down"
            assert envelope["retryable"] is True
        deadline = time.monotonic() + 10
        while daemon.process.poll() is None:
            assert time.monotonic() < deadline, "daemon did not exit after its jobs"
            await sleep(0.05)
        assert daemon.process.returncode == 0, daemon.log()
        assert [seen.query for seen in upstream.seen if seen.path == "/api/tts"] == ["ms=1500"]
    finally:
        daemon.stop()
        await port.stopListening()


async def _accepts(port: int) -> bool:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    try:
        connection = await connectProtocol(endpoint, Protocol())
    except ConnectError:
        return False
    connection.transport.loseConnection()
    return True


def test_a_non_loopback_listen_address_is_warned_about() -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        exposed = attrs_evolve_listen(load_config(EXAMPLE), "0.0.0.0", 8770)
        service.build(exposed, None, reactor)
        quiet = load_config(EXAMPLE)
        service.build(quiet, None, reactor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if "not loopback only" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert "interface=0.0.0.0" in warnings[0]["listen"]


def attrs_evolve_listen(config: Any, host: str, port: int) -> Any:
    import attrs

    from mgpumanager.config.document import Listen

    return attrs.evolve(config, listen=Listen(host=host, port=port))


class ThreadlessReactor(MemoryReactorClock):
    """A fake reactor that keeps what worker threads hand back, without running it."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[Any] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.from_threads.append(f)


def test_make_service_runs_on_the_reactor_it_is_given() -> None:
    options = tap.Options()
    options.parseOptions(["--config", str(EXAMPLE)])
    fake = ThreadlessReactor()

    daemon = tap.makeService(options, reactor=fake)
    daemon.startService()
    try:
        # The facade listens on the fake reactor, at the file's address.
        assert [(port, interface) for port, _, _, interface in fake.tcpServers] == [
            (8770, "127.0.0.1")
        ]
    finally:
        daemon.stopService()
