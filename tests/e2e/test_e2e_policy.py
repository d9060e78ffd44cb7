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


async def until_consumers(stack: ScriptedStack, check: Any, within: float = 5.0) -> None:
    """Until ``check`` accepts every consumer's ``loaded``, by name."""
    deadline = time.monotonic() + within
    while not check({c["name"]: c["loaded"] for c in (await status(stack))["consumers"]}):
        assert time.monotonic() < deadline
        await sleep(0.05)


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


#: Two consumers that cannot share the card, one for tts and one for stt, whose
#: loads and unloads take long enough to time.
LOAD_MS, UNLOAD_MS = 300, 200
APART = {
    name: {"vram_resident_mib": 10000, "paths": {kind: {"path": path}},
           "load": {"method": "POST", "path": f"/load?do=load&ms={LOAD_MS}"},
           "unload": {"method": "POST", "path": f"/unload?do=unload&ms={UNLOAD_MS}"}}
    for name, kind, path in (("voice", "tts", "/api/tts"), ("llm", "stt", "/api/stt"))
}


def server_timing(response: Any) -> dict[str, int]:
    header = response.headers.getRawHeaders(b"server-timing")[0].decode()
    return {name.strip(): int(dur) for name, dur in
            (part.split(";dur=") for part in header.split(","))}


@pytest.fixture
def apart(tmp_path: Path) -> Iterator[ScriptedStack]:
    """Default scheduling; tts and stt on two consumers that cannot share the card."""
    stack = start_stack(tmp_path, config={
        "gpu": {"total_mib": 16384},
        "routing": {"tts": "voice", "stt": "llm", "llm": "llm", "image": "image"},
    }, consumers=APART)
    # Only the voice model is on the card to begin with.
    stack.upstreams["voice"].health_answer = {"status": "ok", "loaded": True}
    stack.upstreams["llm"].health_answer = {"status": "ok", "loaded": False}
    pytest_twisted.blockon(Deferred.fromCoroutine(until_consumers(
        stack, lambda loaded: loaded == {"voice": True, "llm": False, "image": True})))
    yield stack
    assert stack.stop() == 0, stack.daemon.log()


@pytest_twisted.ensureDeferred
async def test_alternating_tts_and_stt_waits_for_the_swaps_and_no_linger(
    apart: ScriptedStack,
) -> None:
    # Default scheduling: the 12 s linger holds batch work only, so a client
    # alternating between two servers that cannot share the card is never
    # kept waiting on an idle card between its jobs.
    timings = []
    for n in range(6):
        response = await send(apart, "tts" if n % 2 == 0 else "stt", 20)
        assert response.code == 200
        await response.content()
        timings.append(server_timing(response))
    document = await status(apart)
    evictions = [d for d in document["scheduler"]["decisions"] if d["type"] == "evict"]
    # Newest first: every job after the first swapped the other consumer out.
    evictions = evictions[:5][::-1]
    assert [d["victim"] for d in evictions] == ["voice", "llm", "voice", "llm", "voice"]
    for timing, eviction in zip(timings[1:], evictions, strict=True):
        swap_ms = eviction["unload_ms"] + eviction["recovery_ms"] + LOAD_MS
        # The load really happened inside prepare ...
        assert timing["prepare"] >= LOAD_MS, timings
        # ... and queue plus prepare is the swap's own time, far from a linger.
        assert timing["queue"] + timing["prepare"] <= swap_ms + 1500, (timings, evictions)
