"""
Why the scheduler answers a job with no instead of running it: typed, with the
numbers a client needs (how long to wait before retrying, how long it waited),
never the headers that carry them.  The web layer writes those
(:mod:`mgpumanager.web.job_errors`); the scheduler knows no HTTP.

Each is one of the daemon's own errors (:class:`ApiError`), with its code, so
whoever only cares that a job was refused need not know which refusal it was.
"""

from __future__ import annotations

from mgpumanager.common.errors import (
    NO_CONSUMER,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    SHUTTING_DOWN,
    ApiError,
    JobTiming,
)

#: What a job refused before it queued waited and prepared: nothing.
NOT_RUN = JobTiming(queue_ms=0, prepare_ms=0)


class QueueFull(ApiError):
    """
    ``max_depth`` jobs already wait.

    :param waiting: how many.
    :param retry_after: seconds until a retry might find room.
    """

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(QUEUE_FULL, f"{waiting} jobs are already waiting for the GPU")
        self.waiting = waiting
        self.retry_after = retry_after
        self.timing = NOT_RUN


class QueueTimedOut(ApiError):
    """
    A job waited its whole ``max_wait_seconds`` without getting the GPU.

    :param waited: seconds it waited.
    :param retry_after: seconds until a retry might find room.
    """

    def __init__(self, consumer: str, waited: float, retry_after: int) -> None:
        super().__init__(
            QUEUE_TIMEOUT, f"waited {waited:g} s for the GPU without getting it", consumer
        )
        self.waited = waited
        self.retry_after = retry_after
        self.timing = JobTiming(queue_ms=round(waited * 1000), prepare_ms=0)


class ShuttingDown(ApiError):
    """The daemon is stopping: no new job, and none that waited, will run."""

    def __init__(self, reason: str) -> None:
        super().__init__(SHUTTING_DOWN, reason)


class NoConsumer(ApiError):
    """The job's consumer is gone (a reload removed it)."""

    def __init__(self, message: str, consumer: str | None = None) -> None:
        super().__init__(NO_CONSUMER, message, consumer)
