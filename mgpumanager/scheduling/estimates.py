"""
How long waiting jobs should take to start: per-consumer moving averages of
run, load and unload seconds, priced along a run order.  Pure, like the
policies it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, TypeVar


class PricedJob(Protocol):
    """What pricing needs of a waiting job (the policy's ``Waiting`` provides it)."""

    @property
    def consumer(self) -> str: ...


_Job = TypeVar("_Job", bound=PricedJob)

#: Answers whether ``job`` would need a swap if it ran right after ``previous``
#: (``None``: after what holds the card now).
SwapTest: TypeAlias = Callable[[_Job, _Job | None], bool]


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
        order: Sequence[_Job],
        running_remaining: float | None,
        needs_swap_of: SwapTest[_Job],
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
        previous: _Job | None = None
        for job in order:
            etas.append(clock)
            if clock is not None:
                clock = self._cost(job, previous, running_consumer, needs_swap_of, clock)
            previous = job
        return etas

    def _cost(self, job: _Job, previous: _Job | None, running_consumer: str | None,
              needs_swap_of: SwapTest[_Job], clock: float) -> float | None:
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
