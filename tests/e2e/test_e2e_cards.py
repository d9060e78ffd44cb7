"""
Several cards end to end: a real ``twistd -n mgpumanager`` in front of the
simulated two-card host, jobs of controlled length sent over HTTP, and what
ran on each card read at the simulated servers (:mod:`tests.card_timeline`).

Jobs on different cards run together; on one card, one at a time; making
room for a job on card 1 unloads only what is on card 1; and a consumer on
both cards is not starved by one-card jobs that keep arriving on either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from tests.cards_stack import (
    CardsStack,
    cards_stack,
    image_body,
    llm_body,
    send,
    tts_body,
    two_card_host,
    until_idle,
)
from tests.support import sleep


async def together(*jobs: Any) -> list[tuple[int, bytes]]:
    return list(await gatherResults([Deferred.fromCoroutine(job) for job in jobs]))


@pytest_twisted.ensureDeferred
async def test_two_jobs_on_different_cards_run_at_the_same_time(tmp_path: Path) -> None:
    async with cards_stack(tmp_path, two_card_host(tmp_path)) as stack:
        sent = reactor.seconds()
        answers = await together(send(stack, "llm", llm_body(2.0)),
                                 send(stack, "image", image_body(2.0)))
        await until_idle(stack)
        took = reactor.seconds() - sent
        assert [code for code, _ in answers] == [200, 200], answers
        card0, card1 = stack.cards
        (chat,), (image,) = card0.of("ollama"), card1.of("comfyui")
        assert chat.end is not None and image.end is not None
        assert chat.end - chat.start >= 2.0 and image.end - image.start >= 2.0
        assert image.start < chat.end and chat.start < image.end, (chat, image)
        finished = max(chat.end, image.end) - sent
        assert finished < 3.0, f"two 2 s jobs on two cards took {finished:.2f} s"
        assert took < 3.5, f"the daemon was busy {took:.2f} s"
        assert stack.host.gpu_jobs.max_active == 2
        assert stack.host.oom_count == 0


@pytest_twisted.ensureDeferred
async def test_two_jobs_on_one_card_never_overlap(tmp_path: Path) -> None:
    config = two_card_host(tmp_path, voice_seconds=1.0)
    async with cards_stack(tmp_path, config) as stack:
        began = time.monotonic()
        answers = await together(send(stack, "llm", llm_body(1.0)),
                                 send(stack, "tts", tts_body()))
        took = time.monotonic() - began
        assert [code for code, _ in answers] == [200, 200], answers
        card0, card1 = stack.cards
        assert {run.server for run in card0.runs} == {"ollama", "mvoice"}
        assert card0.overlaps() == []
        assert card1.runs == []
        assert took >= 2.0, f"two 1 s jobs on one card took {took:.2f} s"
        assert stack.host.gpu_jobs.max_active == 1


@pytest_twisted.ensureDeferred
async def test_room_on_card_1_is_made_only_of_card_1_consumers(tmp_path: Path) -> None:
    # Card 1 holds ComfyUI (9000) or the speech server (800), not both with the
    # cushion; card 0 holds mvoice and whisper, never used, so the least
    # recently used of all: a planner blind to cards would unload them first.
    config = two_card_host(tmp_path, cards_mib=(24576, 9500),
                           placement={"speech": (1,)})

    def edit(document: dict[str, Any]) -> None:
        document["routing"]["tts"] = "speech"

    async with cards_stack(tmp_path, config, edit) as stack:
        host = stack.host
        speech = json.dumps({"input": "hello there"}).encode()
        assert (await send(stack, "tts", speech))[0] == 200
        assert (await send(stack, "llm", llm_body(0.05)))[0] == 200
        card0_before = host.cards[0].snapshot()
        assert host.cards[1].held_by("speech") == 800

        code, body = await send(stack, "image", image_body(0.1))
        assert code == 200, body
        document = await until_idle(stack)
        evictions = [d for d in document["scheduler"]["decisions"] if d["type"] == "evict"]
        assert [d["victim"] for d in evictions] == ["speech"], evictions
        assert evictions[0]["target"] == "comfyui"
        assert evictions[0]["outcome"] == "unloaded"
        assert host.cards[0].snapshot() == card0_before
        assert host.voice.model.loaded and host.whisper.model.loaded
        assert host.cards[1].held_by("speech") == 0
        assert host.cards[1].held_by("comfyui") == 9000
        assert host.comfy.model.generation == 1
        assert host.oom_count == 0
        loaded = {c["name"]: c["loaded"] for c in document["consumers"]}
        assert loaded["mvoice"] and loaded["whisper"] and loaded["ollama"]


async def stream(stack: CardsStack, kind: str, body: bytes, going: list[bool]) -> int:
    """One client sending a job as soon as its last one is answered; jobs sent."""
    sent = 0
    while going:
        code, answer = await send(stack, kind, body)
        assert code == 200, answer
        sent += 1
    return sent


@pytest_twisted.ensureDeferred
async def test_a_job_on_both_cards_starts_within_a_job_of_each(tmp_path: Path) -> None:
    # mvoice sits on both cards; a chat client keeps card 0 busy and an image
    # client card 1, each sending its next job the moment the last one ends,
    # at different paces so that the two cards are never free together by
    # chance.  Only the reservation of the waiting two-card job's cards lets
    # it start: the wait is bounded by the one-card job running on each card.
    chat, image = 1.0, 0.7
    config = two_card_host(tmp_path, voice_seconds=0.2, placement={"mvoice": (0, 1)})
    async with cards_stack(tmp_path, config) as stack:
        going = [True]
        clients = [Deferred.fromCoroutine(stream(stack, "llm", llm_body(chat), going)),
                   Deferred.fromCoroutine(stream(stack, "image", image_body(image), going))]
        try:
            await sleep(1.5)
            waits = []
            for turn in range(3):
                sent = reactor.seconds()
                code, body = await send(stack, "tts", tts_body())
                assert code == 200, body
                voice = stack.cards[0].of("mvoice")[-1]
                waits.append(voice.start - sent)
                assert stack.cards[1].of("mvoice")[-1] == voice
                await sleep(0.3 + 0.2 * turn)
        finally:
            going.clear()
            jobs = await gatherResults(clients)
        bound = max(chat, image) + 0.5
        assert max(waits) < bound, f"the two-card job waited {waits} (bound {bound} s)"
        card0, card1 = stack.cards
        assert card0.overlaps() == [] and card1.overlaps() == []
        # The one-card clients kept both cards busy throughout, and went on
        # after each two-card job.
        assert jobs[0] >= 3 and jobs[1] >= 3, jobs
        last_voice = card0.of("mvoice")[-1].start
        assert any(run.start > last_voice for run in card0.of("ollama"))
        assert any(run.start > last_voice for run in card1.of("comfyui"))
        assert stack.host.oom_count == 0
