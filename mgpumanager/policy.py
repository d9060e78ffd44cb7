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

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import attrs

INTERACTIVE = "interactive"
BATCH = "batch"
JOB_CLASSES = (INTERACTIVE, BATCH)

INTERACTIVE_FIRST = "interactive-first"
FIFO = "fifo"
POLICIES = (INTERACTIVE_FIRST, FIFO)

#: The rules a :class:`Pick` names, for the decision log.
GUARD = "guard"
DUE_BYPASS = "due-bypass"
DUE_SWAP = "due-swap"
NO_SWAP = "no-swap"
SWAP = "swap"
LINGER = "linger"
EMPTY = "empty"

DEFAULT_CLASSES: Mapping[str, str] = {
    "tts": INTERACTIVE,
    "stt": INTERACTIVE,
    "llm": INTERACTIVE,
    "image": BATCH,
}

_KEYS = ("policy", "batch_guard_seconds", "swap_bound_seconds", "max_bypass",
         "linger_seconds", "classes")


class SchedulingConfigError(ValueError):
    """
    The ``scheduling`` mapping cannot be used.  ``key`` is the path inside it
    (``classes.image``) so the config module can prefix the file and section.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


@attrs.frozen
class SchedulingConfig:
    """
    The ``scheduling`` section.  ``classes`` is stored as sorted pairs so the
    value stays hashable; :meth:`class_of` reads it.  A kind it does not name
    (``other``) is interactive: unknown work is someone waiting, not a batch.
    """

    policy: str = INTERACTIVE_FIRST
    batch_guard_seconds: float = 300.0
    swap_bound_seconds: float = 30.0
    max_bypass: int = 8
    linger_seconds: float = 1.0
    classes: tuple[tuple[str, str], ...] = tuple(sorted(DEFAULT_CLASSES.items()))

    def class_of(self, kind: str) -> str:
        return dict(self.classes).get(kind, INTERACTIVE)

    @classmethod
    def from_mapping(cls, table: object) -> SchedulingConfig:
        """
        Validate the parsed YAML of the ``scheduling`` section (``None`` means
        all defaults).  Kinds named under ``classes`` override the defaults one
        by one, so ``classes: {llm: batch}`` keeps images batch.

        :raises SchedulingConfigError: naming the key and the problem.
        """
        if table is None:
            return cls()
        given = _mapping(table, "")
        for key in given:
            if key not in _KEYS:
                raise SchedulingConfigError(key, f"unknown key; known keys: {', '.join(_KEYS)}")
        policy = given.get("policy", INTERACTIVE_FIRST)
        if policy not in POLICIES:
            raise SchedulingConfigError(
                "policy", f"must be one of {', '.join(POLICIES)}, not {policy!r}")
        classes = dict(DEFAULT_CLASSES)
        for kind, job_class in _mapping(given.get("classes", {}), "classes").items():
            if job_class not in JOB_CLASSES:
                raise SchedulingConfigError(
                    f"classes.{kind}", f"must be interactive or batch, not {job_class!r}")
            classes[kind] = job_class
        return cls(
            policy=policy,
            batch_guard_seconds=_seconds(given, "batch_guard_seconds", 300.0, positive=True),
            swap_bound_seconds=_seconds(given, "swap_bound_seconds", 30.0, positive=True),
            max_bypass=_count(given, "max_bypass", 8),
            linger_seconds=_seconds(given, "linger_seconds", 1.0, positive=False),
            classes=tuple(sorted(classes.items())),
        )


def _mapping(value: object, key: str) -> dict[str, object]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise SchedulingConfigError(key or "scheduling", "must be a mapping with names as keys")
    return value


def _seconds(table: Mapping[str, object], key: str, default: float, positive: bool) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchedulingConfigError(key, f"must be a number of seconds, not {value!r}")
    if not (0 < value if positive else 0 <= value) or value == float("inf"):
        bound = "positive" if positive else "zero or more"
        raise SchedulingConfigError(key, f"must be {bound} and finite (got {value})")
    return float(value)


def _count(table: Mapping[str, object], key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SchedulingConfigError(key, f"must be a whole number of at least 1, not {value!r}")
    return value


@attrs.frozen
class Waiting:
    """
    A read-only view of one waiting job.  ``bypassed`` counts the jobs that
    arrived after it and started first; ``needs_swap`` is whether the plan for
    it would unload or load anything now.
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

    def started(self, job_class: str, now: float) -> History:
        if job_class == BATCH:
            return attrs.evolve(self, last_batch_start=now)
        return self

    def ended(self, job_class: str, now: float) -> History:
        if job_class == INTERACTIVE:
            return attrs.evolve(self, last_interactive_end=now)
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


def make_policy(config: SchedulingConfig) -> Policy:
    if config.policy == FIFO:
        return FifoPolicy()
    return InteractiveFirstPolicy(config)


