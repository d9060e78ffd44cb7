"""
The scheduling policy end to end: a real ``twistd -n mgpumanager`` in front of
scripted consumers, jobs sent over HTTP, the order in which the consumers saw
them start.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from tests.stack import ScriptedStack, start_stack
from tests.support import sleep

#: Two consumers that cannot share the 16 GiB card the budget assumes.
SWAPPING = {
    name: {"vram_resident_mib": 10000, "load": {"method": "POST", "path": "/load"},
           "unload": {"method": "POST", "path": "/unload"}}
    for name in ("voice", "llm")
}




def stack_with(workdir: Path, scheduling: dict[str, Any],
               consumers: dict[str, Any] | None = None) -> ScriptedStack:
    return start_stack(workdir, config={"scheduling": scheduling,
                                        "gpu": {"total_mib": 16384}},
                       consumers=consumers)


async def status(stack: ScriptedStack) -> dict[str, Any]:
    response = await treq.get(stack.url("/v1/status"))
    document: dict[str, Any] = await response.json()
    return document


async def until(stack: ScriptedStack, check: Any, within: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        document = await status(stack)
        if check(document["scheduler"]):
            return document
        assert time.monotonic() < deadline, document["scheduler"]
        await sleep(0.02)


def send(stack: ScriptedStack, kind: str, ms: int, headers: dict[str, str] | None = None,
         ) -> Deferred[Any]:
    return treq.post(stack.url(f"/v1/{kind}?ms={ms}"), b"{}", headers=headers or {})


async def run_in_order(stack: ScriptedStack, kinds: list[str], ms: int) -> list[str]:
    """
    Send ``kinds`` one by one, each only once the one before is queued, and
    return the kinds in the order they were answered: jobs hold the GPU one
    at a time, so that is the order they started in.
    """
    sent, answered = [], []
    for n, kind in enumerate(kinds, 1):
        answer = send(stack, kind, ms)
        answer.addCallback(lambda response, kind=kind: answered.append(kind) or response)
        sent.append(answer)
        await until(stack, lambda s, n=n: s["queue_depth"] + s["in_flight"] >= n)
    for answer in sent:
        assert (await answer).code == 200
    return answered


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[ScriptedStack]:
    stack = stack_with(tmp_path, {"policy": "fifo"})
    yield stack
    assert stack.stop() == 0, stack.daemon.log()


@pytest.fixture
def interactive(tmp_path: Path) -> Iterator[ScriptedStack]:
    stack = stack_with(tmp_path, {"batch_guard_seconds": 1, "linger_seconds": 0.3},
                       SWAPPING)
    yield stack
    assert stack.stop() == 0, stack.daemon.log()


async def voice_behind_three_images(stack: ScriptedStack) -> list[str]:
    return await run_in_order(stack, ["image", "image", "image", "image", "tts"], 150)


@pytest_twisted.ensureDeferred
async def test_a_voice_job_behind_three_images_runs_first_under_interactive_first(
    interactive: ScriptedStack,
) -> None:
    assert await voice_behind_three_images(interactive) == [
        "image", "tts", "image", "image", "image"]


@pytest_twisted.ensureDeferred
async def test_a_voice_job_behind_three_images_runs_last_under_fifo(
    fifo: ScriptedStack,
) -> None:
    assert await voice_behind_three_images(fifo) == [
        "image", "image", "image", "image", "tts"]
    assert (await status(fifo))["scheduler"]["policy"] == "fifo"


@pytest_twisted.ensureDeferred
async def test_through_a_flood_of_voice_jobs_an_image_starts_within_the_guard_plus_one_job(
    interactive: ScriptedStack,
) -> None:
    flood = [send(interactive, "tts", 200) for _ in range(3)]
    await until(interactive, lambda s: s["queue_depth"] >= 2)
    sent_at = time.monotonic()
    image = send(interactive, "image", 10)
    while time.monotonic() - sent_at < 3:
        flood.append(send(interactive, "tts", 200))
        await sleep(0.15)
    assert (await image).code == 200
    image_start = next(start for name, start, _ in interactive.tracker.intervals
                       if name == "image")
    # The guard (1 s) plus one voice job (0.2 s), with room for a loaded machine.
    assert image_start - sent_at < 1.2 + 0.5
    voices_before = [s for name, s, _ in interactive.tracker.intervals
                     if name == "voice" and s < image_start]
    assert len(voices_before) >= 3  # it was not simply the first in line
    for answer in flood:
        await answer


@pytest_twisted.ensureDeferred
async def test_an_earlier_arrival_is_passed_only_with_a_reason_in_the_decision_log(
    interactive: ScriptedStack,
) -> None:
    # The llm server says its model is off the card: its jobs need a load.
    interactive.upstreams["llm"].health_answer = {"status": "ok", "loaded": False}
    await until(interactive, lambda s: True)
    deadline = time.monotonic() + 5
    while any(c["loaded"] for c in (await status(interactive))["consumers"]
              if c["name"] == "llm"):
        assert time.monotonic() < deadline
        await sleep(0.05)
    assert (await send(interactive, "tts", 0)).code == 200
    order = await run_in_order(interactive, ["tts", "llm", "tts"], 150)
    assert order == ["tts", "tts", "llm"]
    document = await status(interactive)
    picks = [d for d in document["scheduler"]["decisions"] if d["type"] == "pick"]
    assert [(d["target"], d["rule"]) for d in picks] == [("voice", "no-swap")]
    assert {d["type"] for d in document["scheduler"]["decisions"]} <= {"evict", "pick"}


@pytest_twisted.ensureDeferred
async def test_class_and_priority_headers_are_checked_stripped_and_timed(
    fifo: ScriptedStack,
) -> None:
    bad = await send(fifo, "tts", 0, {"X-Mgpu-Priority": "9"})
    assert bad.code == 400
    assert (await bad.json())["error"] == "bad_request"
    good = await send(fifo, "image", 0, {"X-Mgpu-Class": "interactive",
                                         "X-Mgpu-Priority": "3"})
    assert good.code == 200
    timing = good.headers.getRawHeaders(b"server-timing")[0].decode()
    assert timing.startswith("queue;dur=") and ", prepare;dur=" in timing
    forwarded = fifo.upstreams["image"].seen[-1]
    assert forwarded.header("x-mgpu-class") == [] and forwarded.header("x-mgpu-priority") == []
