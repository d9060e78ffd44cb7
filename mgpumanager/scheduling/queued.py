"""
What the scheduler shows of its queue, and the seam through which a policy
chooses from it: read-only views of waiting jobs, and the :class:`Chooser`
that picks the next one whenever the GPU frees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from mgpumanager.config.scheduling import INTERACTIVE, precedence


@attrs.frozen
class QueuedJob:
    """
    What a :class:`Chooser` may know of a waiting job: a read-only view, so
    that a policy can rank the queue but never change it.

    :ivar id: unique and increasing: a larger id arrived later, even when two
        jobs share an arrival time.
    :ivar arrived: the clock's time when the job was submitted.
    :ivar bypassed: how many jobs that come after this one in (class,
        priority, arrival) order started before it.
    :ivar kind: the endpoint kind (``tts``, ``image``, ``other``...).
    :ivar job_class: ``interactive`` or ``batch``.
    """

    id: int
    consumer: str
    priority: int
    arrived: float
    bypassed: int = 0
    kind: str = ""
    job_class: str = INTERACTIVE


def run_precedence(job: QueuedJob) -> tuple[bool, int, float, int]:
    """``job``'s place in (class, priority, arrival) order: who bypasses whom."""
    return precedence(job.job_class, job.priority, job.arrived, job.id)


class Chooser(Protocol):
    """
    Decides which waiting job gets the GPU when it frees.  ``waiting`` is
    never empty and is in arrival order; every method should be O(n) or
    O(n log n), as it runs at every release with up to ``max_depth`` waiters.
    """

    def pick(self, waiting: Sequence[QueuedJob], now: float) -> QueuedJob | None:
        """The job to start now, or ``None`` to leave the GPU idle for now."""

    def recheck_at(self, waiting: Sequence[QueuedJob], now: float) -> float | None:
        """After :meth:`pick` chose nothing: when to ask again if no job arrives,
        leaves or ends before then (``None``: not before such an event)."""

    def run_order(self, waiting: Sequence[QueuedJob], now: float) -> list[QueuedJob]:
        """Every waiting job, in the order they would start if the GPU freed now."""


def _priority_then_arrival(job: QueuedJob) -> tuple[int, int]:
    return (-job.priority, job.id)


class PriorityThenArrival:
    """Highest consumer priority first, first come first served within a priority."""

    def pick(self, waiting: Sequence[QueuedJob], now: float) -> QueuedJob | None:
        return min(waiting, key=_priority_then_arrival)

    def recheck_at(self, waiting: Sequence[QueuedJob], now: float) -> float | None:
        return None

    def run_order(self, waiting: Sequence[QueuedJob], now: float) -> list[QueuedJob]:
        return sorted(waiting, key=_priority_then_arrival)


@runtime_checkable
class WatchingChooser(Chooser, Protocol):
    """
    A chooser that also remembers what ran (a policy's batch guard and linger
    need it) and says why it picked what it did, for the decision log.
    """

    def job_started(self, job: QueuedJob, now: float) -> str:
        """``job`` got the GPU; returns the rule that chose it."""

    def job_ended(self, running: RunningJob, now: float, ok: bool) -> None:
        """``running`` gave the GPU back (``ok``: it succeeded)."""

    def entries(
        self, waiting: Sequence[QueuedJob], now: float, running: RunningJob | None
    ) -> list[QueueEntry]:
        """Every waiting job in run order, with whether it needs a swap and its ETA."""


#: What a running job is doing: making room and loading, relaying the answer,
#: or (for servers that answer before the work is done) waiting for completion.
PREPARING = "preparing"
RELAYING = "relaying"
COMPLETING = "completing"


@attrs.define
class RunningJob:
    """
    The job holding the GPU, for ``scheduler.running`` in status and the
    timing of its answer.  ``phase`` moves on as the job does;
    whoever relays a server that answers before its work is done may set it
    to ``completing`` (with ``prompt_id``).
    """

    view: QueuedJob
    started: float
    phase: str = PREPARING
    #: The cards it holds.
    cards: tuple[int, ...] = (0,)
    prompt_id: str | None = None
    #: When preparing ended and relaying began.
    relaying_since: float | None = None

    def relaying(self, now: float) -> None:
        """Room is made and the model loaded: the job's own exchange begins."""
        self.phase = RELAYING
        self.relaying_since = now

    @property
    def queue_ms(self) -> int:
        return round((self.started - self.view.arrived) * 1000)

    @property
    def prepare_ms(self) -> int | None:
        if self.relaying_since is None:
            return None
        return round((self.relaying_since - self.started) * 1000)


@attrs.frozen
class QueueEntry:
    """One waiting job as status shows it: its view, whether it needs a swap, its ETA."""

    job: QueuedJob
    needs_swap: bool | None = None
    eta_seconds: float | None = None


@attrs.frozen
class QueueDecision:
    """
    A scheduling decision for the decision log: ``pick`` when a job started
    ahead of an earlier arrival of its own class and priority (``rule`` says
    why), ``timeout`` when a job gave up waiting.
    """

    time: float
    type: str
    job: QueuedJob
    rule: str
    #: The earlier arrivals of the same class and priority it went ahead of.
    ahead_of: tuple[int, ...] = ()
