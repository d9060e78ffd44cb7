"""
The comfyui adapter: a prompt's job lasts until ComfyUI has finished it, its
residency comes from ``/system_stats``, and ``/free`` waits for its own queue.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mgpumanager.common.answers import Answer
from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.consumers.adapters.comfy_completion import PromptCompletion
from mgpumanager.consumers.control import ControlFailed
from mgpumanager.state.registry import ConsumerState
from tests.adapter_fakes import ScriptedControl, registry_of
from tests.support import assert_no_result, failure_result_of, success_result_of

ADAPTER = adapter_named("comfyui")
MIB = 1024 * 1024


def comfy(poll: float = 0.5, timeout: float = 10.0) -> ConsumerState:
    return registry_of(
        {
            "comfyui": {
                "url": "http://127.0.0.1:8188",
                "adapter": "comfyui",
                "vram_resident_mib": 9000,
                "completion": {"poll_seconds": poll, "timeout_seconds": timeout},
            }
        }
    )["comfyui"]


def queue_of(*running: str, pending: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "queue_running": [[0, i, {}, {}, []] for i in running],
        "queue_pending": [[1, i, {}, {}, []] for i in pending],
    }


def follow(control: ScriptedControl, state: ConsumerState, clock: Clock) -> Deferred[str]:
    work = ADAPTER.follow(control, state, Answer(200, b'{"prompt_id": "p1"}'), clock)
    assert isinstance(work, PromptCompletion) and work.work_id == "p1"
    return Deferred.fromCoroutine(work.until_done())


def test_the_job_lasts_until_history_shows_the_prompt() -> None:
    history: dict[str, Any] = {}
    control = ScriptedControl(
        {
            ("GET", "/history/p1"): lambda _: (200, dict(history)),
            ("GET", "/queue"): lambda _: (200, queue_of("p1")),
        }
    )
    clock = Clock()
    done = follow(control, comfy(), clock)
    for _ in range(4):
        clock.advance(0.5)
    assert_no_result(done)
    history["p1"] = {"status": {"status_str": "success"}}
    clock.advance(0.5)
    assert success_result_of(done) == "done"
    assert control.paths("GET").count("/history/p1") == 6


def test_a_prompt_in_neither_queue_twice_running_ends_the_job() -> None:
    control = ScriptedControl(
        {
            ("GET", "/history/p1"): lambda _: (200, {}),
            ("GET", "/queue"): lambda _: (200, queue_of("other")),
        }
    )
    clock = Clock()
    done = follow(control, comfy(), clock)
    assert_no_result(done)  # one miss may be the step from queue to history
    clock.advance(0.5)
    assert success_result_of(done) == "gone"


def test_a_failed_probe_ends_the_wait() -> None:
    control = ScriptedControl(
        {
            ("GET", "/history/p1"): lambda _: (200, {}),
            ("GET", "/queue"): lambda _: (200, queue_of(pending=("p1",))),
        }
    )
    clock = Clock()
    state = comfy()
    done = follow(control, state, clock)
    clock.advance(0.5)
    assert_no_result(done)
    state.healthy = False
    clock.advance(0.5)
    assert success_result_of(done) == "probe failed"


def test_after_the_timeout_the_prompt_is_deleted_then_interrupted() -> None:
    control = ScriptedControl(
        {
            ("GET", "/history/p1"): lambda _: (200, {}),
            ("GET", "/queue"): lambda _: (200, queue_of("p1")),
            ("POST", "/queue"): lambda _: (200, {}),
            ("POST", "/interrupt"): lambda _: (200, {}),
        }
    )
    clock = Clock()
    done = follow(control, comfy(poll=1, timeout=5), clock)
    for _ in range(4):
        clock.advance(1)
    assert_no_result(done)
    clock.advance(1)
    assert success_result_of(done) == "timeout"
    posts = [(path, body) for method, path, body in control.calls if method == "POST"]
    assert posts == [("/queue", {"delete": ["p1"]}), ("/interrupt", {"prompt_id": "p1"})]


@pytest.mark.parametrize(
    "answer", [Answer(400, b'{"error": "bad"}'), Answer(200, b'{"number": 1}'), Answer(200, None)]
)
def test_an_answer_without_a_prompt_id_ends_the_job_with_it(answer: Answer) -> None:
    assert ADAPTER.follow(ScriptedControl({}), comfy(), answer, Clock()) is None


def test_only_prompt_posts_outlive_their_answer() -> None:
    assert ADAPTER.completes_later("POST", "/prompt")
    assert ADAPTER.completes_later("POST", "/api/prompt")
    assert not ADAPTER.completes_later("GET", "/prompt")
    assert not ADAPTER.completes_later("POST", "/free")


def test_residency_and_measured_vram_come_from_torch_vram_total() -> None:
    control = ScriptedControl({("GET", "/queue"): lambda _: (200, queue_of())})
    state = comfy()
    health = {"devices": [{"torch_vram_total": 8600 * MIB + 1}]}
    seen = success_result_of(
        Deferred.fromCoroutine(ADAPTER.observe(control, state.config, health, 1.0))
    )
    assert (seen.resident, seen.measured_mib, seen.busy) == (True, 8601, False)
    health = {"devices": [{"torch_vram_total": 4000 * MIB}]}
    seen = success_result_of(
        Deferred.fromCoroutine(ADAPTER.observe(control, state.config, health, 1.0))
    )
    assert seen.resident is False  # under half of the declared 9000


def test_foreign_work_delays_free_until_the_queue_drains() -> None:
    queue = [queue_of("theirs")]
    control = ScriptedControl(
        {
            ("GET", "/queue"): lambda _: (200, queue[0]),
            ("POST", "/free"): lambda _: (200, {}),
        }
    )
    clock = Clock()
    unloaded = Deferred.fromCoroutine(ADAPTER.unload(control, comfy(), clock, 5.0))
    clock.advance(0.5)
    assert_no_result(unloaded)
    assert "/free" not in control.paths("POST")
    queue[0] = queue_of()
    clock.advance(0.5)
    success_result_of(unloaded)
    assert control.paths("POST") == ["/free"]


def test_a_queue_that_never_drains_fails_the_unload_as_busy() -> None:
    control = ScriptedControl({("GET", "/queue"): lambda _: (200, queue_of("theirs"))})
    clock = Clock()
    unloaded = Deferred.fromCoroutine(ADAPTER.unload(control, comfy(timeout=3), clock, 5.0))
    for _ in range(7):
        clock.advance(0.5)
    failure = failure_result_of(unloaded, ControlFailed)
    assert "busy with work submitted around the daemon" in str(failure.value)
    assert control.paths("POST") == []


def test_a_failed_queue_poll_delays_free_but_does_not_fail_the_unload() -> None:
    answers = [(500, None), (200, queue_of())]
    control = ScriptedControl(
        {
            ("GET", "/queue"): lambda _: answers.pop(0),
            ("POST", "/free"): lambda _: (200, {}),
        }
    )
    clock = Clock()
    unloaded = Deferred.fromCoroutine(ADAPTER.unload(control, comfy(), clock, 5.0))
    assert "/free" not in control.paths("POST")
    clock.advance(0.5)
    success_result_of(unloaded)
    assert control.paths("POST") == ["/free"]


def test_a_failed_queue_read_keeps_the_residency_reading() -> None:
    control = ScriptedControl({("GET", "/queue"): lambda _: (500, None)})
    health = {"devices": [{"torch_vram_total": 9000 * MIB}]}
    seen = success_result_of(
        Deferred.fromCoroutine(ADAPTER.observe(control, comfy().config, health, 1.0))
    )
    assert (seen.resident, seen.measured_mib, seen.busy) == (True, 9000, None)
