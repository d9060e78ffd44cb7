"""
A scheduling policy plugged into the scheduler as its :class:`Chooser`.

The policies are pure: they rank read-only :class:`Waiting` views.  This
adapter builds those views from the scheduler's queue, adding whether each job
needs a swap (asked once per consumer per pick, so a pick stays one pass over
the queue), keeps the :class:`History` the rules read (batch starts,
interactive ends), and feeds the run, load and unload times it sees into the
:class:`Estimates` behind each waiting job's ETA.

Cost: a pick over ``n`` waiting jobs is O(n) plus one "needs a swap?" per
distinct consumer waiting (whether it is resident); one interactive job alone
is picked without a survey.  The run order for status is O(n log n).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from mgpumanager.config.document import Config
from mgpumanager.config.scheduling import INTERACTIVE
from mgpumanager.scheduling.estimates import Estimates
from mgpumanager.scheduling.policy import (
    EMPTY,
    LINGER,
    NO_SWAP,
    History,
    Policy,
    Waiting,
    make_policy,
)
from mgpumanager.scheduling.queued import QueuedJob, QueueEntry, RunningJob

#: Whether a job of this consumer would unload or load anything if it ran now.
NeedsSwap = Callable[[str], bool]


class PolicyChooser:
    """
    :param policy: ``interactive-first`` or ``fifo``.
    :param needs_swap: asked at pick time: whether a consumer's job would
        unload or load anything now.
    """

    def __init__(self, policy: Policy, needs_swap: NeedsSwap,
                 estimates: Estimates | None = None,
                 cards_of: Callable[[str], Collection[int]] | None = None) -> None:
        self.policy = policy
        self.estimates = estimates if estimates is not None else Estimates()
        self._needs_swap = needs_swap
        self._history = History()
        #: The cards a consumer's jobs need; None on a one-card host.
        self._cards_of = cards_of
        #: When an interactive job last ended on each card: the linger is per card.
        self._interactive_end: dict[int, float] = {}
        self._wake_at: float | None = None
        #: The last pick's job id, its rule, and whether it needed a swap.
        self._last: tuple[int, str, bool] = (0, EMPTY, False)
        self._swapped: dict[int, bool] = {}
        #: Whether the last pick left the GPU idle to linger.
        self._held = False
        #: The views the last pick made, by job id: a job's view is made again
        #: only when its ``bypassed`` or ``needs_swap`` changed, not at every
        #: pick (with 63 jobs waiting, making the views was a third of a pick).
        self._made: dict[int, Waiting] = {}

    @property
    def name(self) -> str:
        return self.policy.name

    def reconfigure(self, config: Config) -> None:
        """
        Pick by a reloaded ``scheduling`` section.  The history (batch starts,
        interactive ends) and the estimates are facts about the past, so the
        guard and the ETAs carry on from them.
        """
        self.policy = make_policy(config.scheduling)

    def _views(self, waiting: Sequence[QueuedJob]) -> list[Waiting]:
        cache: dict[str, bool] = {}
        views = []
        # Only the jobs waiting now are kept: one that left is forgotten here.
        made, self._made = self._made, {}
        for job in waiting:
            swap = cache.get(job.consumer)
            if swap is None:
                swap = cache[job.consumer] = self._needs_swap(job.consumer)
            view = made.get(job.id)
            if view is None or view.bypassed != job.bypassed or view.needs_swap != swap:
                view = Waiting(job.id, job.consumer, job.kind, job.job_class, job.priority,
                               job.arrived, job.bypassed, swap)
            self._made[job.id] = view
            views.append(view)
        return views

    def pick(self, waiting: Sequence[QueuedJob], now: float) -> QueuedJob | None:
        if len(waiting) == 1 and waiting[0].job_class == INTERACTIVE:
            return self._alone(waiting[0], now)
        pick = self.policy.pick(self._views(waiting), now, self._history_on(waiting))
        held, self._held = self._held, pick.rule == LINGER
        self._wake_at = pick.wake_at
        if pick.job is None:
            return None
        # A job that needs no swap, picked while the GPU lingered for one,
        # started thanks to the linger.
        rule = LINGER if held and pick.rule == NO_SWAP else pick.rule
        self._last = (pick.job.id, rule, pick.job.needs_swap)
        return next(job for job in waiting if job.id == pick.job.id)

    def _alone(self, job: QueuedJob, now: float) -> QueuedJob:
        """
        The one job the policy is offered, interactive: every policy picks
        it (only batch work lingers), so it starts without a view of the
        queue or a survey of it (the common case, on every job), and the
        policy names only the rule, for the decision log.
        """
        swap = self._needs_swap(job.consumer)
        view = Waiting(job.id, job.consumer, job.kind, job.job_class, job.priority,
                       job.arrived, job.bypassed, swap)
        rule = self.policy.rule_alone(view, now)
        # As in pick(): a start the linger held the card for is the linger's.
        if self._held and rule == NO_SWAP:
            rule = LINGER
        self._held, self._wake_at, self._made = False, None, {}
        self._last = (job.id, rule, swap)
        return job

    def recheck_at(self, waiting: Sequence[QueuedJob], now: float) -> float | None:
        return self._wake_at

    def run_order(self, waiting: Sequence[QueuedJob], now: float) -> list[QueuedJob]:
        return [entry.job for entry in self.entries(waiting, now, None)]

    def job_started(self, job: QueuedJob, now: float) -> str:
        self._history = self._history.started(job.job_class, now)
        picked, rule, swap = self._last
        self._swapped[job.id] = swap
        return rule if picked == job.id else EMPTY

    def _history_on(self, waiting: Sequence[QueuedJob]) -> History:
        """
        The history a pick among ``waiting`` follows: on several cards, the
        linger counts from the last interactive end on their cards, not on
        another card (whose jobs an idle card would wait for in vain).
        """
        if self._cards_of is None:
            return self._history
        consumers = {job.consumer for job in waiting}
        cards = {card for name in consumers for card in self._cards_of(name)}
        ends = [self._interactive_end[card] for card in cards if card in self._interactive_end]
        return History(self._history.last_batch_start, max(ends, default=None))

    def job_ended(self, running: RunningJob, now: float, ok: bool) -> None:
        job = running.view
        self._history = self._history.ended(job.job_class, now)
        if job.job_class == INTERACTIVE:
            for card in running.cards:
                self._interactive_end[card] = now
        swapped = self._swapped.pop(job.id, False)
        if not ok or running.relaying_since is None:
            return
        self.estimates.observe("run", job.consumer, now - running.relaying_since)
        prepare = running.relaying_since - running.started
        # The daemon times a whole make-room-and-load step, not its parts:
        # it is priced as the target's load (an unknown unload costs nothing).
        self.estimates.observe("load", job.consumer, prepare if swapped else 0.0)

    def entries(
        self, waiting: Sequence[QueuedJob], now: float, running: RunningJob | None
    ) -> list[QueueEntry]:
        views = self._views(waiting)
        order = self.policy.order(views, now, self._history)
        remaining: float | None = 0.0
        if running is not None:
            average = self.estimates.average("run", running.view.consumer)
            since = running.relaying_since or now
            prepare = (self.estimates.average("load", running.view.consumer) or 0.0
                       if running.relaying_since is None else 0.0)
            remaining = None if average is None else max(0.0, prepare + average - (now - since))
        etas = self.estimates.eta_seconds(
            order, remaining, _swap_after, running.view.consumer if running else None)
        by_id = {job.id: job for job in waiting}
        return [
            QueueEntry(by_id[view.id], view.needs_swap,
                       None if eta is None else round(eta, 1))
            for view, eta in zip(order, etas, strict=True)
        ]


def _swap_after(job: Waiting, previous: Waiting | None) -> bool:
    """
    Whether ``job`` needs a swap after ``previous``: as now if it is next;
    never right after its own consumer; otherwise as now (what runs between
    seldom makes it resident).
    """
    if previous is not None and previous.consumer == job.consumer:
        return False
    return job.needs_swap