def after_start(
    started: Waiting, waiting: Sequence[Waiting], now: float, history: History
) -> tuple[list[Waiting], History]:
    """
    The queue and history once ``started`` has the GPU: it leaves the queue and
    every job that arrived before it has been bypassed once more.
    """
    first = _arrival(started)
    rest = [
        attrs.evolve(job, bypassed=job.bypassed + 1) if _arrival(job) < first else job
        for job in waiting
        if job.id != started.id
    ]
    return rest, history.started(started.job_class, now)


def _arrival(job: Waiting) -> tuple[float, int]:
    """Arrival order; the id breaks ties so two jobs never arrive "together"."""
    return (job.arrived, job.id)


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


@attrs.define
class _Survey:
    """What one pass over the queue learns; every rule reads from it."""

    oldest_batch: Waiting | None = None
    due: Waiting | None = None
    groups: dict[tuple[str, bool], Waiting] = attrs.Factory(dict)
    all_swap: bool = True
    next_due_at: float | None = None


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
        ended = history.last_interactive_end
        if survey.all_swap and ended is not None and now < ended + self.config.linger_seconds:
            wakes = [ended + self.config.linger_seconds, survey.next_due_at, guard_at]
            return Pick(None, LINGER, min(w for w in wakes if w is not None))
        return self._grouped(survey)

    def order(self, waiting: Sequence[Waiting], now: float, history: History) -> list[Waiting]:
        """
        Successive picks at ``now``, linger aside (it delays, it does not
        reorder), without re-scanning the queue per job.  Only the first pick
        can be the guard's: once a batch job starts the guard is fresh.  After
        that, due jobs go first and a start can make earlier arrivals due, so
        jobs not yet due are kept by arrival and bumped as later ones start.
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
        pending = sorted((job for job in remaining if not is_due(job)), key=_arrival)
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
            # Only earlier arrivals are bypassed; each is bumped at most
            # max_bypass times before it turns due and leaves ``pending``.
            end, kept = 0, []
            while end < len(pending) and _arrival(pending[end]) < _arrival(job):
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
            elif job.job_class == INTERACTIVE and job.needs_swap:
                at = job.arrived + self.config.swap_bound_seconds
                survey.next_due_at = at if survey.next_due_at is None else min(
                    survey.next_due_at, at)
            group = (job.job_class, job.needs_swap)
            survey.groups[group] = _best(survey.groups.get(group), job)
            survey.all_swap = survey.all_swap and job.needs_swap
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


#: Answers whether ``job`` would need a swap if it ran right after ``previous``
#: (``None``: after what holds the card now).
SwapTest = Callable[[Waiting, "Waiting | None"], bool]


class Estimates:
    """
    Per-consumer exponential moving averages of run, load and unload seconds,
    from which ``/v1/status`` tells each waiting job when it should start.
    """

    def __init__(self, weight: float = 0.3) -> None:
        """:param weight: how much the newest observation counts, in (0, 1]."""
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], not {weight}")
        self._weight = weight
        self._averages: dict[tuple[str, str], float] = {}

    def observe(self, what: str, consumer: str, seconds: float) -> None:
        """Record one ``run``, ``load`` or ``unload`` of ``consumer``."""
        key = (what, consumer)
        old = self._averages.get(key)
        self._averages[key] = seconds if old is None else old + self._weight * (seconds - old)

    def average(self, what: str, consumer: str) -> float | None:
        return self._averages.get((what, consumer))

    def eta_seconds(
        self,
        order: Sequence[Waiting],
        running_remaining: float | None,
        needs_swap_of: SwapTest,
        running_consumer: str | None = None,
    ) -> list[float | None]:
        """
        Seconds until each job of ``order`` starts: what the running job has
        left, then each job before it, priced as its consumer's run average
        plus, when it needs a swap, its load average and the unload average of
        the consumer it follows.  A consumer never unloaded is taken to leave
        without cost; a missing run or load average makes this job's successors
        unknown (``None``), and so does an unknown ``running_remaining``.

        :param running_remaining: seconds the running job still needs, 0 when idle.
        :param running_consumer: the consumer that holds the card now, if any.
        """
        etas: list[float | None] = []
        clock = running_remaining
        previous: Waiting | None = None
        for job in order:
            etas.append(clock)
            if clock is not None:
                clock = self._cost(job, previous, running_consumer, needs_swap_of, clock)
            previous = job
        return etas

    def _cost(self, job: Waiting, previous: Waiting | None, running_consumer: str | None,
              needs_swap_of: SwapTest, clock: float) -> float | None:
        run = self.average("run", job.consumer)
        if run is None:
            return None
        if not needs_swap_of(job, previous):
            return clock + run
        load = self.average("load", job.consumer)
        if load is None:
            return None
        before = previous.consumer if previous is not None else running_consumer
        unload = 0.0
        if before is not None and before != job.consumer:
            unload = self.average("unload", before) or 0.0
        return clock + unload + load + run
