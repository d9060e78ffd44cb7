"""
The processes the benchmark runs, all on 127.0.0.1: nginx (fast upstream and reference
proxy), the Python upstreams, and the daemon. Every child is registered, so that one call
(also made at exit) stops them all.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from clients import HarnessError
from procfs import children as child_pids

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Asks the kernel to kill the child if the bench itself is killed (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Children:
    """Every process the bench started, stopped in reverse order."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        atexit.register(self.stop_all)

    def spawn(self, args: list[str], log: Path, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, preexec_fn=_die_with_parent,
            )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.processes:
            self.processes.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            try:
                self.stop(process, timeout=5.0)
            except OSError:
                pass


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path,
                  timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"{process.args!r} exited early:\n{tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise HarnessError(f"{process.args!r} did not listen on {port}:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if found is None:
        raise HarnessError("nginx not found: run bench/setup.sh")
    return found


def nginx_version() -> str:
    done = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().rpartition("/")[2]


class Nginx:
    """One nginx (master + one worker) run as the current user from a temp-dir prefix."""

    def __init__(self, name: str, workdir: Path, children: Children, servers: str) -> None:
        self.name = name
        self.prefix = workdir / name
        self.prefix.mkdir()
        self.children = children
        self.log = self.prefix / "error.log"
        temp = {kind: self.prefix / f"{kind}_temp"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        user = ""
        if os.geteuid() == 0:
            # As root, nginx would hand its workers to "nobody": keep them ours instead.
            user = f"user {pwd.getpwuid(0).pw_name};"
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(f"""
{user}
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    error_log {self.log} warn;
    client_body_temp_path {temp['client_body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{servers}
}}
""")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        self.process = self.children.spawn(
            [nginx_binary(), "-c", str(self.conf), "-p", str(self.prefix), "-e", str(self.log),
             "-g", f"daemon off; pid {self.prefix / 'nginx.pid'};"],
            self.prefix / "stdout.log",
        )
        wait_for_port(port, self.process, self.log)

    @property
    def worker_pid(self) -> int:
        assert self.process is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            workers = child_pids(self.process.pid)
            if workers:
                return workers[0]
            time.sleep(0.05)
        raise HarnessError(f"nginx {self.name}: no worker process")


def fast_upstream_servers(port: int) -> str:
    return f"""
    server {{
        listen {HOST}:{port};
        default_type application/json;
        location / {{ return 200 '{{"ok":true}}'; }}
    }}"""


def proxy_servers(port: int, upstreams: dict[str, int], routes: dict[str, tuple[str, str]]
                  ) -> str:
    """``routes``: facade path -> (upstream name, upstream path)."""
    blocks = [
        f"    upstream {name} {{ server {HOST}:{upstream_port}; keepalive 32; }}"
        for name, upstream_port in upstreams.items()
    ]
    locations = [
        f"        location = {path} {{ proxy_pass http://{name}{upstream_path}; }}"
        for path, (name, upstream_path) in routes.items()
    ]
    return "\n".join([*blocks, f"""
    server {{
        listen {HOST}:{port};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_connect_timeout 10s;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
""", *locations, "    }"])


class PythonUpstream:
    def __init__(self, kind: str, workdir: Path, children: Children) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = workdir / f"upstream-{kind}.log"
        self.process = children.spawn(
            [sys.executable, str(BENCH / "upstreams.py"), kind, str(self.port)], self.log
        )

    def wait(self) -> None:
        wait_for_port(self.port, self.process, self.log)


class Daemon:
    """``twistd -n mgpumanager`` on a loopback port, spawned as tests/daemon.py does."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path,
                 children: Children) -> None:
        self.port = free_port()
        self.workdir = workdir / name
        self.workdir.mkdir()
        self.children = children
        # JSON is YAML: no YAML writer needed.
        self.config_path = self.workdir / "consumers.yaml"
        self.config_path.write_text(json.dumps(dict(config, listen=f"{HOST}:{self.port}"),
                                               indent=2))
        self.log = self.workdir / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.process = self.children.spawn(
            [TWISTD, "-n", "--pidfile=", "mgpumanager", "--config", str(self.config_path)],
            self.log, cwd=self.workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"daemon exited early:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"daemon did not answer /healthz:\n{tail(self.log)}")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return self.children.stop(self.process, timeout=15.0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Prototype:
    """The design card's bare prototype (bench/prototype.py) on a loopback port."""

    def __init__(self, workdir: Path, children: Children, upstreams: dict[str, str]) -> None:
        self.port = free_port()
        self.log = workdir / "prototype.log"
        self.process = children.spawn(
            [sys.executable, str(BENCH / "prototype.py"), str(self.port),
             *(f"{kind}={url}" for kind, url in upstreams.items())],
            self.log,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self) -> None:
        wait_for_port(self.port, self.process, self.log)
