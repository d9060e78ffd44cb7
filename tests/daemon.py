"""
Runs the real daemon, ``twistd -n mgpumanager``, as a child process on loopback,
for the end-to-end suites.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
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


#: Ports handed out for a program to listen on later come from a block of
#: their own for each pytest-xdist worker, below the kernel's ephemeral range
#: (32768 and up on Linux) where outgoing connections take theirs: a port let
#: go by one worker is never given to another before its program binds it.
PORTS_PER_WORKER = 2000
FIRST_PORT = 20000


def _ports_of_this_worker() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    number = int(worker[2:]) if worker[2:].isdigit() else 0
    first = FIRST_PORT + number % 6 * PORTS_PER_WORKER
    return itertools.cycle(range(first, first + PORTS_PER_WORKER))


_next_ports = _ports_of_this_worker()


def free_port() -> int:
    """A loopback port nothing listens on, for a program to listen on."""
    for _ in range(PORTS_PER_WORKER):
        port = next(_next_ports)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in this worker's block")


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
