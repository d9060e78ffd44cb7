"""
Workload traces: one JSON object per line, one job per object.

``{"at": seconds, "kind", "class", "service_seconds", "chain": id or null,
"step": n}``.  A chain is a voice turn (stt, then llm, then tts): its steps
share ``at`` (when the turn began) and each is sent only once the previous
answer arrived, so a slow step delays the rest of the turn as it would for a
person waiting.  Generators are seeded so two policies see the same arrivals.

``python -m mgpumanager.replay.traces SHAPE --seed N --out FILE`` writes one.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import attrs

KINDS = ("tts", "stt", "llm", "image")
CLASSES = ("interactive", "batch")
CLASS_OF = {"tts": "interactive", "stt": "interactive", "llm": "interactive",
            "image": "batch"}


@attrs.frozen
class TraceJob:
    at: float
    kind: str
    job_class: str
    service_seconds: float
    chain: int | None = None
    step: int = 0

    def to_json(self) -> dict[str, object]:
        return {"at": round(self.at, 3), "kind": self.kind, "class": self.job_class,
                "service_seconds": round(self.service_seconds, 3), "chain": self.chain,
                "step": self.step}

    @classmethod
    def from_json(cls, value: object) -> TraceJob:
        """:raises ValueError: naming the field that is wrong."""
        if not isinstance(value, dict):
            raise ValueError("a job must be a JSON object")
        extra = set(value) - {"at", "kind", "class", "service_seconds", "chain", "step"}
        if extra:
            raise ValueError(f"unknown field {sorted(extra)[0]!r}")
        at, service = value.get("at"), value.get("service_seconds")
        chain, step = value.get("chain"), value.get("step", 0)
        for name, number in (("at", at), ("service_seconds", service)):
            if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
                raise ValueError(f"{name} must be a number of seconds, not {number!r}")
        if value.get("kind") not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if value.get("class") not in CLASSES:
            raise ValueError("class must be interactive or batch")
        if chain is not None and (isinstance(chain, bool) or not isinstance(chain, int)):
            raise ValueError("chain must be a whole number or null")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("step must be a whole number of at least 0")
        assert isinstance(at, int | float) and isinstance(service, int | float)
        return cls(float(at), value["kind"], value["class"], float(service), chain, step)


def sped_up(jobs: Iterable[TraceJob], rate: float) -> list[TraceJob]:
    """
    The same jobs arriving ``rate`` times as often (every ``at`` divided by
    it), their service times unchanged: a trace that saturates a host, where
    jobs per hour measure what the host gets through rather than the arrivals.
    """
    if rate <= 0:
        raise ValueError(f"rate must be above 0, not {rate}")
    return [attrs.evolve(job, at=job.at / rate) for job in jobs]


def read_trace(path: Path) -> list[TraceJob]:
    """:raises ValueError: ``<file>:<line>: <problem>`` for the first bad line."""
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            jobs.append(TraceJob.from_json(json.loads(line)))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    return jobs


def write_trace(path: Path, jobs: Iterable[TraceJob]) -> None:
    path.write_text("".join(json.dumps(job.to_json()) + "\n" for job in jobs))


class _Builder:
    """Arrival processes over one seeded random source."""

    def __init__(self, seed: int, duration: float) -> None:
        self.rng = random.Random(seed)
        self.duration = duration
        self.jobs: list[TraceJob] = []
        self._chains = 0

    def single(self, at: float, kind: str, service: tuple[float, float]) -> None:
        self.jobs.append(TraceJob(at, kind, CLASS_OF[kind], self.rng.uniform(*service)))

    def voice_turn(self, at: float) -> None:
        self._chains += 1
        for step, (kind, service) in enumerate(
            (("stt", (0.5, 2.0)), ("llm", (1.0, 4.0)), ("tts", (0.5, 2.0)))
        ):
            self.jobs.append(TraceJob(at, kind, CLASS_OF[kind], self.rng.uniform(*service),
                                      self._chains, step))

    def every(self, low: float, high: float, start: float = 0.0) -> Iterable[float]:
        """Arrival times with gaps drawn uniformly from [low, high]."""
        at = start
        while (at := at + self.rng.uniform(low, high)) < self.duration:
            yield at

    def poisson(self, per_hour: float) -> Iterable[float]:
        at = 0.0
        while (at := at + self.rng.expovariate(per_hour / 3600)) < self.duration:
            yield at

    def done(self) -> list[TraceJob]:
        return sorted(self.jobs, key=lambda job: (job.at, job.chain or 0, job.step))


IMAGE_SECONDS = (8.0, 20.0)
CHAT_SECONDS = (2.0, 8.0)


def voice(seed: int, duration: float = 7200) -> list[TraceJob]:
    """A voice turn every 20-60 s and bursts of 3-10 image prompts every 3-8 min."""
    build = _Builder(seed, duration)
    for at in build.every(20, 60):
        build.voice_turn(at)
    for at in build.every(180, 480):
        for _ in range(build.rng.randint(3, 10)):
            build.single(at, "image", IMAGE_SECONDS)
    return build.done()


def heavy(seed: int, duration: float = 3600) -> list[TraceJob]:
    """A Poisson mix: image 50/h, llm 98/h, stt 206/h, tts 280/h."""
    build = _Builder(seed, duration)
    for kind, rate, service in (("image", 50, IMAGE_SECONDS), ("llm", 98, CHAT_SECONDS),
                                ("stt", 206, (0.5, 2.0)), ("tts", 280, (0.5, 2.0))):
        for at in build.poisson(rate):
            build.single(at, kind, service)
    return build.done()


def backlog(seed: int, duration: float = 7200) -> list[TraceJob]:
    """80 image prompts queued at once, 50 more later, and a voice turn every 1-4 min."""
    build = _Builder(seed, duration)
    for at, count in ((0.0, 80), (duration / 3, 50)):
        for _ in range(count):
            build.single(at, "image", IMAGE_SECONDS)
    for at in build.every(60, 240):
        build.voice_turn(at)
    return build.done()


def card16(seed: int, duration: float = 7200) -> list[TraceJob]:
    """For a 16 GiB card where chat and images cannot coexist: chat 80/h, images 60/h, voice."""
    build = _Builder(seed, duration)
    for at in build.poisson(80):
        build.single(at, "llm", CHAT_SECONDS)
    for at in build.poisson(60):
        build.single(at, "image", IMAGE_SECONDS)
    for at in build.every(60, 180):
        build.voice_turn(at)
    return build.done()


SHAPES: dict[str, Callable[[int, float], list[TraceJob]]] = {
    "voice": voice, "heavy": heavy, "backlog": backlog, "card16": card16,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpumanager.replay.traces",
                                     description="Write a seeded workload trace (JSONL).")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, help="seconds (default: the shape's own)")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args(argv)
    make = SHAPES[options.shape]
    jobs = make(options.seed) if options.duration is None else make(  # type: ignore[call-arg]
        options.seed, options.duration)
    write_trace(options.out, jobs)
    print(f"{options.out}: {len(jobs)} jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
