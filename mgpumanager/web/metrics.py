"""
``GET /metrics``: the daemon's figures in Prometheus' text format, through
``prometheus_client`` (a well-kept library writes the exposition format better
than code of ours would).

Two sources, no bookkeeping of our own: counters and histograms are observed
through :class:`~mgpumanager.scheduling.telemetry.Telemetry` at the points where the
status counters change, and the gauges are read at scrape time from the very
``/v1/status`` document, so a scrape and a status read always agree.  Each
daemon has its own registry: two in one process (the tests) never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mgpumanager.common.errors import INTERNAL_ERROR, ApiError
from mgpumanager.relay.streaming import UpstreamBroke
from mgpumanager.scheduling.queued import QueuedJob
from mgpumanager.scheduling.telemetry import COMPLETION_TIMEOUT, JobWatch

_T = TypeVar("_T")
_M = TypeVar("_M", Counter, Histogram)

#: Prometheus' own content type for the text format, version 0.0.4.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024

#: GPU work takes from tens of milliseconds (a cached TTS line) to minutes (a
#: model load, an image batch): 10 ms to 10 min.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0)

StatusSource = Callable[[], dict[str, Any]]



def job_outcome(result: object) -> str:
    """
    The outcome label of a finished job: ``ok`` when the answer was relayed to
    the end, whatever the upstream's status; else why not.
    """
    if result == COMPLETION_TIMEOUT:
        return COMPLETION_TIMEOUT
    if not isinstance(result, Failure):
        return "ok"
    error = result.value
    if isinstance(error, CancelledError):
        return "cancelled"
    if isinstance(error, UpstreamBroke):
        return "upstream_failed"
    if isinstance(error, ApiError):
        return error.kind.code
    code = getattr(error, "outcome", None)
    return code if isinstance(code, str) else INTERNAL_ERROR.code


class Metrics:
    """
    The Prometheus side of :class:`~mgpumanager.scheduling.telemetry.Telemetry`.

    :param clock: times a job from when it gets the GPU.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._jobs = Counter(
            "mgpumanager_jobs", "GPU jobs by how they ended",
            ["consumer", "kind", "outcome"], registry=self.registry)
        self._waits = Histogram(
            "mgpumanager_queue_wait_seconds", "Time a job waited for the GPU",
            ["consumer", "class"], buckets=BUCKETS, registry=self.registry)
        self._durations = Histogram(
            "mgpumanager_job_duration_seconds", "Time a job ran once its consumer was ready",
            ["consumer", "kind"], buckets=BUCKETS, registry=self.registry)
        self._loads = Histogram(
            "mgpumanager_load_duration_seconds", "Time a consumer took to load",
            ["consumer"], buckets=BUCKETS, registry=self.registry)
        self._unloads = Histogram(
            "mgpumanager_unload_duration_seconds", "Time an unload call took",
            ["consumer"], buckets=BUCKETS, registry=self.registry)
        self._evictions = Counter(
            "mgpumanager_evictions", "Evictions by victim and outcome",
            ["victim", "outcome"], registry=self.registry)
        # The labelled series each job touches, looked up once per label values:
        # prometheus_client's ``labels`` checks, converts and locks on every call.
        self._job_counts: dict[tuple[str, ...], Counter] = {}
        self._job_durations: dict[tuple[str, ...], Histogram] = {}
        self._wait_times: dict[tuple[str, ...], Histogram] = {}

    def watch_status(self, status: StatusSource) -> None:
        """Read the gauges from ``status`` (the ``/v1/status`` document) at each scrape."""
        self.registry.register(_StatusGauges(status))

    def exposition(self) -> bytes:
        """The current figures in the text format."""
        return generate_latest(self.registry)

    def job(self, consumer: str, kind: str) -> JobWatch:
        return _TimedJob(self, consumer, kind)

    def job_ended(self, consumer: str, kind: str, outcome: str, seconds: float | None) -> None:
        _series(self._job_counts, self._jobs, consumer, kind, outcome).inc()
        if seconds is not None:
            _series(self._job_durations, self._durations, consumer, kind).observe(seconds)

    def job_refused(self, consumer: str, kind: str, code: str) -> None:
        _series(self._job_counts, self._jobs, consumer, kind, code).inc()

    def waited(self, job: QueuedJob, seconds: float) -> None:
        _series(self._wait_times, self._waits, job.consumer, job.job_class).observe(seconds)

    def unloaded(self, victim: str, seconds: float) -> None:
        self._unloads.labels(victim).observe(seconds)

    def evicted(self, victim: str, outcome: str) -> None:
        self._evictions.labels(victim, outcome).inc()

    def loaded(self, consumer: str, seconds: float) -> None:
        self._loads.labels(consumer).observe(seconds)

    def now(self) -> float:
        return self._clock.seconds()


