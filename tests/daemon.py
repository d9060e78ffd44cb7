"""
Runs the real daemon, ``twistd -n mgpumanager``, as a child process on loopback,
for the end-to-end suites.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parent.parent


def wait_until_answering(
    process: subprocess.Popen[bytes], url: str, log: Callable[[], str], timeout: float
) -> None:
    """Wait until ``url`` answers 200, failing with ``log()`` if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited early:\n{log()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} never answered:\n{log()}")


def terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def demo_config_on_free_ports(name: str = "demo.yaml") -> dict[str, Any]:
    """
    A demo configuration (config/demo.yaml by default) as it is, but with every
    simulated server moved to a free port, so that a test can run
    ``--simulate`` beside anything else on loopback.
    """
    config: dict[str, Any] = yaml.safe_load((REPO / "config" / name).read_text())
    for consumer in config["consumers"].values():
        consumer["url"] = f"http://127.0.0.1:{free_port()}"
    return config


class Daemon:
    """One ``twistd -n mgpumanager`` process and its configuration file."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        extra_args: tuple[str, ...] = (),
        twistd_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        config = dict(config, listen=f"127.0.0.1:{self.port}")
        self.config_path = workdir / "consumers.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "daemon.log"
        self.workdir = workdir
        self.extra_args = extra_args
        #: twistd's own options, before the plugin's name (``--logger``, say).
        self.twistd_args = twistd_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *self.twistd_args,
             "mgpumanager", "--config", str(self.config_path),
             *self.extra_args],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_until_answering(self.process, self.url + "/healthz", self.log, timeout)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return terminate(self.process, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM of the daemon, in KiB."""
        assert self.process is not None
        figures = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
        return figures
