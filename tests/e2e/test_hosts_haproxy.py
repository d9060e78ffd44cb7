"""
Several hosts behind a real HAProxy, run with the shipped ``deploy/haproxy.cfg``
with only its addresses and ports changed for loopback: two hosts, each a real
daemon in front of its own simulated host.  Jobs spread over both; a ComfyUI
flow (prompt, history, view and the ``/ws`` feed) stays on one host; a host
stopped with SIGTERM finishes its streams whole while new jobs go to the other,
and none fails; every POST reached one simulated server exactly once.

(Draining a host whose cards are all yielded comes with the yield feature.)
"""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
import websocket
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.comfy_feed import messages_until_idle
from tests.daemon import REPO, free_port
from tests.hosts import (
    Host,
    Program,
    at_most,
    missing_line,
    post,
    program,
    start_hosts,
    stop_hosts,
)
from tests.support import until

MISSING = missing_line("haproxy")
if MISSING is not None:
    pytest.skip(MISSING, allow_module_level=True)

GRAPH = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}


@attrs.define
class Stage:
    hosts: list[Host]
    haproxy: Program
    front: str
    stats: str
    sent: list[str] = attrs.Factory(list)

    def seen(self) -> list[Counter[str]]:
        return [host.request_ids() for host in self.hosts]

    def assert_each_post_reached_one_server_once(self) -> None:
        """Every id this suite sent, counted over every server of both hosts."""
        total: Counter[str] = Counter()
        for seen in self.seen():
            total.update(seen)
        assert {i: total[i] for i in self.sent if total[i] != 1} == {}


def loopback_config(text: str, front: int, stats: int, hosts: list[Host]) -> str:
    """The shipped file with its listening and server addresses moved to loopback ports."""
    text, binds = re.subn(r"(?m)^(\s*bind )\*?:8770$", rf"\g<1>127.0.0.1:{front}", text)
    text, stat_binds = re.subn(r"(?m)^(\s*bind )127\.0\.0\.1:8404$", rf"\g<1>127.0.0.1:{stats}",
                               text)
    servers = iter(hosts)

    def server(match: re.Match[str]) -> str:
        host = next(servers)
        return f"{match[1]}127.0.0.1:{host.daemon.port}{match[2]}{host.agent_port}"

    text, moved = re.subn(r"(?m)^(\s*server \S+ )192\.0\.2\.\d+:8770( .*agent-port )8771",
                          server, text)
    assert (binds, stat_binds, moved) == (1, 1, len(hosts)), "the shipped file changed shape"
    return text


def server_states(stats: str) -> dict[str, dict[str, str]]:
    """HAProxy's view of each server of the backend (blocking: run it in a thread)."""
    with urllib.request.urlopen(stats + "/;csv", timeout=5) as answer:
        rows = csv.DictReader(io.StringIO(answer.read().decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "gpu_hosts"}


@pytest_twisted.async_yield_fixture(scope="module")
async def stage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stage]:
    workdir = tmp_path_factory.mktemp("hosts")
    hosts = await start_hosts(workdir, ("a", "b"))
    haproxy: Program | None = None
    try:
        front, stats = free_port(), free_port()
        config = workdir / "haproxy.cfg"
        shipped = (REPO / "deploy" / "haproxy.cfg").read_text()
        config.write_text(loopback_config(shipped, front, stats, hosts))
        haproxy = Program([program("haproxy") or "haproxy", "-db", "-f", str(config)],
                          workdir / "haproxy.log")
        stage = Stage(hosts, haproxy, f"http://127.0.0.1:{front}", f"http://127.0.0.1:{stats}")
        await deferToThread(haproxy.answers, stage.stats + "/")

        async def both_weighed() -> bool:
            states = await deferToThread(server_states, stage.stats)
            return all(states[name]["status"] == "UP" and states[name]["agent_status"] == "L7OK"
                       for name in ("gpu-a", "gpu-b"))

        await until(both_weighed, "both hosts up, their agents read")
        yield stage
    finally:
        if haproxy is not None:
            haproxy.stop()
        await stop_hosts(hosts)


def _llm(lines: int, interval: float) -> dict[str, Any]:
    return {"prompt": "hello", "num_lines": lines, "interval": interval}


def _whole(answer: bytes, lines: int) -> bool:
    chunks = [json.loads(line) for line in answer.decode().splitlines()]
    return len(chunks) == lines + 1 and chunks[-1]["done"] is True


@pytest_twisted.ensureDeferred
async def test_jobs_spread_over_both_hosts(stage: Stage) -> None:
    ids = [f"spread-{n}" for n in range(40)]
    stage.sent += ids
    answers = await at_most(8, [
        lambda i=i: post(stage.front + "/v1/llm", _llm(4, 0.02), i) for i in ids  # type: ignore[misc]
    ])
    assert [code for code, _ in answers] == [200] * 40
    assert all(_whole(body, 4) for _, body in answers)
    at_a, at_b = (sum(seen[i] for i in ids) for seen in stage.seen())
    assert at_a + at_b == 40
    assert at_a >= 10 and at_b >= 10, (at_a, at_b)
    stage.assert_each_post_reached_one_server_once()


