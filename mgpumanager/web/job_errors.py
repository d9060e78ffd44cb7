"""
What the daemon's answer to a GPU job says about its time on the GPU, in HTTP.

The scheduler says *why* a job was refused and *how long* it waited and
prepared, as numbers (:mod:`mgpumanager.scheduling.refusals`); this module is
the one place that writes them as headers: ``Server-Timing`` on every job's
answer, errors included, so a client can tell a slow queue from a slow load,
and ``Retry-After`` on a refusal a retry may get past.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from mgpumanager.common.errors import ApiError, JobTiming
from mgpumanager.scheduling.refusals import QueueFull, QueueTimedOut


def server_timing(timing: JobTiming) -> str:
    """The ``Server-Timing`` of a job's answer: its wait for the GPU, then making room."""
    return f"queue;dur={timing.queue_ms}, prepare;dur={timing.prepare_ms}"


def with_job_headers(error: ApiError) -> ApiError:
    """
    ``error``, which ended or refused a GPU job, with the headers its numbers
    call for (headers it already has win); returned for chaining.
    """
    if isinstance(error, QueueFull | QueueTimedOut):
        error.headers.setdefault("Retry-After", str(error.retry_after))
    if error.timing is not None:
        error.headers.setdefault("Server-Timing", server_timing(error.timing))
    return error


def job_failure_headers(failure: Failure) -> Failure:
    """An errback: a GPU job's failure, with :func:`with_job_headers` when it is ours."""
    if isinstance(failure.value, ApiError):
        with_job_headers(failure.value)
    return failure
