"""
The soak's other processes: the simulated host (``python -m
mgpumanager.simulate``), which the soak kills with SIGKILL and starts again on
the same ports, and the CPU hogs that keep both cores busy for the whole run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

SERVERS = ("mvoice", "ollama", "comfyui", "whisper", "speech")


def free_base_port() -> int:
    """
    A port where it and the next four are free on loopback, now: below the
    kernel's ephemeral range, where no client's own end of a connection is
    given a port the host must listen on again after its restart.
    """
    low = _ephemeral_low()
    for _ in range(200):
        base = random.randrange(max(1024, low - 12000), low - len(SERVERS))
        if all(_free(base + i) for i in range(len(SERVERS))):
            return base
    raise RuntimeError("no run of five free ports on 127.0.0.1")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(port: int) -> bool:
    with socket.socket() as probe:
        # As a listening server binds: a port with connections in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class HostProcess:
    """
    The simulated host in its own process, on fixed ports, so that it can be
    killed and started again where the daemon expects it.  Its servers log
    every request they receive to ``requests.jsonl`` and the card's
    out-of-memory count to ``stats.json``; each start's own count is kept
    apart, as a restarted host counts from zero.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.base_port = free_base_port()
        self.card_path = workdir / "card.json"
        self.config_path = workdir / "host-consumers.yaml"
        self.request_log = workdir / "requests.jsonl"
        self.stats_path = workdir / "stats.json"
        self.log_path = workdir / "host.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ooms_before = 0
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        """Start the host; return once its daemon configuration and card file exist."""
        for path in (self.config_path, self.card_path, self.stats_path):
            path.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "mgpumanager.simulate", "--fast",
                "--base-port", str(self.base_port), "--card-file", str(self.card_path),
                "--daemon-config", str(self.config_path),
                "--request-log", str(self.request_log), "--stats-file", str(self.stats_path)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, cwd=self.workdir, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the simulated host exited:\n{self.log()}")
            if self.stats_path.exists() and self._config_written():
                self.starts += 1
                return
            time.sleep(0.05)
        raise RuntimeError(f"the simulated host did not start:\n{self.log()}")

    def _config_written(self) -> bool:
        # The file appears before its content: wait until it parses whole.
        try:
            return isinstance(yaml.safe_load(self.config_path.read_text()), dict)
        except (OSError, yaml.YAMLError):
            return False

    def kill9(self) -> None:
        """SIGKILL: no clean-up, open connections reset, the card file left stale."""
        assert self.process is not None
        self.ooms_before += self.oom_count()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def daemon_config(self) -> dict[str, Any]:
        document: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        return document

    def oom_count(self) -> int:
        """Allocations the card refused, over every start of the host."""
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return self.ooms_before
        return self.ooms_before + int(stats.get("oom_count", 0))

    def posts_by_id(self) -> Counter[str]:
        """How many times the servers received each client's POST (by X-Request-Id)."""
        seen: Counter[str] = Counter()
        if not self.request_log.exists():
            return seen
        for line in self.request_log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line of a killed host may be cut short
            if entry.get("method") == "POST" and entry.get("id"):
                seen[entry["id"]] += 1
        return seen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Hogs:
    """
    ``count`` processes spinning on a core each, bounded by ``timeout`` (the
    ``timeout`` command ends them even if this process dies first).
    """

    def __init__(self, count: int, seconds: float) -> None:
        self.processes = [
            subprocess.Popen(["timeout", str(int(seconds)), sys.executable, "-c",
                              "while True: pass"])
            for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            process.wait()


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid`` now, in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def send_sighup(pid: int) -> None:
    os.kill(pid, signal.SIGHUP)
