"""
A ComfyUI prompt whose exchange breaks before its answer says which prompt
it started (the client leaves mid-answer): ComfyUI may be generating all the
same, so the GPU stays held until ComfyUI's own queue is empty, never handed
to a job that would load a model beside it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from mgpumanager.consumers.adapters.following import Completions
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.web.jobs import GpuJobs
from tests.adapter_fakes import ScriptedControl, registry_of
from tests.support import failure_result_of

MIB = 1024 * 1024


class HangingProxy:
    """A relay that never completes: the client will leave first."""

    def __init__(self) -> None:
        self.relays: list[Deferred[Any]] = []

    def relay_keeping(self, *args: Any) -> Deferred[Any]:
        relay: Deferred[Any] = Deferred()
        self.relays.append(relay)
        return relay


def _world(queue: list[dict[str, Any]]) -> tuple[GpuJobs, GpuScheduler, Clock, Any]:
    clock = Clock()
    registry = registry_of({"comfyui": {"url": "http://127.0.0.1:8188", "adapter": "comfyui",
                                        "completion": {"poll_seconds": 0.5}}})
    control = ScriptedControl({("GET", "/queue"): lambda _: (200, queue[0])})
    scheduler = GpuScheduler(clock, registry, queue=registry.config.queue)
    completions = Completions(
        control, clock, lambda *_: None, Adapters(registry.config)  # type: ignore[arg-type]
    )
    jobs = GpuJobs(registry, scheduler, HangingProxy(), completions=completions)  # type: ignore[arg-type]
    return jobs, scheduler, clock, registry["comfyui"].config


def test_a_client_leaving_mid_prompt_keeps_the_gpu_until_comfyui_is_idle() -> None:
    queue = [{"queue_running": [[0, "theirs-or-ours", {}, {}, []]], "queue_pending": []}]
    jobs, scheduler, clock, comfy = _world(queue)
    request = DummyRequest([b"prompt"])
    request.method = b"POST"

    answered = jobs.run(request, comfy, "POST", "/prompt", "image")
    answered.cancel()  # the client left before the answer was relayed

    failure_result_of(answered)
    assert scheduler.in_flight == 1, "the GPU is still held for what ComfyUI may be running"
    clock.advance(0.5)
    assert scheduler.in_flight == 1
    queue[0] = {"queue_running": [], "queue_pending": []}
    clock.advance(0.5)
    assert scheduler.in_flight == 0


def test_a_comfyui_that_stops_answering_releases_the_gpu_after_two_polls() -> None:
    jobs, scheduler, clock, comfy = _world([{}])
    jobs._completions.control.replies.clear()  # type: ignore[union-attr]
    request = DummyRequest([b"prompt"])
    request.method = b"POST"

    answered = jobs.run(request, comfy, "POST", "/prompt", "image")
    answered.cancel()
    failure_result_of(answered)

    assert scheduler.in_flight == 1
    clock.advance(0.5)
    assert scheduler.in_flight == 0

