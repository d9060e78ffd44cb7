"""
The per-class table a replay prints: how long jobs waited for the GPU, how
many were refused or timed out, and how long a whole voice turn took.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

OK = "ok"
REFUSED = "refused"
TIMEOUT = "timeout"
FAILED = "failed"


@attrs.frozen
class JobRecord:
    """
    One replayed job, in trace seconds.  ``wait`` is its time in the daemon's
    queue (``None`` when it never got the GPU); ``end`` is when its answer
    was complete.
    """

    arrival: float
    kind: str
    job_class: str
    outcome: str
    wait: float | None = None
    end: float | None = None
    chain: int | None = None
    step: int = 0


@attrs.frozen
class ClassRow:
    job_class: str
    jobs: int
    p50: float | None
    p95: float | None
    max: float | None
    refused: int
    timeouts: int
    failed: int


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest rank: the smallest value with at least ``share`` of them at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def class_rows(records: Sequence[JobRecord]) -> list[ClassRow]:
    rows = []
    for job_class in sorted({record.job_class for record in records}):
        mine = [record for record in records if record.job_class == job_class]
        waits = [r.wait for r in mine if r.wait is not None]
        outcomes = [r.outcome for r in mine]
        rows.append(ClassRow(
            job_class, len(mine), percentile(waits, 0.5), percentile(waits, 0.95),
            max(waits, default=None), outcomes.count(REFUSED), outcomes.count(TIMEOUT),
            outcomes.count(FAILED)))
    return rows


def turn_seconds(records: Sequence[JobRecord]) -> list[float]:
    """
    From a voice turn's start to its last answer, for every chain whose steps
    all succeeded: what the person speaking waited for.
    """
    chains: dict[int, list[JobRecord]] = {}
    for record in records:
        if record.chain is not None:
            chains.setdefault(record.chain, []).append(record)
    turns = []
    for steps in chains.values():
        if all(step.outcome == OK and step.end is not None for step in steps):
            last = max(step.end for step in steps if step.end is not None)
            turns.append(last - min(step.arrival for step in steps))
    return turns


def longest_batch_gap(records: Sequence[JobRecord]) -> float | None:
    """
    The longest time batch work waited without a batch job starting: between
    two batch starts, from the later of the first start and the arrival of the
    oldest batch job still waiting.  What the batch guard bounds (plus the job
    running when it expires).
    """
    batch = sorted((r.arrival + r.wait, r.arrival) for r in records
                   if r.job_class == "batch" and r.wait is not None)
    # The oldest arrival among the jobs starting at or after each start.
    oldest = [arrival for _, arrival in batch]
    for n in range(len(oldest) - 2, -1, -1):
        oldest[n] = min(oldest[n], oldest[n + 1])
    longest: float | None = None
    previous: float | None = None
    for (start, _), since in zip(batch, oldest, strict=True):
        if previous is not None:
            since = max(previous, since)
        longest = max(longest or 0.0, start - since)
        previous = start
    return longest


def jobs_per_hour(records: Sequence[JobRecord]) -> float | None:
    """
    Jobs answered per hour of trace, from the first arrival to the last answer:
    what the host got through, where a backlog shows as a longer tail.
    """
    ends = [r.end for r in records if r.outcome == OK and r.end is not None]
    if not ends:
        return None
    span = max(ends) - min(r.arrival for r in records)
    return len(ends) * 3600 / span if span > 0 else None


def format_table(records: Sequence[JobRecord], notes: Sequence[str] = ()) -> str:
    """Plain aligned text; ``notes`` (scale, floor, CPU use) follow the table."""
    header = ("class", "jobs", "p50 wait", "p95 wait", "max wait", "refused", "timeouts",
              "failed")
    lines = [header]
    for row in class_rows(records):
        lines.append((row.job_class, str(row.jobs), _seconds(row.p50), _seconds(row.p95),
                      _seconds(row.max), str(row.refused), str(row.timeouts), str(row.failed)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(width) if i else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip()
            for line in lines]
    turns = turn_seconds(records)
    if turns:
        text.append(f"voice turns: {len(turns)}, p95 {_seconds(percentile(turns, 0.95))}")
    rate = jobs_per_hour(records)
    if rate is not None:
        answered = sum(1 for r in records if r.outcome == OK)
        text.append(f"throughput: {answered} jobs answered, {rate:.0f} jobs per hour")
    gap = longest_batch_gap(records)
    if gap is not None:
        text.append(f"longest wait of batch work without a batch start: {_seconds(gap)}")
    return "\n".join([*text, *notes]) + "\n"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
