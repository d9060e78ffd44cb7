"""
The global GPU scheduler: one job on the card at a time, the rest queue.

Two inference servers running at once is exactly how the card runs out of memory,
so every proxied GPU job, whatever its consumer, holds one ``DeferredLock`` for
the whole exchange: until the response body has been relayed to the client or the
exchange failed.  Making room (unloading other consumers) and loading the target
happen *inside* the held lock, so nothing is ever unloaded under a running job.

The scheduler knows nothing of HTTP: it runs a job callable and keeps the numbers
``/v1/status`` shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    ensureDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mgpumanager.errors import (
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    SCHEDULER_ERROR,
    SHUTTING_DOWN,
    ApiError,
)
from mgpumanager.gpu import rfc3339
from mgpumanager.registry import ConsumerState, Registry

log = Logger()

_T = TypeVar("_T")


#: Makes a consumer ready to run a job (room on the card, model loaded).
#: Called with the GPU lock held; raising fails the job.
Preparer = Callable[[str], "Coroutine[Any, Any, None] | Deferred[None]"]


async def _nothing_to_prepare(consumer: str) -> None:
    return None


@attrs.define
class _Waiter:
    consumer: str
    enqueued: float
    priority: int = 0
    acquiring: Deferred[DeferredLock] | None = None
    refused: ApiError | None = None


class GpuScheduler:
    """
    :param clock: for wait and run timings.
    :param registry: per-consumer counters (active, total requests, last used).
    :param prepare: the make-room-and-load step, run under the lock before each job.
    :param max_depth: jobs allowed to wait; one more is refused with ``queue_full``.
    :param max_wait: seconds a job may wait before it gives up with ``queue_timeout``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        prepare: Preparer = _nothing_to_prepare,
        max_depth: int = 512,
        max_wait: float = 600.0,
    ) -> None:
        self._clock = clock
        self._max_depth = max_depth
        self._max_wait = max_wait
        self._registry = registry
        self._prepare = prepare
        self._lock = DeferredLock()
        self._waiters: list[_Waiter] = []
        self._closed: ApiError | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self._running: set[Deferred[Any]] = set()
        self.in_flight = 0
        self.total_jobs = 0
        self.failed_jobs = 0
        self.cancelled_jobs = 0
        self.last_wait_ms: int | None = None
        self.last_run_ms: int | None = None
        self.refused_queue_full = 0
        self.queue_timeouts = 0

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def submit(self, consumer: str, job: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """
        Run ``job`` for ``consumer`` when the GPU is free and the consumer is
        ready.  Cancelling the result while queued leaves the queue at once;
        cancelling it while running cancels the job.  Either way the lock is
        released.
        """
        return Deferred.fromCoroutine(self._run(consumer, job))

    async def _run(self, consumer: str, job: Callable[[], Deferred[_T]]) -> _T:
        if self._closed is not None:
            raise self._closed
        if self._lock.locked and len(self._waiters) >= self._max_depth:
            self.refused_queue_full += 1
            raise ApiError(
                QUEUE_FULL,
                f"{len(self._waiters)} jobs are already waiting for the GPU",
                headers={"Retry-After": str(self._retry_after())},
            )
        waiter = _Waiter(
            consumer=consumer,
            enqueued=self._clock.seconds(),
            priority=self._registry[consumer].config.priority,
        )
        self._waiters.append(waiter)
        waiter.acquiring = self._lock.acquire()
        timer = None
        if not waiter.acquiring.called:
            self._queue_by_priority(waiter)
            timer = self._clock.callLater(self._max_wait, self._give_up, waiter)
        try:
            await waiter.acquiring
        except CancelledError:
            if waiter.refused is not None:
                raise waiter.refused from None
            self.cancelled_jobs += 1
            raise
        finally:
            self._waiters.remove(waiter)
            if timer is not None and timer.active():
                timer.cancel()

        started = self._clock.seconds()
        self.last_wait_ms = round((started - waiter.enqueued) * 1000)
        self.in_flight += 1
        self.total_jobs += 1
        state = self._registry[consumer]
        state.active += 1
        state.total_requests += 1
        succeeded = abandoned = False
        try:
            try:
                await self._hold(ensureDeferred(self._prepare(consumer)))
            except (ApiError, CancelledError):
                raise
            except Exception as e:
                log.failure("preparing {consumer} failed", consumer=consumer)
                raise ApiError(
                    SCHEDULER_ERROR, f"scheduler failed to prepare {consumer}: {e}", consumer
                ) from e
            result = await self._hold(job())
            succeeded = True
            return result
        except CancelledError:
            self.cancelled_jobs += 1
            raise
        except GeneratorExit:
            # The coroutine is being garbage-collected, abandoned by everyone
            # (only ever in tests that drop a scheduler mid-job): releasing
            # the lock now would resume other coroutines being torn down too.
            abandoned = True
            raise
        except BaseException:
            self.failed_jobs += 1
            raise
        finally:
            if not abandoned:
                self._finish_job(state, started, succeeded)

    def _finish_job(self, state: ConsumerState, started: float, succeeded: bool) -> None:
        """The job is over: record it and hand the GPU to the next one."""
        finished = self._clock.seconds()
        self.last_run_ms = round((finished - started) * 1000)
        state.active -= 1
        if succeeded:
            state.last_used = finished
        self.in_flight -= 1
        self._lock.release()
        if self.in_flight == 0 and not self._waiters:
            self._notify_idle()

    async def _hold(self, step: Deferred[_T]) -> _T:
        """Await a step of a running job, cancellable by :meth:`abort_running`."""
        self._running.add(step)
        try:
            return await step
        finally:
            self._running.discard(step)

    def close(self, reason: str = "the daemon is shutting down") -> None:
        """
        Refuse new jobs and answer every queued one with a retryable
        ``shutting_down`` error; jobs already running carry on.
        """
        self._closed = ApiError(SHUTTING_DOWN, reason)
        for waiter in list(self._waiters):
            waiter.refused = self._closed
            if waiter.acquiring is not None:
                waiter.acquiring.cancel()
        if self.in_flight == 0:
            self._notify_idle()

    def _queue_by_priority(self, waiter: _Waiter) -> None:
        """
        Move a new waiter ahead of every waiter of lower priority: the lock
        serves its queue in order, first come first served within a priority.
        """
        queued = self._lock.waiting
        assert waiter.acquiring is not None and queued[-1] is waiter.acquiring
        position = len(self._waiters) - 1
        while position > 0 and self._waiters[position - 1].priority < waiter.priority:
            position -= 1
        if position == len(self._waiters) - 1:
            return
        self._waiters.insert(position, self._waiters.pop())
        # The lock's queue and ours hold the same waiters in the same order.
        offset = len(queued) - len(self._waiters)
        queued.insert(offset + position, queued.pop())

    def _give_up(self, waiter: _Waiter) -> None:
        self.queue_timeouts += 1
        waiter.refused = ApiError(
            QUEUE_TIMEOUT,
            f"waited {self._max_wait:g} s for the GPU without getting it",
            waiter.consumer,
            headers={"Retry-After": str(self._retry_after())},
        )
        assert waiter.acquiring is not None
        waiter.acquiring.cancel()

    def _retry_after(self) -> int:
        """Seconds until a retry might find room: the queue at the last job's pace."""
        per_job = (self.last_run_ms or 1000) / 1000
        return max(1, min(600, math.ceil(per_job * (len(self._waiters) + 1))))

    def abort_running(self) -> None:
        """Cancel every running job, preparing or relaying (the shutdown grace is over)."""
        for running in list(self._running):
            running.cancel()

    def when_idle(self) -> Deferred[None]:
        """Fires once no job runs and none waits."""
        if self.in_flight == 0 and not self._waiters:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def as_status(self) -> dict[str, Any]:
        oldest = min((w.enqueued for w in self._waiters), default=None)
        return {
            "queue_depth": self.queue_depth,
            "in_flight": self.in_flight,
            "total_jobs": self.total_jobs,
            "failed_jobs": self.failed_jobs,
            "cancelled_jobs": self.cancelled_jobs,
            "last_wait_ms": self.last_wait_ms,
            "last_run_ms": self.last_run_ms,
            "oldest_queued": rfc3339(oldest),
            "max_depth": self._max_depth,
            "refused_queue_full": self.refused_queue_full,
            "queue_timeouts": self.queue_timeouts,
        }
