"""The replay report: known records give known percentiles, counts and turn times."""

from __future__ import annotations

from mgpumanager.replay.report import (
    FAILED,
    OK,
    REFUSED,
    TIMEOUT,
    ClassRow,
    JobRecord,
    class_rows,
    format_table,
    longest_batch_gap,
    percentile,
    turn_seconds,
)


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 1.0)) == (
        10.0, 19.0, 20.0)
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.5) is None


def records() -> list[JobRecord]:
    waits = [JobRecord(i, "tts", "interactive", OK, float(i), i + 1.0) for i in range(1, 21)]
    return [
        *waits,
        JobRecord(0, "image", "batch", OK, 100.0, 130.0),
        JobRecord(1, "image", "batch", REFUSED),
        JobRecord(2, "image", "batch", TIMEOUT),
        JobRecord(3, "image", "batch", FAILED),
    ]


def test_rows_per_class_count_waits_and_outcomes() -> None:
    assert class_rows(records()) == [
        ClassRow("batch", 4, 100.0, 100.0, 100.0, 1, 1, 1),
        ClassRow("interactive", 20, 10.0, 19.0, 20.0, 0, 0, 0),
    ]


def test_a_turn_lasts_from_its_start_to_its_last_answer_and_only_whole_turns_count() -> None:
    turn = [JobRecord(10, "stt", "interactive", OK, 1, 12, chain=1, step=0),
            JobRecord(12, "llm", "interactive", OK, 0, 15, chain=1, step=1),
            JobRecord(15, "tts", "interactive", OK, 2, 19.5, chain=1, step=2)]
    broken = [JobRecord(30, "stt", "interactive", TIMEOUT, chain=2)]
    assert turn_seconds([*turn, *broken]) == [9.5]


def test_the_table_is_aligned_plain_text_with_notes() -> None:
    text = format_table(records(), ["time scale 20, poll floor 50 ms"])
    lines = text.splitlines()
    assert lines[0].split() == ["class", "jobs", "p50", "wait", "p95", "wait", "max", "wait",
                                "refused", "timeouts", "failed"]
    assert lines[1].split() == ["batch", "4", "100.0", "s", "100.0", "s", "100.0", "s", "1",
                                "1", "1"]
    assert lines[2].split()[:6] == ["interactive", "20", "10.0", "s", "19.0", "s"]
    assert len(lines[0]) == len(lines[1]) == len(lines[2])
    assert lines[-1] == "time scale 20, poll floor 50 ms"


def batch(arrival: float, start: float) -> JobRecord:
    return JobRecord(arrival, "image", "batch", OK, start - arrival, start + 10)


def test_the_batch_gap_counts_only_while_batch_work_waits() -> None:
    # The first waited 10 s for its start; the second arrived at 45, 5 s before its own.
    assert longest_batch_gap([batch(0, 10), batch(45, 50)]) == 10.0
    # Both waiting from 0: the second waited from the first start, 40 s.
    assert longest_batch_gap([batch(0, 10), batch(0, 50)]) == 40.0
    # An earlier arrival that starts later keeps the clock running from its arrival.
    assert longest_batch_gap([batch(30, 40), batch(5, 300)]) == 260.0
    assert longest_batch_gap([JobRecord(0, "tts", "interactive", OK, 1.0)]) is None
