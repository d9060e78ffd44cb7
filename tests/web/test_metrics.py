"""
Tests for :mod:`mgpumanager.web.metrics` in memory: each job outcome under its
label and with its duration, waits observed where the scheduler starts a job,
the routes that serve the figures, the gauges of each card under its ``card``
label, and the page chosen by ``Accept``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mgpumanager.common.errors import QUEUE_FULL, ApiError
from mgpumanager.relay.streaming import UpstreamBroke
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.metrics import MIB, Metrics
from tests.scheduling.test_scheduler import CONFIG, Jobs
from tests.web.test_api import BASE, World, success_result_of
from tests.web.test_status_cards import SAMPLES, busy_host


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def job_count(metrics: Metrics, consumer: str, kind: str, outcome: str) -> float | None:
    labels = (("consumer", consumer), ("kind", kind), ("outcome", outcome))
    return samples(metrics).get(("mgpumanager_jobs_total", labels))


def test_each_outcome_is_counted_under_its_label() -> None:
    metrics = Metrics(Clock())
    ends: list[Deferred[Any]] = [
        succeed(b"done"),
        fail(UpstreamBroke()),
        fail(ApiError(QUEUE_FULL, "full")),
        fail(RuntimeError("a bug")),
    ]
    for end in ends:
        metrics.job("voice", "tts").ended(end).addErrback(lambda _: None)
    cancelled: Deferred[None] = Deferred()
    metrics.job("voice", "tts").ended(cancelled).addErrback(lambda _: None)
    cancelled.cancel()
    metrics.job_refused("", "image", "no_consumer")
    for outcome in ("ok", "upstream_failed", "queue_full", "internal_error", "cancelled"):
        assert job_count(metrics, "voice", "tts", outcome) == 1, outcome
    assert job_count(metrics, "", "image", "no_consumer") == 1


def test_a_job_lasts_from_getting_the_gpu_to_its_end() -> None:
    clock = Clock()
    metrics = Metrics(clock)
    watch = metrics.job("llm", "llm")
    answer: Deferred[bytes] = Deferred()
    ended = watch.ended(Deferred.fromCoroutine(_after(5.0, clock, watch.running(lambda: answer))))
    clock.advance(5.0)  # waiting for the GPU: not part of the duration
    clock.advance(2.5)
    answer.callback(b"relayed")
    assert success_result_of(ended) == b"relayed"
    found = samples(metrics)
    labels = (("consumer", "llm"), ("kind", "llm"))
    assert found[("mgpumanager_job_duration_seconds_sum", labels)] == 2.5
    assert found[("mgpumanager_job_duration_seconds_bucket", (*labels, ("le", "2.5")))] == 1
    assert found[("mgpumanager_job_duration_seconds_bucket", (*labels, ("le", "1.0")))] == 0


async def _after(delay: float, clock: Clock, job: Any) -> Any:
    waited: Deferred[None] = Deferred()
    clock.callLater(delay, waited.callback, None)
    await waited
    return await job()


def test_the_scheduler_reports_each_wait_for_the_gpu() -> None:
    clock = Clock()
    metrics = Metrics(clock)
    scheduler = GpuScheduler(clock, Registry(CONFIG), queue=CONFIG.queue, telemetry=metrics)
    jobs = Jobs()
    scheduler.submit("voice", jobs.job("first"))
    scheduler.submit("llm", jobs.job("second"))
    clock.advance(3.0)
    jobs.finish("first")
    found = samples(metrics)
    wait = "mgpumanager_queue_wait_seconds_sum"
    assert found[(wait, (("class", "interactive"), ("consumer", "voice")))] == 0
    assert found[(wait, (("class", "interactive"), ("consumer", "llm")))] == 3.0


def test_metrics_route_serves_the_text_format_with_the_gauges_from_status() -> None:
    world = World()
    response = success_result_of(world.stub.get(BASE + "/metrics"))
    assert response.headers.getRawHeaders("content-type") == [
        "text/plain; version=0.0.4; charset=utf-8"]
    text = success_result_of(response.text())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    status = world.app.status_document()
    assert families["mgpumanager_queue_depth"].samples[0].value == 0
    up = {s.labels["consumer"] for s in families["mgpumanager_consumer_up"].samples}
    assert up == {c["name"] for c in status["consumers"]}
    assert "mgpumanager_gpu_memory_used_bytes" not in families  # no sample yet


def test_the_card_gauges_carry_the_card_label() -> None:
    host = busy_host()  # a job on each card of two, one waiting; card 1 not read
    metrics = Metrics(host.clock)
    metrics.watch_status(lambda: host.status(SAMPLES))
    found = samples(metrics)

    def card(name: str, index: int) -> float | None:
        return found.get((f"mgpumanager_{name}", (("card", str(index)),)))

    assert card("jobs_running", 0) == 1 and card("jobs_running", 1) == 1
    assert card("card_yielded", 0) == 0 and card("card_yielded", 1) == 0
    assert card("gpu_memory_total_bytes", 0) == 24576 * MIB
    assert card("gpu_memory_used_bytes", 0) == 10000 * MIB
    assert card("gpu_memory_free_bytes", 0) == 14576 * MIB
    assert card("gpu_guest_bytes", 0) == 0
    # Card 1 has no reading: its memory and guests are absent, not zero.
    for name in ("gpu_memory_total_bytes", "gpu_memory_used_bytes", "gpu_guest_bytes"):
        assert card(name, 1) is None, name
    assert found[("mgpumanager_queue_depth", ())] == 1


def test_the_index_is_the_page_for_browsers_and_text_for_others() -> None:
    world = World()
    browser = success_result_of(world.stub.get(BASE + "/", headers={
        "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}))
    assert browser.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert b"<html" in success_result_of(browser.content()).lower()
    for accept in ("*/*", "text/html;q=0, text/plain", None):
        headers = {"Accept": accept} if accept else {}
        other = success_result_of(world.stub.get(BASE + "/", headers=headers))
        assert other.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
        assert b"GET /v1/status" in success_result_of(other.content())


def test_a_failure_keeps_its_result_for_the_caller() -> None:
    metrics = Metrics(Clock())
    broke = metrics.job("voice", "tts").ended(fail(UpstreamBroke()))
    failures: list[Failure] = []
    broke.addErrback(failures.append)
    assert failures and failures[0].check(UpstreamBroke)
