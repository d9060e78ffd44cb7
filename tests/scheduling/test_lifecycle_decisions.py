"""
What the lifecycle's decisions show and where it runs
(:mod:`mgpumanager.scheduling.lifecycle`): each decision in status with every
candidate and reason, the last twenty kept; making room and loading inside the
GPU lock without waiting for the sampler's tick; and ``GET /v1/plan/<kind>``,
which says what a job would do without doing any of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater

from mgpumanager.scheduling.lifecycle import DECISIONS_KEPT
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.gpu import GpuReading
from mgpumanager.web.status import lifecycle_status
from tests.lifecycle_world import HOLD, World, refusal, snapshot, voice_world
from tests.support import EPOCH, success_result_of

BASE = "http://127.0.0.1:8770"


def test_decisions_show_in_status_with_every_candidate_and_reason() -> None:
    world = voice_world()

    success_result_of(world.prepare("voice"))

    status = lifecycle_status(world.lifecycle)
    assert {k: status[k] for k in ("evictions", "failed_unloads", "loads", "failed_loads")} == {
        "evictions": 1,
        "failed_unloads": 0,
        "loads": 1,
        "failed_loads": 0,
    }
    (decision,) = status["decisions"]
    assert decision == {
        "time": "2026-05-15T10:00:00.000Z",
        "target": "voice",
        "fits": False,
        "basis": "nvml",
        "needed_mib": 3256,
        "available_mib": 384,
        "why": decision["why"],
        "candidates": [
            {"name": "image", "eligible": True, "reason": "eligible",
             "last_used": "2026-05-15T09:58:20.000Z"},
            {"name": "whisper", "eligible": True, "reason": "eligible",
             "last_used": "2026-05-15T09:59:50.000Z"},
            {"name": "embed", "eligible": False, "reason": "no unload route or systemd unit",
             "last_used": None},
            {"name": "llm", "eligible": False, "reason": "manages its own VRAM",
             "last_used": None},
            {"name": "ocr", "eligible": False, "reason": "not resident", "last_used": None},
        ],
        "victim": "image",
        "outcome": "unloaded",
        "unload_ms": 0,
        "recovery_ms": 0,
        "recovered_mib": 13000,
        # Part 3: every decision names the card it made room on.
        "card": 0,
    }
    json.dumps(status)


def test_only_the_last_twenty_decisions_are_kept() -> None:
    world = World(loaded={"voice": False, "whisper": False}, other_mib=13000)

    for _ in range(25):
        world.registry["voice"].believed_loaded = False
        world.card.held.pop("voice", None)
        success_result_of(world.prepare("voice"))
        world.clock.advance(1)

    assert DECISIONS_KEPT == 20
    decisions = world.lifecycle.decisions
    assert len(decisions) == 20
    assert decisions[0].time == EPOCH + 5
    assert decisions[-1].time == EPOCH + 24
    assert world.lifecycle.loads == 25
    assert len(lifecycle_status(world.lifecycle)["decisions"]) == 20


def recording_job(ran: list[str]) -> Callable[[str], Callable[[], Deferred[None]]]:
    """Job callables that note their label in ``ran`` when they start."""

    def job(label: str) -> Callable[[], Deferred[None]]:
        def run() -> Deferred[None]:
            ran.append(label)
            return succeed(None)

        return run

    return job


def test_making_room_and_loading_happen_inside_the_gpu_lock() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = HOLD
    scheduler = GpuScheduler(
        world.clock, world.registry, world.lifecycle.prepare, queue=world.config.queue
    )
    ran: list[str] = []
    job = recording_job(ran)

    first = scheduler.submit("voice", job("voice"))
    second = scheduler.submit("whisper", job("whisper"))

    assert (scheduler.in_flight, scheduler.queue_depth) == (1, 1)
    assert ran == []
    world.client.answers.pop("http://127.0.0.1:9003/api/free")
    world.client.answer(200)

    success_result_of(first)
    success_result_of(second)
    assert ran == ["voice", "whisper"]
    assert world.client.urls() == ["9003/api/free", "9001/admin/load"]


@pytest.mark.logged_errors_expected
def test_a_failed_unload_fails_the_job_without_running_it_and_frees_the_lock() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = 500
    scheduler = GpuScheduler(
        world.clock, world.registry, world.lifecycle.prepare, queue=world.config.queue
    )
    ran: list[str] = []
    job = recording_job(ran)

    first = scheduler.submit("voice", job("voice"))
    second = scheduler.submit("whisper", job("whisper"))

    assert refusal(first).kind.code == "unload_failed"
    success_result_of(second)
    assert ran == ["whisper"]
    assert scheduler.in_flight == 0


def test_making_room_does_not_wait_for_the_samplers_next_loop_tick() -> None:
    # As in the daemon: reads finish off the reactor (here: on the next clock turn),
    # and the sampler's own loop ticks every 2 s.
    clocks: list[Clock] = []

    def later(f: Callable[[], GpuReading]) -> Deferred[GpuReading]:
        return deferLater(clocks[0], 0, f)

    world = voice_world(run_blocking=later)
    clocks.append(world.clock)
    world.sampler.start()
    finished: list[float] = []

    d = world.prepare("voice")
    d.addCallback(lambda _: finished.append(world.clock.seconds() - EPOCH))
    world.advance(10)
    world.sampler.stop()

    success_result_of(d)
    # Each read takes one clock turn: done within the first steps, not after two
    # more 2 s loop ticks (4.0 s today).
    assert finished[0] <= 0.75


class PlanApi:
    def __init__(self, world: World) -> None:
        self.world = world
        self.stub: Any = StubTreq(world.built.routes.resource)

    def get(self, path: str) -> tuple[int, Any]:
        d = self.stub.get(BASE + path)
        self.stub.flush()
        response = success_result_of(d)
        body = self.stub.content(response)
        self.stub.flush()
        return response.code, json.loads(success_result_of(body))


def test_the_plan_endpoint_answers_what_would_be_evicted_and_touches_nothing() -> None:
    world = World(other_mib=1000)
    world.registry["voice"].last_used = EPOCH - 50
    world.registry["whisper"].last_used = EPOCH - 10
    before = snapshot(world.registry)

    code, plan = PlanApi(world).get("/v1/plan/image")

    assert code == 200
    assert plan["kind"] == "image"
    assert plan["target"] == "image"
    assert plan["would_evict"] == ["voice", "whisper"]
    assert plan["would_load"] is True
    assert [step["fit"]["available_mib"] for step in plan["steps"]] == [9384, 12384, 13884]
    assert world.client.calls == [] and world.commands.calls == []
    assert snapshot(world.registry) == before
    assert list(world.lifecycle.decisions) == []

    # ... and a real job then does exactly that.
    success_result_of(world.prepare("image"))
    assert [d.victim for d in world.lifecycle.decisions] == plan["would_evict"]


def test_the_plan_for_a_resident_target_is_empty() -> None:
    code, plan = PlanApi(World()).get("/v1/plan/tts")

    assert code == 200
    assert (plan["target"], plan["would_evict"], plan["would_load"]) == ("voice", [], False)
    assert plan["skip_make_room"] == "target is already resident"


def test_the_plan_for_an_unrouted_kind_is_501() -> None:
    code, body = PlanApi(World()).get("/v1/plan/llm")

    assert code == 501
    assert (body["error"], body["retryable"]) == ("no_consumer", False)


def test_the_plan_for_an_unknown_kind_is_404() -> None:
    code, body = PlanApi(World()).get("/v1/plan/video")

    assert code == 404
    assert body["error"] == "not_found"


def test_status_shows_the_decisions() -> None:
    world = voice_world()
    success_result_of(world.prepare("voice"))

    code, status = PlanApi(world).get("/v1/status")

    assert code == 200
    scheduler = status["scheduler"]
    assert scheduler["evictions"] == 1
    assert [d["victim"] for d in scheduler["decisions"]] == ["image"]
