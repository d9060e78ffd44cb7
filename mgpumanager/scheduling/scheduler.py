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

import collections
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.common.errors import SCHEDULER_ERROR, ApiError, JobTiming
from mgpumanager.config.document import Config, QueueConfig
from mgpumanager.config.scheduling import INTERACTIVE, SchedulingConfig
from mgpumanager.scheduling.cards import CardLocks, CardsOf, one_card, startable
from mgpumanager.scheduling.holds import CardHolds
from mgpumanager.scheduling.queued import (
    COMPLETING,
    Chooser,
    PriorityThenArrival,
    QueueDecision,
    QueuedJob,
    QueueEntry,
    RunningJob,
    WatchingChooser,
)
from mgpumanager.scheduling.refusals import NoConsumer, QueueFull, QueueTimedOut, ShuttingDown
from mgpumanager.scheduling.telemetry import NO_TELEMETRY, Telemetry
from mgpumanager.scheduling.waiting_room import Waiter, WaitingRoom
from mgpumanager.state.registry import ConsumerState, Registry

log = Logger()

#: Re-exported: the queue's views and the chooser seam live in :mod:`.queued`.
__all__ = ["Chooser", "GpuScheduler", "PriorityThenArrival", "QueuedJob", "RunningJob",
           "WatchingChooser"]

#: How many pick and timeout decisions ``/v1/status`` keeps.
DECISIONS_KEPT = 20

_T = TypeVar("_T")


#: Makes a consumer ready to run a job (room on the card, model loaded).
#: Called with the GPU lock held; raising fails the job.
Preparer = Callable[[str], "Coroutine[Any, Any, None] | Deferred[None]"]


async def _nothing_to_prepare(consumer: str) -> None:
    return None


