"""
The scheduler's state and its read views, apart from the moves that change it
(:mod:`mgpumanager.scheduling.scheduler`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mgpumanager.common.errors import JobTiming
from mgpumanager.config.document import QueueConfig
from mgpumanager.config.scheduling import SchedulingConfig
from mgpumanager.scheduling.cards import CardLocks, CardsOf, one_card
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
from mgpumanager.scheduling.refusals import ShuttingDown
from mgpumanager.scheduling.telemetry import NO_TELEMETRY, Telemetry
from mgpumanager.scheduling.waiting_room import WaitingRoom
from mgpumanager.state.registry import Registry

#: How many pick and timeout decisions ``/v1/status`` keeps.
DECISIONS_KEPT = 20

#: Makes a consumer ready to run a job (room on the card, model loaded).
#: Called with the GPU lock held; raising fails the job.  None: ready as it
#: is, nothing to wait for.
Preparer = Callable[[str], "Coroutine[Any, Any, None] | Deferred[None] | None"]


def nothing_to_prepare(consumer: str) -> None:
    """A host with no lifecycle: every consumer is ready as it is."""
    return None


class SchedulerState:
    """
    What the scheduler holds and shows: the waiting room, the running jobs,
    the cards' locks and holds, the counters and the decisions, with the read
    views ``/v1/status``, the policy and the job path ask for.  The scheduler
    (:class:`~mgpumanager.scheduling.scheduler.GpuScheduler`) moves jobs
    through them.

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

    def _dispatch(self) -> None:
        """Start what may start now: the scheduler's own move (a card hold asks for it)."""
        raise NotImplementedError

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        prepare: Preparer = nothing_to_prepare,
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

    def _views(self) -> list[QueuedJob]:
        return self._waiting.views()

    @property
    def max_depth(self) -> int:
        return self._max_depth

    def oldest_arrival(self) -> float | None:
        """When the longest-waiting job arrived, or None when none waits."""
        return self._waiting.oldest_arrival()

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


def _start_order(job: RunningJob) -> tuple[float, int]:
    return (job.started, job.view.id)
