"""
``--simulate-control`` on the daemon: refused without ``--simulate`` or off
loopback, handed to the in-process host, and, in a real ``twistd``, a guest
started through it shows in the daemon's own reading of the card.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.task import Clock
from twisted.python import usage

from mgpumanager.app import tap
from mgpumanager.app.demo import simulated_in_process
from mgpumanager.config.parsing import load_config
from tests.daemon import REPO, Daemon, free_port

DEMO = REPO / "config" / "demo.yaml"


def test_simulate_control_needs_simulate() -> None:
    with pytest.raises(usage.UsageError, match="needs --simulate"):
        tap.Options().parseOptions(
            ["--config", str(DEMO), "--simulate-control", "127.0.0.1:0"]
        )


def test_simulate_control_is_loopback_only() -> None:
    with pytest.raises(usage.UsageError, match="loopback"):
        tap.Options().parseOptions(
            ["--config", str(DEMO), "--simulate", "--simulate-control", "0.0.0.0:8779"]
        )


def test_simulate_control_reaches_the_in_process_host() -> None:
    options = tap.Options()
    options.parseOptions(
        ["--config", str(DEMO), "--simulate", "--simulate-control", "localhost:0"]
    )
    assert options["control_address"] == ("127.0.0.1", 0)
    stand_ins = simulated_in_process(load_config(DEMO), Clock(), control=("127.0.0.1", 0))
    host: Any = stand_ins.services[0]._host  # type: ignore[attr-defined]
    assert host.config.control == ("127.0.0.1", 0)
    closed: Any = simulated_in_process(load_config(DEMO), Clock()).services[0]
    assert closed._host.config.control is None


def call(method: str, url: str, body: object | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.load(answer)


def wait_for(check: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (OSError, urllib.error.URLError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_guest_started_through_the_daemons_host_shows_in_its_status(
    tmp_path: Path,
) -> None:
    config: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    for consumer in config["consumers"].values():
        consumer["url"] = f"http://127.0.0.1:{free_port()}"
    control = f"http://127.0.0.1:{free_port()}"
    daemon = Daemon(
        config, tmp_path, ("--simulate", "--simulate-control", control.removeprefix("http://"))
    )
    daemon.start()
    try:
        cards = wait_for(lambda: call("GET", control + "/card"), "the control API")
        preloaded = cards["cards"][0]["used_mib"]
        wait_for(
            lambda: call("GET", daemon.url + "/v1/status")["gpu"]["used_mib"] == preloaded,
            "the daemon to read the preloaded servers",
        )
        guest = call("POST", control + "/guests", {"mib": 5000, "name": "game"})
        wait_for(
            lambda: call("GET", daemon.url + "/v1/status")["gpu"]["used_mib"]
            == preloaded + 5000,
            "the daemon to see the guest",
        )
        call("DELETE", f"{control}/guests/{guest['pid']}")
        wait_for(
            lambda: call("GET", daemon.url + "/v1/status")["gpu"]["used_mib"] == preloaded,
            "the daemon to see the guest gone",
        )
    finally:
        assert daemon.stop() == 0, daemon.log()
