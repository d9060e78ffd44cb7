"""
End to end: ``systemctl reload`` (SIGHUP) against a real ``twistd -n
mgpumanager`` in front of scripted consumers.  A valid change takes effect
while a stream runs, which completes intact; a removed consumer's waiting jobs
are answered ``no_consumer``; a new consumer's own port opens; an invalid file
changes nothing; a changed ``listen`` needs a restart.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet.defer import Deferred

from tests.daemon import free_port
from tests.stack import ScriptedStack, start_stack
from tests.support import until

LINES = 25


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ScriptedStack]:
    stack = start_stack(tmp_path)
    yield stack
    assert stack.stop() == 0, stack.daemon.log()


def _edit(stack: ScriptedStack, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(stack.daemon.config_path.read_text())
    change(document)
    stack.daemon.config_path.write_text(yaml.safe_dump(document))
    return document


def _sighup(stack: ScriptedStack) -> None:
    assert stack.daemon.process is not None
    stack.daemon.process.send_signal(signal.SIGHUP)


async def _status(stack: ScriptedStack) -> dict[str, Any]:
    response = await treq.get(stack.url("/v1/status"))
    document: dict[str, Any] = await response.json()
    return document


async def _in_log(stack: ScriptedStack, text: str) -> None:
    async def found() -> bool:
        return text in stack.daemon.log()

    await until(found, f"{text!r} in the daemon's log")


def _reshape(new_port: int, voice_url: str) -> Callable[[dict[str, Any]], None]:
    """The reload under test: image removed, llm more urgent, a new consumer on its own port."""

    def change(document: dict[str, Any]) -> None:
        del document["consumers"]["image"]
        del document["routing"]["image"]
        document["consumers"]["llm"]["priority"] = 3
        document["consumers"]["speaker"] = {
            "url": voice_url,
            "health": {"path": "/health"},
            "listen": f"127.0.0.1:{new_port}",
        }

    return change


@pytest_twisted.ensureDeferred
async def test_a_valid_reload_applies_without_dropping_a_running_stream(
    stack: ScriptedStack,
) -> None:
    spoken = await treq.post(stack.url("/v1/tts?do=echo"), b"{}")
    assert spoken.code == 200
    await spoken.content()

    stream = await treq.post(
        stack.url(f"/v1/llm?do=stream&lines={LINES}&interval=0.08"), b"{}", unbuffered=True
    )
    assert stream.code == 200
    body: Deferred[bytes] = treq.content(stream)
    # Queued behind the stream: two images (to be removed) and a voice job (kept).
    images = [treq.post(stack.url("/v1/image?do=echo"), b"{}") for _ in range(2)]
    voice = treq.post(stack.url("/v1/tts?do=echo"), b"{}")

    async def queued() -> bool:
        return len((await _status(stack))["scheduler"]["queue"]) == 3

    await until(queued, "three jobs queued behind the stream")
    new_port = free_port()
    _edit(stack, _reshape(new_port, f"http://127.0.0.1:{stack.ports['voice']}"))
    _sighup(stack)

    for answer in images:
        refused = await answer
        assert refused.code == 501
        error = await refused.json()
        assert error["error"] == "no_consumer"
        assert error["consumer"] == "image"
        assert "removed by a reload" in error["message"]
    assert not body.called, "the stream outlived the reload"

    lines = (await body).decode().splitlines()
    assert [json.loads(line).get("n") for line in lines] == [*range(LINES), None]
    assert json.loads(lines[-1]) == {"done": True}
    assert (await voice).code == 200

    async def port_open() -> bool:
        try:
            answer = await treq.post(f"http://127.0.0.1:{new_port}/anything?do=echo", b"x")
        except Exception:
            return False
        echoed = await answer.json()
        return bool(answer.code == 200 and echoed["path"] == "/anything")

    await until(port_open, "the new consumer's own port answering")

    status = await _status(stack)
    consumers = {consumer["name"]: consumer for consumer in status["consumers"]}
    assert sorted(consumers) == ["llm", "speaker", "voice"]
    assert "image" not in status["routing"]
    assert consumers["llm"]["priority"] == 3
    assert consumers["llm"]["total_requests"] == 1  # the stream, counted before the reload
    assert consumers["voice"]["total_requests"] == 2
    assert consumers["speaker"]["total_requests"] == 1
    later = await treq.post(stack.url("/v1/image?do=echo"), b"{}")
    assert later.code == 501
    assert (await later.json())["error"] == "no_consumer"
    await _in_log(stack, "reloaded ")


@pytest_twisted.ensureDeferred
async def test_an_invalid_file_changes_nothing_and_a_new_listen_needs_a_restart(
    stack: ScriptedStack,
) -> None:
    before = await _status(stack)

    def misspell(document: dict[str, Any]) -> None:
        document["consumers"]["llm"]["vram_resident_mb"] = 100
        document["consumers"]["llm"]["priority"] = 4

    _edit(stack, misspell)
    _sighup(stack)
    await _in_log(stack, "reload refused")
    line = next(line for line in stack.daemon.log().splitlines() if "reload refused" in line)
    assert "consumers.llm.vram_resident_mb: unknown key" in line
    assert "vram_resident_mib" in line  # the suggestion
    after = await _status(stack)
    assert [c["priority"] for c in after["consumers"]] == [0, 0, 0]
    served = await treq.post(stack.url("/v1/image?do=echo"), b"{}")
    assert served.code == 200

    elsewhere = f"127.0.0.1:{free_port()}"

    def move(document: dict[str, Any]) -> None:
        del document["consumers"]["llm"]["vram_resident_mb"]
        document["listen"] = elsewhere
        document["consumers"]["voice"]["priority"] = 2

    _edit(stack, move)
    _sighup(stack)
    await _in_log(stack, "takes a restart")
    await _in_log(stack, "reloaded ")
    status = await _status(stack)
    assert status["listen"] == before["listen"]
    consumers = {consumer["name"]: consumer for consumer in status["consumers"]}
    assert [consumers[name]["priority"] for name in ("image", "llm", "voice")] == [0, 4, 2]
    assert (await treq.get(stack.url("/healthz"))).code == 200