def _series(cache: dict[tuple[str, ...], _M], metric: _M, *labels: str) -> _M:
    """
    ``metric.labels(*labels)``, remembered in ``cache``.  A series is made on
    its first use, as before, so the exposition shows the same series; it is
    never removed (prometheus_client keeps it too).
    """
    series = cache.get(labels)
    if series is None:
        series = cache[labels] = metric.labels(*labels)
    return series


class _TimedJob:
    """One job: its duration runs from getting the GPU to its end."""

    def __init__(self, metrics: Metrics, consumer: str, kind: str) -> None:
        self._metrics = metrics
        self._consumer = consumer
        self._kind = kind
        self._started: float | None = None

    def running(self, job: Callable[[], Deferred[_T]]) -> Callable[[], Deferred[_T]]:
        def started() -> Deferred[_T]:
            self._started = self._metrics.now()
            return job()

        return started

    def ended(self, outcome: Deferred[_T]) -> Deferred[_T]:
        def record(result: Any) -> Any:
            seconds = None if self._started is None else self._metrics.now() - self._started
            self._metrics.job_ended(self._consumer, self._kind, job_outcome(result), seconds)
            return result

        return outcome.addBoth(record)


class _StatusGauges(Collector):
    """The gauges, read from one status document per scrape."""

    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        # Described lazily: building a status document at registration is wasted work.
        return []

    def collect(self) -> Iterator[Metric]:
        document = self._status()
        scheduler = document["scheduler"]
        yield _gauge("queue_depth", "Jobs waiting for the GPU", scheduler["queue_depth"])
        up = GaugeMetricFamily("mgpumanager_consumer_up",
                               "Whether the last health probe succeeded", labels=["consumer"])
        resident = GaugeMetricFamily("mgpumanager_consumer_resident",
                                     "Whether the consumer's model is on the card",
                                     labels=["consumer"])
        vram = GaugeMetricFamily("mgpumanager_consumer_vram_bytes",
                                 "The card memory the budget counts for the consumer",
                                 labels=["consumer"])
        for consumer in document["consumers"]:
            name = [consumer["name"]]
            up.add_metric(name, 1.0 if consumer["healthy"] else 0.0)
            resident.add_metric(name, 1.0 if consumer["loaded"] else 0.0)
            vram.add_metric(name, float(consumer["size_mib"] * MIB))
        yield from (up, resident, vram)
        yield from _card_gauges(document["gpus"])


def _card_gauges(cards: list[dict[str, Any]]) -> Iterator[Metric]:
    """
    The gauges of each card, labelled ``card``: the job holding it, whether
    it is yielded to guests, and (only for a card with a reading: absent, not
    zero, without one) its memory and what its guests hold.
    """
    running = _card_family("jobs_running", "Jobs holding the card")
    yielded = _card_family("card_yielded", "Whether the card is yielded to guests")
    memory = {
        figure: _card_family(f"gpu_memory_{figure}_bytes", f"Card memory {figure}")
        for figure in ("total", "used", "free")
    }
    guests = _card_family("gpu_guest_bytes", "Card memory held by guests (no consumer's)")
    for card in cards:
        label = [str(card["index"])]
        running.add_metric(label, 0.0 if card["running"] is None else 1.0)
        yielded.add_metric(label, 0.0 if card["yielded"] is None else 1.0)
        if card["used_mib"] is None:
            continue  # no sample
        for figure, family in memory.items():
            if card[f"{figure}_mib"] is not None:
                family.add_metric(label, float(card[f"{figure}_mib"] * MIB))
        guests.add_metric(label, float(card["guest_mib"] * MIB))
    yield from (running, yielded)
    # A family without samples is left out, as the one-card daemon left out
    # the card's memory before its first sample.
    yield from (family for family in (*memory.values(), guests) if family.samples)


def _card_family(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"mgpumanager_{name}", documentation, labels=["card"])


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"mgpumanager_{name}", documentation, value=float(value))