@pytest_twisted.ensureDeferred
async def test_a_comfyui_flow_stays_on_one_host(stage: Stage) -> None:
    base = stage.front + "/upstream/comfyui"
    before = [len(host.paths_at("comfyui")) for host in stage.hosts]
    feed = await deferToThread(
        websocket.create_connection,
        base.replace("http://", "ws://") + "/ws?clientId=flow", timeout=10,
    )
    try:
        greeting = json.loads(await deferToThread(feed.recv))
        assert greeting["data"]["sid"] == "flow"
        stage.sent.append("flow-prompt")
        # The feed holds a connection to its host: leastconn alone would send this elsewhere.
        response = await treq.post(base + "/prompt", json={"prompt": GRAPH, "client_id": "flow"},
                                   headers={"X-Request-Id": "flow-prompt"})
        assert response.code == 200, await response.text()
        prompt_id = (await response.json())["prompt_id"]
        messages = await deferToThread(messages_until_idle, feed)
    finally:
        await deferToThread(feed.close)
    assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3, 4]
    history = await (await treq.get(f"{base}/history/{prompt_id}")).json()
    image = history[prompt_id]["outputs"]["9"]["images"][0]
    view = await treq.get(base + "/view", params={"filename": image["filename"],
                                                 "type": "output"})
    assert view.code == 200 and (await view.content())[:4] == b"\x89PNG"

    flows = [
        [path for path in host.paths_at("comfyui")[count:] if not path.startswith("/system")]
        for host, count in zip(stage.hosts, before, strict=True)
    ]
    (used,) = [n for n, paths in enumerate(flows) if "/prompt" in paths]
    other = flows[1 - used]
    assert {"/ws", "/prompt", f"/history/{prompt_id}", "/view"} <= set(flows[used])
    assert not [p for p in other if p in ("/ws", "/prompt", "/view") or prompt_id in p], other
    stage.assert_each_post_reached_one_server_once()


@pytest_twisted.ensureDeferred
async def test_a_host_whose_every_card_is_yielded_drains_to_the_other(stage: Stage) -> None:
    a = stage.hosts[0]
    held = await treq.post(a.url + "/v1/gpus/0/yield", json={"reason": "a game"})
    assert held.code == 200, await held.text()
    yielded = time.monotonic()

    async def a_drains() -> bool:
        states = await deferToThread(server_states, stage.stats)
        return states["gpu-a"]["status"].startswith("DRAIN")

    await until(a_drains, "HAProxy reading host A's agent say drain")
    # The shipped agent-inter is 1 s.
    assert time.monotonic() - yielded <= 1.0 + 1.0
    ids = [f"yielded-{n}" for n in range(20)]
    stage.sent += ids
    answers = await at_most(4, [
        lambda i=i: post(stage.front + "/v1/llm", _llm(2, 0.01), i) for i in ids  # type: ignore[misc]
    ])
    assert [code for code, _ in answers] == [200] * 20
    at_a, at_b = stage.seen()
    assert [i for i in ids if at_b[i] != 1] == [] and not any(at_a[i] for i in ids)
    resumed = await treq.delete(a.url + "/v1/gpus/0/yield")
    assert (await resumed.json())["yielded"] is None

    async def a_back() -> bool:
        states = await deferToThread(server_states, stage.stats)
        return states["gpu-a"]["status"] == "UP"

    await until(a_back, "host A taking jobs again")
    stage.assert_each_post_reached_one_server_once()


@pytest_twisted.ensureDeferred
async def test_a_host_stopped_finishes_its_streams_while_new_jobs_go_to_the_other(
    stage: Stage,
) -> None:
    lines = 50
    streams = []
    for n in range(2):
        stage.sent.append(f"long-{n}")
        streams.append(await treq.post(stage.front + "/v1/llm", json=_llm(lines, 0.06),
                                       headers={"X-Request-Id": f"long-{n}"}, unbuffered=True))
    assert [response.code for response in streams] == [200, 200]
    bodies: list[Deferred[bytes]] = [treq.content(response) for response in streams]

    async def one_each() -> bool:
        seen = stage.seen()
        return all(sum(s[f"long-{n}"] for n in range(2)) == 1 for s in seen)

    await until(one_each, "leastconn giving each host one stream")
    b = stage.hosts[1]
    assert b.daemon.process is not None
    b.daemon.process.send_signal(signal.SIGTERM)
    await deferToThread(_refused_soon, b.daemon.port)

    after = [f"after-{n}" for n in range(8)]
    stage.sent += after
    answers = await at_most(4, [
        lambda i=i: post(stage.front + "/v1/llm", _llm(2, 0.01), i) for i in after  # type: ignore[misc]
    ])
    assert [code for code, _ in answers] == [200] * 8, [body[:200] for _, body in answers]
    at_a, at_b = stage.seen()
    assert [i for i in after if at_a[i] != 1] == [] and not any(at_b[i] for i in after)
    for body in bodies:
        assert _whole(await body, lines), "a stream running at SIGTERM finished whole"
    assert await deferToThread(b.daemon.process.wait, 20) == 0
    stage.assert_each_post_reached_one_server_once()


def _refused_soon(port: int) -> None:
    """Wait until ``port`` refuses connections: the daemon has stopped listening."""
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {port} still accepts connections")
