"""Traces: the JSONL format round-trips, refuses bad lines, and the generators are seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgpumanager.replay.traces import SHAPES, TraceJob, heavy, main, read_trace, voice


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_shape_is_the_same_for_a_seed_and_differs_across_seeds(shape: str) -> None:
    make = SHAPES[shape]
    assert make(3, 3600) == make(3, 3600)
    assert make(3, 3600) != make(4, 3600)
    assert all(0 <= job.at < 3600 for job in make(3, 3600))


def test_heavy_rates_are_roughly_as_specified() -> None:
    jobs = [job for seed in range(5) for job in heavy(seed)]
    for kind, per_hour in (("image", 50), ("llm", 98), ("stt", 206), ("tts", 280)):
        count = sum(1 for job in jobs if job.kind == kind) / 5
        assert per_hour * 0.8 < count < per_hour * 1.2, kind


def test_voice_turns_are_stt_llm_tts_chains_between_image_bursts() -> None:
    jobs = voice(1, 7200)
    chains: dict[int, list[TraceJob]] = {}
    for job in jobs:
        if job.chain is not None:
            chains.setdefault(job.chain, []).append(job)
    assert 7200 / 60 < len(chains) < 7200 / 20
    assert all([s.kind for s in sorted(steps, key=lambda s: s.step)] == ["stt", "llm", "tts"]
               for steps in chains.values())
    images = [job for job in jobs if job.kind == "image"]
    assert all(job.job_class == "batch" and job.chain is None for job in images)
    bursts = {job.at for job in images}
    assert 7200 / 480 - 1 <= len(bursts) <= 7200 / 180
    assert 3 * len(bursts) <= len(images) <= 10 * len(bursts)


def test_a_written_trace_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "voice.jsonl"
    assert main(["voice", "--seed", "2", "--duration", "600", "--out", str(out)]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"at", "kind", "class", "service_seconds", "chain", "step"}
    assert read_trace(out) == [TraceJob.from_json(job.to_json()) for job in voice(2, 600)]


@pytest.mark.parametrize(("line", "words"), [
    ('{"at": -1, "kind": "tts", "class": "interactive", "service_seconds": 1}', "at must"),
    ('{"at": 1, "kind": "video", "class": "batch", "service_seconds": 1}', "kind must"),
    ('{"at": 1, "kind": "tts", "class": "bulk", "service_seconds": 1}', "class must"),
    ('{"at": 1, "kind": "tts", "class": "batch", "service_seconds": 1, "chain": "a"}', "chain"),
    ('{"at": 1, "kind": "tts", "class": "batch", "service_seconds": 1, "x": 1}', "unknown"),
    ("[1]", "JSON object"),
    ("{not json", "property name"),
])
def test_a_bad_line_is_named(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"at": 0, "kind": "tts", "class": "interactive", "service_seconds": 1}'
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{words}"):
        read_trace(path)
