"""
What the scheduler, the lifecycle and the job runner tell an observer as they
work: one small interface, called at the very points where the counters that
``/v1/status`` shows change, so that the metrics can never drift from them.

The default observer does nothing; :class:`mgpumanager.web.metrics.Metrics` turns
the calls into Prometheus counters and histograms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred

from mgpumanager.scheduling.queued import QueuedJob

_T = TypeVar("_T")

#: Eviction outcomes: the memory came back; the unload failed or the memory
#: stayed; unloaded, but without NVML nobody could check.
UNLOADED = "unloaded"
FAILED = "failed"
NOT_VERIFIED = "not_verified"
#: A job's outcome when the server's work outlived ``completion.timeout_seconds``
#: (a job's result says so; it is no failure: the client had its answer).
COMPLETION_TIMEOUT = "completion_timeout"


class JobWatch(Protocol):
    """Follows one GPU job from its submission to its end."""

    def running(self, job: Callable[[], Deferred[_T]]) -> Callable[[], Deferred[_T]]:
        """``job``, noting when it gets the GPU (its duration starts there)."""

    def ended(self, outcome: Deferred[_T]) -> Deferred[_T]:
        """``outcome``, unchanged, recorded once it fires."""


class Telemetry(Protocol):
    """The observer the daemon's components report to."""

    def job(self, consumer: str, kind: str) -> JobWatch:
        """A watch for one job of ``kind`` for ``consumer``."""

    def job_refused(self, consumer: str, kind: str, code: str) -> None:
        """A job refused before it could queue (``consumer`` is "" when none)."""

    def waited(self, job: QueuedJob, seconds: float) -> None:
        """A queued job got the GPU after ``seconds``; ``job`` is its queue view."""

    def unloaded(self, victim: str, seconds: float) -> None:
        """An unload call returned after ``seconds``."""

    def evicted(self, victim: str, outcome: str) -> None:
        """An eviction ended: :data:`UNLOADED`, :data:`FAILED` or :data:`NOT_VERIFIED`."""

    def loaded(self, consumer: str, seconds: float) -> None:
        """A load finished after ``seconds``."""


class _NoWatch:
    def running(self, job: Callable[[], Deferred[_T]]) -> Callable[[], Deferred[_T]]:
        return job

    def ended(self, outcome: Deferred[_T]) -> Deferred[_T]:
        return outcome


class NoTelemetry:
    """Observes nothing: the default, for components built without metrics."""

    def job(self, consumer: str, kind: str) -> JobWatch:
        return _NoWatch()

    def job_refused(self, consumer: str, kind: str, code: str) -> None:
        pass

    def waited(self, job: QueuedJob, seconds: float) -> None:
        pass

    def unloaded(self, victim: str, seconds: float) -> None:
        pass

    def evicted(self, victim: str, outcome: str) -> None:
        pass

    def loaded(self, consumer: str, seconds: float) -> None:
        pass


NO_TELEMETRY: Telemetry = NoTelemetry()
