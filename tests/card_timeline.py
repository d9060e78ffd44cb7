"""
What ran on each simulated card, and when: the servers' own view of their
GPU work, so a test can check per-card mutual exclusion where it matters (at
the card), not in the daemon's bookkeeping.

Every simulated server counts each job it computes (ComfyUI's model load and
sampling, Ollama's generation, mvoice's synthesis) on its ``gpu_meter``.
:func:`watch_cards` gives each server a meter that also writes the job's
start and end, with the server's name, on each of the server's cards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs
from twisted.internet.interfaces import IReactorTime

from mgpumanager.simulate.host import SimulatedHost
from mgpumanager.simulate.recording import ActivityMeter


@attrs.frozen
class Run:
    """One job of ``server`` on a card, in reactor seconds (``end`` None: running)."""

    server: str
    start: float
    end: float | None


class CardTimeline:
    """The runs of one card, in order of start."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.runs: list[Run] = []

    def overlaps(self) -> list[tuple[Run, Run]]:
        """Every pair of runs on this card that were computing at the same instant."""
        pairs = []
        for n, run in enumerate(self.runs):
            for later in self.runs[n + 1:]:
                if run.end is None or later.start < run.end:
                    pairs.append((run, later))
        return pairs

    def of(self, server: str) -> list[Run]:
        return [run for run in self.runs if run.server == server]


class _CardMeter(ActivityMeter):
    """The server's own meter (and the host's), plus a line on each of its cards."""

    def __init__(self, server: str, inner: ActivityMeter, cards: Sequence[CardTimeline],
                 clock: IReactorTime) -> None:
        super().__init__()
        self._server = server
        self._inner = inner
        self._cards = tuple(cards)
        self._clock = clock

    @contextmanager
    def track(self) -> Iterator[None]:
        start = self._clock.seconds()
        slots = []
        for card in self._cards:
            slots.append(len(card.runs))
            card.runs.append(Run(self._server, start, None))
        try:
            with super().track(), self._inner.track():
                yield
        finally:
            end = self._clock.seconds()
            for card, slot in zip(self._cards, slots, strict=True):
                card.runs[slot] = attrs.evolve(card.runs[slot], end=end)


def watch_cards(host: SimulatedHost) -> list[CardTimeline]:
    """
    One timeline per card of ``host`` (before any job runs), fed by every
    server on that card; a server on two cards writes on both.
    """
    timelines = [CardTimeline(index) for index in range(len(host.cards))]
    for name, server in host.servers.items():
        cards = [timelines[index] for index in host.config.cards_of(name)]
        server.gpu_meter = _CardMeter(name, server.gpu_meter, cards, host.clock)
    return timelines
