"""
The GPU scheduler: one job on a card at a time, the rest queue.

Two inference servers running at once on a card is exactly how it runs out of
memory, so every proxied GPU job holds the ``DeferredLock`` of each card its
consumer uses for the whole exchange: until the response body has been relayed
to the client or the exchange failed.  Making room (unloading other consumers)
and loading the target happen *inside* the held locks, so nothing is ever
unloaded under a running job.  Jobs on different cards run at the same time
(:mod:`mgpumanager.scheduling.cards`).

Waiting jobs sit in the scheduler's own queue, not in the locks': whenever a
card frees, a :class:`Chooser` picks which waiter starts next among those whose
cards are free, so a scheduling policy is one object handed in, never a
reordering of Twisted's internals.

The scheduler knows nothing of HTTP: it runs a job callable, keeps the numbers
``/v1/status`` shows, and refuses with typed errors that carry numbers
(:mod:`.refusals`), which the web layer writes as headers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    fail,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.common.errors import SCHEDULER_ERROR, ApiError, JobTiming
from mgpumanager.config.document import Config
from mgpumanager.config.scheduling import INTERACTIVE
from mgpumanager.scheduling.cards import startable
from mgpumanager.scheduling.queued import (
    Chooser,
    PriorityThenArrival,
    QueueDecision,
    QueuedJob,
    RunningJob,
    WatchingChooser,
)
from mgpumanager.scheduling.refusals import NoConsumer, QueueFull, QueueTimedOut, ShuttingDown
from mgpumanager.scheduling.scheduler_state import (
    SchedulerState,
)
from mgpumanager.scheduling.waiting_room import Waiter
from mgpumanager.state.registry import ConsumerState

log = Logger()

#: Re-exported: the queue's views and the chooser seam live in :mod:`.queued`.
__all__ = ["Chooser", "GpuScheduler", "PriorityThenArrival", "QueuedJob", "RunningJob",
           "WatchingChooser"]

_T = TypeVar("_T")


class GpuScheduler(SchedulerState):
    """
    Moves jobs through the queue: admits them, gives the free cards to the
    chooser's picks (holds first), runs each job under its cards' locks and
    hands them on, refuses what it must.  Constructed as
    :class:`~mgpumanager.scheduling.scheduler_state.SchedulerState` is.
    """

    def submit(
        self,
        consumer: str,
        job: Callable[[], Deferred[_T]],
        *,
        kind: str = "",
        job_class: str = INTERACTIVE,
        priority: int | None = None,
    ) -> Deferred[_T]:
        """
        Run ``job`` for ``consumer`` when the chooser gives it the GPU and the
        consumer is ready.  Cancelling the result while queued leaves the queue
        at once; cancelling it while running cancels the job.  Either way the
        lock is released.

        :param priority: the job's own; the consumer's when not given.
        :param job: returns a Deferred of its own, made for this call: a job
            that starts at once is answered with it, the scheduler's
            bookkeeping added to its callbacks.
        """
        if self._closed is not None:
            return fail(self._closed)
        cards = self._cards_of(consumer)
        must_wait = (bool(self._waiting) or not self._cards.free(cards)
                     or not self.holds.asked.isdisjoint(cards))
        if must_wait and len(self._waiting) >= self._max_depth:
            self.refused_queue_full += 1
            return fail(QueueFull(len(self._waiting), self._retry_after()))
        self._next_id += 1
        if priority is None:
            priority = self._registry[consumer].config.priority
        view = QueuedJob(self._next_id, consumer, priority, self._clock.seconds(),
                         kind=kind, job_class=job_class)
        waiter = Waiter(view, Deferred(lambda _: self._cancelled(waiter)))
        self._waiting.add(waiter)
        self._dispatch()
        if waiter.granted.called:
            # Started at once (a free card, nobody ahead): the job's own
            # Deferred, not one more layer chained behind the grant.
            return self._start(view, job)
        waiter.timer = self._clock.callLater(self._max_wait, self._give_up, waiter)
        return waiter.granted.addCallback(lambda _: self._start(view, job))

    def _dispatch(self) -> None:
        """
        Give the GPU to the chooser's pick if it is free.  A job that ends at
        once starts the next from here: the loop, not recursion, serves it, so a
        long queue of jobs failing synchronously cannot exhaust the stack.
        """
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = self._dispatch_again = True
        try:
            while self._dispatch_again:
                self._dispatch_again = False
                self._dispatch_once()
        finally:
            self._dispatching = False

    def _dispatch_once(self) -> None:
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None
        if self.holds:
            self.holds.serve()
        if not self._waiting or self._closed is not None:
            return
        waiting, now = self._views(), self._clock.seconds()
        candidates = self._startable(waiting, now)
        if not candidates:
            return
        chosen = self._chooser.pick(candidates, now)
        if chosen is None:
            at = self._chooser.recheck_at(candidates, now)
            if at is not None:
                self._recheck = self._clock.callLater(max(0.0, at - now), self._dispatch)
            return
        waiter = self._waiting.leave(chosen.id)
        ahead_of = self._waiting.started(chosen, self._cards_of)
        if self._watcher is not None:
            rule = self._watcher.job_started(chosen, now)
            if ahead_of:
                self.decisions.append(QueueDecision(now, "pick", chosen, rule, tuple(ahead_of)))
        self._cards.take(self._cards_of(chosen.consumer))
        waiter.granted.callback(None)
        # Another card may still be free for another job (a job that ended
        # at once has asked for another round already).
        if self._waiting:
            self._dispatch_again = True

    def _startable(self, waiting: list[QueuedJob], now: float) -> list[QueuedJob]:
        """The waiting jobs that may start now, on cards that are free."""
        busy = self._cards.busy().union(self.holds.asked)
        if not busy:
            return waiting
        cards_of = self._cards_of
        # By consumer, not by job: 63 jobs waiting are a handful of consumers.
        if all(not busy.isdisjoint(cards_of(name)) for name in {job.consumer for job in waiting}):
            return []
        return startable(self._chooser.run_order(waiting, now), cards_of, busy)

    def _cancelled(self, waiter: Waiter) -> None:
        """The caller gave up waiting (its client went away)."""
        self.cancelled_jobs += 1
        self._refuse(waiter, None)

    def _refuse(self, waiter: Waiter, refusal: ApiError | None) -> None:
        """Take a waiter out of the queue; an idle chooser may now decide otherwise."""
        self._waiting.leave(waiter.view.id)
        if refusal is not None:
            waiter.granted.errback(refusal)
        self._dispatch()
        self._notify_if_idle()

    def _start(self, view: QueuedJob, job: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """The job holds the GPU lock: count it, prepare its consumer, run it."""
        cards = self.cards_of(view.consumer)
        if view.consumer not in self._registry:
            # Gone since it queued (a reload refuses such jobs first; this is
            # the belt to those braces): hand the cards on, never keep them.
            self._cards.release(cards)
            self._dispatch()
            self._notify_if_idle()
            return fail(NoConsumer(f"consumer {view.consumer} no longer exists"))
        started = self._clock.seconds()
        run = self._runs[view.id] = RunningJob(view, started, cards=cards)
        self.last_wait_ms = round((started - view.arrived) * 1000)
        self._telemetry.waited(view, started - view.arrived)
        self.in_flight += 1
        self.total_jobs += 1
        state = self._registry[view.consumer]
        state.active += 1
        state.total_requests += 1
        # Deferreds chained by hand, not a coroutine: this runs on every job,
        # and each coroutine layer is one more Deferred to start and resume.
        return self._prepare_then_run(run, job).addBoth(self._finish, state, run)

    def _prepare_then_run(self, run: RunningJob, job: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Make the consumer ready, then run the job; nothing waits when nothing is to do."""
        consumer = run.view.consumer
        try:
            preparing = self._prepare(consumer)
        except Exception:
            return fail(_preparing_failed(Failure(), consumer))
        if preparing is None:
            return self._run(run, job)
        prepared: Deferred[None] = self._held(ensureDeferred(preparing))
        return prepared.addCallbacks(
            lambda _: self._run(run, job), _preparing_failed, errbackArgs=(consumer,)
        )

    def _run(self, run: RunningJob, job: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        run.relaying(self._clock.seconds())
        self._starting = run
        try:
            started = job()
        except Exception:
            return fail()
        finally:
            self._starting = None
        return self._held(started)

    def _finish(self, result: _T | Failure, state: ConsumerState, run: RunningJob) -> _T | Failure:
        """The job is over: record it and hand its cards to the next ones."""
        finished = self._clock.seconds()
        self.last_run_ms = round((finished - run.started) * 1000)
        state.active -= 1
        if not isinstance(result, Failure):
            state.last_used = finished
        elif result.check(CancelledError):
            self.cancelled_jobs += 1
        else:
            self.failed_jobs += 1
        self.in_flight -= 1
        self._runs.pop(run.view.id, None)
        if isinstance(result, Failure):
            _time_the_error(result, run, finished)
        if self._watcher is not None:
            self._watcher.job_ended(run, finished, not isinstance(result, Failure))
        self._cards.release(run.cards)
        self._dispatch()
        self._notify_if_idle()
        return result

    def _held(self, step: Deferred[_T]) -> Deferred[_T]:
        """A step of a running job, cancellable by :meth:`abort_running` until it ends."""
        running = self._running
        running.add(step)

        def ended(result: _T | Failure) -> _T | Failure:
            running.discard(step)
            return result

        return step.addBoth(ended)

    def close(self, reason: str = "the daemon is shutting down") -> None:
        """
        Refuse new jobs and answer every queued one with a retryable
        ``shutting_down`` error; jobs already running carry on.
        """
        self._closed = ShuttingDown(reason)
        for waiter in self._waiting:
            self._refuse(waiter, self._closed)
        self._notify_if_idle()

    def reconfigure(self, config: Config) -> None:
        """
        Work to a reloaded configuration.  The new queue limits hold for jobs
        that queue from now on (a waiting job keeps the wait it was promised);
        every waiting job of a consumer the configuration no longer has is
        refused with ``no_consumer``, as it would have been had it arrived now.
        Running jobs carry on as they were.  The chooser takes the new
        ``scheduling`` section itself, before this (see ``app.service.build``),
        so that the pick made here already follows it.
        """
        self._max_depth = config.queue.max_depth
        self._max_wait = config.queue.max_wait_seconds
        self._scheduling = config.scheduling
        removed = {
            waiter.view.consumer
            for waiter in self._waiting
            if waiter.view.consumer not in config.consumers
        }
        # All of them leave before any is answered: a pick in between would
        # ask about a consumer the registry no longer knows.
        for waiter in self._waiting.leave_consumers(removed):
            name = waiter.view.consumer
            waiter.granted.errback(
                NoConsumer(f"consumer {name} was removed by a reload", name)
            )
        self._dispatch()
        self._notify_if_idle()

    def _give_up(self, waiter: Waiter) -> None:
        self.queue_timeouts += 1
        waiter.timer = None
        self.decisions.append(
            QueueDecision(self._clock.seconds(), "timeout", waiter.view, "max_wait_seconds"))
        self._refuse(
            waiter, QueueTimedOut(waiter.view.consumer, self._max_wait, self._retry_after())
        )

    def _retry_after(self) -> int:
        """Seconds until a retry might find room: the queue at the last job's pace."""
        per_job = (self.last_run_ms or 1000) / 1000
        return max(1, min(600, math.ceil(per_job * (len(self._waiting) + 1))))

    def abort_running(self) -> None:
        """Cancel every running job, preparing or relaying (the shutdown grace is over)."""
        for running in list(self._running):
            running.cancel()


def _preparing_failed(failure: Failure, consumer: str) -> Failure:
    """A failure to prepare, as the job's error: ours pass as they are, others are logged."""
    if failure.check(ApiError, CancelledError):
        return failure
    log.failure("preparing {consumer} failed", failure, consumer=consumer)
    why = f"scheduler failed to prepare {consumer}: {failure.value}"
    return Failure(ApiError(SCHEDULER_ERROR, why, consumer))


def _time_the_error(result: Failure, running: RunningJob, finished: float) -> None:
    """
    A job that failed with one of the daemon's errors carries the same timing
    a success would (the prepare step runs to its failure), for its answer.
    """
    error = result.value
    if isinstance(error, ApiError) and error.timing is None:
        prepare_ms = running.prepare_ms
        if prepare_ms is None:
            prepare_ms = round((finished - running.started) * 1000)
        error.timing = JobTiming(running.queue_ms, prepare_ms)
