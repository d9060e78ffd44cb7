"""
Guests on the card, end to end: a real ``twistd --simulate`` whose simulated
host runs guests through its control API.  A guest shows in status within two
samples; a yield asked for during a running stream answers only once the
stream ended whole, with every consumer on the card unloaded (Ollama too); a
chat sent during the yield is answered whole after the resume; a yield with
``seconds`` ends by itself; the ``mgpumanager yield`` and ``resume`` commands
work against the daemon; auto-yield follows a guest that arrives and leaves;
reclaim unloads idle consumers, least recently used first, until the headroom.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.app.test_simulate_control_daemon import call, wait_for
from tests.daemon import REPO, Daemon, free_port

DEMO = REPO / "config" / "demo.yaml"
CLI = str(Path(sys.executable).with_name("mgpumanager"))


def start(tmp_path: Path, **gpu: Any) -> tuple[Daemon, str]:
    config: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    for consumer in config["consumers"].values():
        consumer["url"] = f"http://127.0.0.1:{free_port()}"
    config["gpu"] = {**config.get("gpu", {}), "poll_interval_seconds": 0.5, **gpu}
    control = f"127.0.0.1:{free_port()}"
    daemon = Daemon(config, tmp_path, ("--simulate", "--simulate-control", control))
    daemon.start()
    wait_for(lambda: call("GET", f"http://{control}/card"), "the control API")
    return daemon, f"http://{control}"


def card(daemon: Daemon) -> dict[str, Any]:
    status: dict[str, Any] = call("GET", daemon.url + "/v1/status")
    return status["gpus"][0]


def resident(daemon: Daemon) -> set[str]:
    status = call("GET", daemon.url + "/v1/status")
    return {c["name"] for c in status["consumers"] if c["loaded"]}


def post_raw(url: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.status, answer.read()


def in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        box["result"] = target(*args)
        box["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_a_yield_waits_for_the_running_job_holds_the_card_and_gives_it_back(
    tmp_path: Path,
) -> None:
    daemon, control = start(tmp_path)
    try:
        guest = call("POST", control + "/guests", {"mib": 2000, "name": "game"})
        started = time.monotonic()
        wait_for(lambda: card(daemon)["guests"], "the guest in status", timeout=3)
        assert time.monotonic() - started < 2 * 0.5 + 1.0, "within two samples (and a margin)"
        shown = card(daemon)
        assert shown["guests"] == [{"pid": guest["pid"], "name": "game", "mib": 2000}]
        assert shown["guest_mib"] == 2000

        # A 2 s stream runs; the yield asked for meanwhile waits for it.
        stream, streamed = in_thread(post_raw, daemon.url + "/v1/llm",
                                     {"prompt": "hi", "num_lines": 20, "interval": 0.1})
        wait_for(lambda: call("GET", daemon.url + "/v1/status")["scheduler"]["in_flight"],
                 "the stream to hold the card")
        asked, yielded = in_thread(post_raw, daemon.url + "/v1/gpus/0/yield",
                                   {"reason": "a game"})
        stream.join(10)
        asked.join(30)
        code, body = streamed["result"]
        lines = [json.loads(line) for line in body.splitlines()]
        assert code == 200 and lines[-1]["done"] is True and len(lines) == 21, "stream whole"
        assert yielded["at"] >= streamed["at"], "the yield answered after the stream ended"
        code, answer = yielded["result"]
        held = json.loads(answer)
        assert code == 200 and held["card"] == 0 and held["yielded"]["reason"] == "a game"
        assert resident(daemon) == set(), "every consumer on the card unloaded, Ollama too"
        assert card(daemon)["yielded"]["reason"] == "a game"

        # A chat sent during the yield waits, and is answered whole after the resume.
        chat, chatted = in_thread(post_raw, daemon.url + "/v1/llm",
                                  {"prompt": "hi", "num_lines": 3})
        wait_for(lambda: call("GET", daemon.url + "/v1/status")["scheduler"]["queue_depth"],
                 "the chat to queue")
        time.sleep(1.0)
        assert "result" not in chatted, "no job runs on a yielded card"
        assert call("DELETE", daemon.url + "/v1/gpus/0/yield")["yielded"] is None
        chat.join(30)
        code, body = chatted["result"]
        assert code == 200 and json.loads(body.splitlines()[-1])["done"] is True

        # A yield with seconds ends by itself.
        held = call("POST", daemon.url + "/v1/gpus/0/yield", {"seconds": 1, "reason": "x"})
        assert held["yielded"]["until"] is not None
        wait_for(lambda: card(daemon)["yielded"] is None, "the yield's end", timeout=5)

        # The commands an operator types.
        url = ["--url", daemon.url]
        yielding = subprocess.run([CLI, "yield", "--card", "0", "--for", "1h", *url],
                                  capture_output=True, text=True, timeout=60)
        assert yielding.returncode == 0, yielding.stderr
        assert "card 0 yielded" in yielding.stdout
        assert card(daemon)["yielded"] is not None
        resuming = subprocess.run([CLI, "resume", "--card", "0", *url],
                                  capture_output=True, text=True, timeout=30)
        assert resuming.returncode == 0, resuming.stderr
        assert card(daemon)["yielded"] is None
        unknown = subprocess.run([CLI, "yield", "--card", "7", *url],
                                 capture_output=True, text=True, timeout=30)
        assert unknown.returncode == 1 and "not_found" in unknown.stdout + unknown.stderr
        call("DELETE", f"{control}/guests/{guest['pid']}")
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_auto_yield_follows_a_guest_that_arrives_and_leaves(tmp_path: Path) -> None:
    daemon, control = start(tmp_path, yield_to_guests_mib=3000, yield_cooldown_seconds=1.5)
    try:
        guest = call("POST", control + "/guests", {"mib": 4000, "name": "training"})
        yielded = wait_for(lambda: card(daemon)["yielded"], "the auto-yield", timeout=10)
        assert yielded["reason"] == "guest"
        call("DELETE", f"{control}/guests/{guest['pid']}")
        left = time.monotonic()
        wait_for(lambda: card(daemon)["yielded"] is None, "the resume", timeout=10)
        assert time.monotonic() - left >= 1.0, "not before the cooldown"
        decisions = call("GET", daemon.url + "/v1/status")["scheduler"]["decisions"]
        assert {"yield", "resume"} <= {d["type"] for d in decisions}
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_reclaim_unloads_idle_consumers_least_recently_used_first_until_the_headroom(
    tmp_path: Path,
) -> None:
    # The demo card: 16384 MiB; mvoice (3000) and whisper (1500) preloaded.
    daemon, control = start(tmp_path, guest_headroom_mib=6000)
    try:
        code, _ = post_raw(daemon.url + "/v1/llm", {"prompt": "hi", "num_lines": 1})
        assert code == 200 and "ollama" in resident(daemon)  # 6000 MiB, used last
        before = resident(daemon)
        assert {"mvoice", "whisper", "ollama"} <= before
        # 16384 - 10500 held - 3000 for the guest: 2884 MiB free, under the headroom.
        guest = call("POST", control + "/guests", {"mib": 3000, "name": "notebook"})
        wait_for(lambda: "whisper" not in resident(daemon) and "mvoice" not in resident(daemon),
                 "the reclaim", timeout=10)
        # Whisper and mvoice (never used by a job) went first; with them gone,
        # 7384 MiB are free: Ollama, used last, stays.
        assert "ollama" in resident(daemon)
        assert card(daemon)["free_mib"] >= 6000
        decisions = call("GET", daemon.url + "/v1/status")["scheduler"]["decisions"]
        reclaimed = [d["victim"] for d in decisions if d["type"] == "reclaim"]
        assert sorted(reclaimed) == ["mvoice", "whisper"]
        call("DELETE", f"{control}/guests/{guest['pid']}")
    finally:
        assert daemon.stop() == 0, daemon.log()
