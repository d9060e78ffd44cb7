"""
HAProxy's agent check against a real ``twistd -n mgpumanager``, read on a raw
socket as HAProxy reads it: ``up ready 100%`` when idle, the share falling as
jobs wait (running ones do not count), ``drain`` once the queue is full, and
``drain`` from SIGTERM until the running job has finished, when the port closes
with the daemon.  A reload moves the port.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.daemon import free_port
from tests.stack import ScriptedStack, start_stack

LINES = 30


def agent_line(port: int) -> str:
    """One agent check: connect, read until the daemon closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        received = b""
        while chunk := connection.recv(256):
            received += chunk
    return received.decode("ascii")


async def read_agent(port: int) -> str:
    line: str = await deferToThread(agent_line, port)
    return line


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ScriptedStack]:
    port = free_port()
    stack = start_stack(tmp_path, config={
        "agent": {"listen": f"127.0.0.1:{port}"},
        "queue": {"max_depth": 3},
        "shutdown_grace_seconds": 20,
    })
    stack.ports["agent"] = port
    yield stack
    assert stack.stop() == 0, stack.daemon.log()


async def _until(check: Callable[[], Any], what: str) -> None:
    for _ in range(200):
        if await check():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"never happened: {what}")


async def _queued(stack: ScriptedStack, depth: int) -> None:
    async def reached() -> bool:
        status = await (await treq.get(stack.url("/v1/status"))).json()
        return bool(status["scheduler"]["queue_depth"] == depth)

    await _until(reached, f"{depth} job(s) waiting")


@pytest_twisted.ensureDeferred
async def test_the_agent_weighs_the_queue_and_drains_when_full_and_while_stopping(
    stack: ScriptedStack,
) -> None:
    agent = stack.ports["agent"]
    assert await read_agent(agent) == "up ready 100%\n"

    stream = await treq.post(
        stack.url(f"/v1/llm?do=stream&lines={LINES}&interval=0.1"), b"{}", unbuffered=True
    )
    assert stream.code == 200
    body: Deferred[bytes] = treq.content(stream)
    assert await read_agent(agent) == "up ready 100%\n", "the running job is not waiting"

    waiting = [treq.post(stack.url("/v1/tts?do=echo"), b"{}") for _ in range(2)]
    await _queued(stack, 2)
    assert await read_agent(agent) == "up ready 33%\n"
    waiting.append(treq.post(stack.url("/v1/tts?do=echo"), b"{}"))
    await _queued(stack, 3)
    assert await read_agent(agent) == "drain\n", "full: a new job would be refused"

    assert stack.daemon.process is not None
    stack.daemon.process.send_signal(signal.SIGTERM)
    for answer in waiting:
        refused = await answer
        assert refused.code == 503
        assert (await refused.json())["error"] == "shutting_down"
    assert not body.called, "the stream still runs"
    assert await read_agent(agent) == "drain\n", "stopping, with nothing waiting"

    lines = (await body).decode().splitlines()
    assert len(lines) == LINES + 1, "the running stream finished whole"
    assert await deferToThread(stack.daemon.process.wait, 15) == 0
    with pytest.raises(ConnectionRefusedError):
        await read_agent(agent)


@pytest_twisted.ensureDeferred
async def test_a_reload_moves_the_agent_port(stack: ScriptedStack) -> None:
    old, new = stack.ports["agent"], free_port()
    document: dict[str, Any] = yaml.safe_load(stack.daemon.config_path.read_text())
    document["agent"]["listen"] = f"127.0.0.1:{new}"
    stack.daemon.config_path.write_text(yaml.safe_dump(document))
    assert stack.daemon.process is not None
    stack.daemon.process.send_signal(signal.SIGHUP)

    async def moved() -> bool:
        try:
            return await read_agent(new) == "up ready 100%\n"
        except ConnectionRefusedError:
            return False

    await _until(moved, "the agent answering on its new port")
    with pytest.raises(ConnectionRefusedError):
        await read_agent(old)