class GpuScheduler:
    """
    :param clock: for wait and run timings, timeouts and the chooser's rechecks.
    :param registry: per-consumer counters (active, total requests, last used).
    :param prepare: the make-room-and-load step, run under the lock before each job.
    :param queue: ``max_depth`` jobs may wait (one more is refused with
        ``queue_full``), each for at most ``max_wait_seconds`` (then ``queue_timeout``).
    :param chooser: which waiting job runs next.
    :param telemetry: told of each job's wait.
    :param scheduling: the ``scheduling`` section (job classes by kind).
    :param cards_of: the cards a consumer's jobs need (card 0 alone by default).
    """

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        prepare: Preparer = _nothing_to_prepare,
        *,
        queue: QueueConfig,
        chooser: Chooser | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
        scheduling: SchedulingConfig | None = None,
        cards_of: CardsOf = one_card,
    ) -> None:
        self._clock = clock
        self._cards_of = cards_of
        self._max_depth = queue.max_depth
        self._max_wait = queue.max_wait_seconds
        self._registry = registry
        self._prepare = prepare
        self._chooser: Chooser = chooser or PriorityThenArrival()
        # Asked for every job: a runtime Protocol check costs more than the pick.
        self._watcher = self._chooser if isinstance(self._chooser, WatchingChooser) else None
        self._telemetry = telemetry
        #: The classes of job kinds (:meth:`class_of`).
        self._scheduling = scheduling if scheduling is not None else SchedulingConfig()
        self._cards = CardLocks()
        #: By id, so in arrival order.
        self._waiting = WaitingRoom()
        self._next_id = 0
        self._recheck: IDelayedCall | None = None
        self._dispatching = False
        self._dispatch_again = False
        self._closed: ShuttingDown | None = None
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
        #: The jobs holding cards, by job id (so in order of arrival).
        self._runs: dict[int, RunningJob] = {}
        #: The job being handed its cards (see :meth:`current_job`).
        self._starting: RunningJob | None = None
        #: Cards held by someone who is not a job (a yield, a reclaim).
        self.holds = CardHolds(self._cards, self._dispatch)
        self.decisions: collections.deque[QueueDecision] = collections.deque(
            maxlen=DECISIONS_KEPT)

    @property
    def running(self) -> RunningJob | None:
        """The earliest-started running job, if any (the one a one-card host has)."""
        return min(self._runs.values(), key=_start_order, default=None)

    @property
    def running_jobs(self) -> list[RunningJob]:
        """Every running job, earliest started first."""
        return sorted(self._runs.values(), key=_start_order)

    def cards_of(self, consumer: str) -> tuple[int, ...]:
        """The cards a job of ``consumer`` needs."""
        return tuple(self._cards_of(consumer))

    @property
    def policy_name(self) -> str:
        """The chooser's policy name for status (``priority-then-arrival`` by default)."""
        return str(getattr(self._chooser, "name", "fifo"))

    def queue_entries(self) -> list[QueueEntry]:
        """
        The waiting jobs in run order, with swap and ETA where the chooser
        knows them; a job waiting for a card held for a guest starts no
        sooner than the hold's end (unknown when it has none).
        """
        if not self._waiting:
            return []
        now = self._clock.seconds()
        if self._watcher is None:
            return [QueueEntry(job) for job in self._chooser.run_order(self._views(), now)]
        entries = self._watcher.entries(self._views(), now, self.running)
        if not self.holds:
            return entries
        return [self.holds.eta_after(e, self._cards_of(e.job.consumer), now) for e in entries]

    def class_of(self, kind: str) -> str:
        """The class (``interactive`` or ``batch``) a job of ``kind`` has unless it says."""
        return self._scheduling.class_of(kind)

    def current_job(self) -> RunningJob | None:
        """
        The job being started: a job callable asks as it begins (before its
        first wait) to know itself among the running jobs.
        """
        return self._starting

    @staticmethod
    def running_timing(job: RunningJob) -> JobTiming:
        """How long a running job waited and prepared, for its answer."""
        return JobTiming(job.queue_ms, job.prepare_ms or 0)

    @staticmethod
    def completing(job: RunningJob, work_id: str) -> None:
        """
        A running job's answer is relayed, and the server's work goes on as
        ``work_id``: the job keeps its cards until it ends (status shows it).
        """
        job.phase, job.prompt_id = COMPLETING, work_id

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def queued_in_run_order(self) -> list[QueuedJob]:
        """The waiting jobs, in the order they would start if the GPU freed now."""
        if not self._waiting:
            return []
        return self._chooser.run_order(self._views(), self._clock.seconds())

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
        if not waiter.granted.called:
            waiter.timer = self._clock.callLater(self._max_wait, self._give_up, waiter)
        return waiter.granted.addCallback(lambda _: self._start(view, job))

    def _views(self) -> list[QueuedJob]:
        return self._waiting.views()

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
        ahead_of = self._waiting.started(chosen)
        if self._watcher is not None:
            rule = self._watcher.job_started(chosen, now)
            if ahead_of:
                self.decisions.append(QueueDecision(now, "pick", chosen, rule, tuple(ahead_of)))
        self._cards.take(self._cards_of(chosen.consumer))
        waiter.granted.callback(None)
        # Another card may still be free for another job.
        self._dispatch_again = True

    def _startable(self, waiting: list[QueuedJob], now: float) -> list[QueuedJob]:
        """The waiting jobs that may start now, on cards that are free."""
        busy = self._cards.busy().union(self.holds.asked)
        if not busy:
            return waiting
        cards_of = self._cards_of
        if all(not busy.isdisjoint(cards_of(job.consumer)) for job in waiting):
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
        # The bookkeeping rides on the Deferred, not in the coroutine: a
        # coroutine garbage-collected mid-job (abandoned by everyone) runs its
        # ``finally`` blocks but never fires its Deferred, so it cannot release
        # the lock into other coroutines being torn down.
        running = Deferred.fromCoroutine(self._prepare_and_run(run, job))
        return running.addBoth(self._finish, state, run)

    async def _prepare_and_run(self, run: RunningJob, job: Callable[[], Deferred[_T]]) -> _T:
        consumer = run.view.consumer
        try:
            await self._hold(ensureDeferred(self._prepare(consumer)))
        except (ApiError, CancelledError):
            raise
        except Exception as e:
            log.failure("preparing {consumer} failed", consumer=consumer)
            raise ApiError(
                SCHEDULER_ERROR, f"scheduler failed to prepare {consumer}: {e}", consumer
            ) from e
        run.relaying(self._clock.seconds())
        self._starting = run
        try:
            started = job()
        finally:
            self._starting = None
        return await self._hold(started)

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

    @property
    def max_depth(self) -> int:
        return self._max_depth

    def oldest_arrival(self) -> float | None:
        """When the longest-waiting job arrived, or None when none waits."""
        return self._waiting.oldest_arrival()

    def abort_running(self) -> None:
        """Cancel every running job, preparing or relaying (the shutdown grace is over)."""
        for running in list(self._running):
            running.cancel()

    def when_idle(self) -> Deferred[None]:
        """Fires once no job runs and none waits."""
        if self.in_flight == 0 and not self._waiting:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _notify_if_idle(self) -> None:
        if self.in_flight or self._waiting:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)



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


def _start_order(job: RunningJob) -> tuple[float, int]:
    return (job.started, job.view.id)
