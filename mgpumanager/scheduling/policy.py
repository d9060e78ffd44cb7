"""
Which waiting job gets the GPU when it frees.

First come, first served makes a voice question wait behind a batch of image
prompts, and a queue alternating between two consumers that cannot share the
card swaps models for nearly every job.  ``interactive-first`` serves the
interactive class first and prefers jobs that need no swap, bounded so that
nothing starves: the batch guard, the swap bound and the bypass cap.  ``fifo``
(priority, then arrival) stays available.

Everything here is pure: no clock, no reactor, nothing else of the package.
The scheduler hands in read-only views of its waiting jobs and the time, and
gets back a :class:`Pick`.  A pick is one pass over the queue, so re-ranking a
full queue on every release stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from mgpumanager.config.scheduling import (
    BATCH,
    DEFAULT_CLASSES,
    FIFO,
    INTERACTIVE,
    INTERACTIVE_FIRST,
    JOB_CLASSES,
    POLICIES,
    SchedulingConfig,
    SchedulingConfigError,
    precedence,
)
from mgpumanager.scheduling.estimates import Estimates, SwapTest

#: Re-exported: the policies' configuration and the pricing of their run order.
__all__ = [
    "BATCH", "DEFAULT_CLASSES", "FIFO", "INTERACTIVE", "INTERACTIVE_FIRST", "JOB_CLASSES",
    "POLICIES", "Estimates", "SchedulingConfig", "SchedulingConfigError", "SwapTest",
]

#: The rules a :class:`Pick` names, for the decision log.
GUARD = "guard"
DUE_BYPASS = "due-bypass"
DUE_SWAP = "due-swap"
NO_SWAP = "no-swap"
SWAP = "swap"
LINGER = "linger"
EMPTY = "empty"

@attrs.frozen
class Waiting:
    """
    A read-only view of one waiting job.  ``bypassed`` counts the jobs that
    come after it in (class, priority, arrival) order and started first;
    ``needs_swap`` is whether the plan for it would unload or load anything now.
    """

    id: int
    consumer: str
    kind: str
    job_class: str
    priority: int
    arrived: float
    bypassed: int = 0
    needs_swap: bool = False


@attrs.frozen
class History:
    """What the rules remember of the jobs that ran: the batch guard and the linger."""

    last_batch_start: float | None = None
    last_interactive_end: float | None = None

    # Built directly rather than through attrs.evolve, which reads the class's
    # fields on every call: an interactive job's end comes with every job.
    def started(self, job_class: str, now: float) -> History:
        if job_class == BATCH:
            return History(now, self.last_interactive_end)
        return self

    def ended(self, job_class: str, now: float) -> History:
        if job_class == INTERACTIVE:
            return History(self.last_batch_start, now)
        return self


@attrs.frozen
class Pick:
    """
    The job to start (``None``: leave the GPU idle), the rule that chose it for
    the decision log, and, when holding, the time at which to choose again.
    """

    job: Waiting | None
    rule: str
    wake_at: float | None = None


class Policy(Protocol):
    @property
    def name(self) -> str:
        """``fifo`` or ``interactive-first``, for ``scheduler.policy`` in status."""

    def pick(self, waiting: Sequence[Waiting], now: float, history: History) -> Pick:
        """Choose among ``waiting`` now that the GPU is free.  One pass."""

    def order(self, waiting: Sequence[Waiting], now: float, history: History) -> list[Waiting]:
        """The run order if nothing else arrived, for ``/v1/status``."""

    def rule_alone(self, job: Waiting, now: float) -> str:
        """
        The rule :meth:`pick` names when ``job``, an interactive job, is the
        only one it is given: every policy picks such a job, whatever its
        history, and the chooser asks only for the rule's name.
        """


def make_policy(config: SchedulingConfig) -> Policy:
    if config.policy == FIFO:
        return FifoPolicy()
    return InteractiveFirstPolicy(config)


def after_start(
    started: Waiting, waiting: Sequence[Waiting], now: float, history: History
) -> tuple[list[Waiting], History]:
    """
    The queue and history once ``started`` has the GPU: it leaves the queue and
    every job that comes before it in (class, priority, arrival) order has been
    bypassed once more.
    """
    place = _precedence(started)
    rest = [
        attrs.evolve(job, bypassed=job.bypassed + 1) if _precedence(job) < place else job
        for job in waiting
        if job.id != started.id
    ]
    return rest, history.started(started.job_class, now)


def _arrival(job: Waiting) -> tuple[float, int]:
    """Arrival order; the id breaks ties so two jobs never arrive "together"."""
    return (job.arrived, job.id)


def _precedence(job: Waiting) -> tuple[bool, int, float, int]:
    """(class, priority, arrival) order: a job started first bypasses those before it."""
    return precedence(job.job_class, job.priority, job.arrived, job.id)


def _rank(job: Waiting) -> tuple[int, float, int]:
    """Within a group: higher priority first, then arrival."""
    return (-job.priority, job.arrived, job.id)


def _best(best: Waiting | None, job: Waiting) -> Waiting:
    return job if best is None or _rank(job) < _rank(best) else best


@attrs.frozen
class FifoPolicy:
    """Priority, then arrival: the behaviour before scheduling policies."""

    name: str = FIFO

    def pick(self, waiting: Sequence[Waiting], now: float, history: History) -> Pick:
        best: Waiting | None = None
        for job in waiting:
            best = _best(best, job)
        return Pick(best, FIFO if best is not None else EMPTY)

    def order(self, waiting: Sequence[Waiting], now: float, history: History) -> list[Waiting]:
        return sorted(waiting, key=_rank)

    def rule_alone(self, job: Waiting, now: float) -> str:
        return FIFO


@attrs.define
class _Survey:
    """What one pass over the queue learns; every rule reads from it."""

    oldest_batch: Waiting | None = None
    due: Waiting | None = None
    groups: dict[tuple[str, bool], Waiting] = attrs.Factory(dict)


@attrs.frozen
class InteractiveFirstPolicy:
    """The interactive class first, resident jobs first, with bounds against starvation."""

    config: SchedulingConfig
    name: str = INTERACTIVE_FIRST

    def pick(self, waiting: Sequence[Waiting], now: float, history: History) -> Pick:
        survey = self._survey(waiting, now)
        guard_at = self._guard_expires_at(survey, history)
        if survey.oldest_batch is not None and guard_at is not None and now >= guard_at:
            return Pick(survey.oldest_batch, GUARD)
        if survey.due is not None:
            rule = DUE_BYPASS if survey.due.bypassed >= self.config.max_bypass else DUE_SWAP
            return Pick(survey.due, rule)
        if not waiting:
            return Pick(None, EMPTY)
        grouped = self._grouped(survey)
        ended = history.last_interactive_end
        # Only batch work lingers: a batch pick that needs a swap means no
        # interactive job waits and no batch job could start without one.
        # Someone waiting on an interactive job never watches an idle card.
        if (grouped.rule == SWAP and grouped.job is not None
                and grouped.job.job_class == BATCH and ended is not None
                and now < ended + self.config.linger_seconds):
            wakes = [ended + self.config.linger_seconds, guard_at]
            return Pick(None, LINGER, min(w for w in wakes if w is not None))
        return grouped

    def order(self, waiting: Sequence[Waiting], now: float, history: History) -> list[Waiting]:
        """
        Successive picks at ``now``, linger aside (it delays, it does not
        reorder), without re-scanning the queue per job.  Only the first pick
        can be the guard's: once a batch job starts the guard is fresh.  After
        that, due jobs go first and a start can make the jobs before it due, so
        jobs not yet due are kept in (class, priority, arrival) order and
        bumped as jobs after them start.
        """
        order: list[Waiting] = []
        remaining = list(waiting)
        first = self.pick(remaining, now, History(history.last_batch_start))
        if first.rule == GUARD and first.job is not None:
            order.append(first.job)
            remaining, _ = after_start(first.job, remaining, now, history)
        limit = self.config.max_bypass
        is_due = self._is_due_at(now)
        due = sorted((job for job in remaining if is_due(job)), key=_rank)
        pending = sorted((job for job in remaining if not is_due(job)), key=_precedence)
        static = sorted(pending, key=self._static_rank)
        bumps = {job.id: job.bypassed for job in pending}
        placed: set[int] = set()
        cursor = 0
        while due or cursor < len(static):
            if due:
                job = due.pop(0)
            else:
                job = static[cursor]
                cursor += 1
                if job.id in placed:
                    continue
                pending.remove(job)
            placed.add(job.id)
            order.append(job)
            # Only the jobs before it in precedence are bypassed; each is
            # bumped at most max_bypass times before it turns due and leaves
            # ``pending``.
            end, kept, place = 0, [], _precedence(job)
            while end < len(pending) and _precedence(pending[end]) < place:
                other = pending[end]
                end += 1
                bumps[other.id] += 1
                if bumps[other.id] >= limit:
                    due.append(other)
                    placed.add(other.id)
                else:
                    kept.append(other)
            pending[:end] = kept
            due.sort(key=_rank)
        return order

    def rule_alone(self, job: Waiting, now: float) -> str:
        # pick()'s rules for one interactive job: no guard (batch only), no
        # linger (batch only), so due, or else the group it is in.
        if self._is_due_at(now)(job):
            return DUE_BYPASS if job.bypassed >= self.config.max_bypass else DUE_SWAP
        return SWAP if job.needs_swap else NO_SWAP

    def _static_rank(self, job: Waiting) -> tuple[int, int, int, float, int]:
        return (job.job_class != INTERACTIVE, job.needs_swap, *_rank(job))

    def _is_due_at(self, now: float) -> Callable[[Waiting], bool]:
        def is_due(job: Waiting) -> bool:
            if job.bypassed >= self.config.max_bypass:
                return True
            return (job.job_class == INTERACTIVE and job.needs_swap
                    and now - job.arrived >= self.config.swap_bound_seconds)
        return is_due

    def _survey(self, waiting: Sequence[Waiting], now: float) -> _Survey:
        survey = _Survey()
        is_due = self._is_due_at(now)
        for job in waiting:
            if job.job_class == BATCH and (
                survey.oldest_batch is None or _arrival(job) < _arrival(survey.oldest_batch)
            ):
                survey.oldest_batch = job
            if is_due(job):
                survey.due = _best(survey.due, job)
            group = (job.job_class, job.needs_swap)
            survey.groups[group] = _best(survey.groups.get(group), job)
        return survey

    def _guard_expires_at(self, survey: _Survey, history: History) -> float | None:
        if survey.oldest_batch is None:
            return None
        since = survey.oldest_batch.arrived
        if history.last_batch_start is not None:
            since = max(since, history.last_batch_start)
        return since + self.config.batch_guard_seconds

    def _grouped(self, survey: _Survey) -> Pick:
        groups = survey.groups
        job_class = INTERACTIVE if any(c == INTERACTIVE for c, _ in groups) else BATCH
        if (job_class, False) in groups:
            return Pick(groups[(job_class, False)], NO_SWAP)
        return Pick(groups[(job_class, True)], SWAP)
