"""
The scheduler on a host with several cards, with a ``Clock``: one lock per
card; jobs on different cards run together, on one card one at a time; a job
takes all its cards at once, only when all are free; a job that cannot start
reserves its cards, so a two-card job is not starved by one-card jobs; and a
seeded random workload never deadlocks, never overlaps on a card, and answers
every job.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from tests.builders import consumer
from tests.support import EPOCH, success_result_of

CARDS = {"chat": (0,), "image": (1,), "voice": (0,), "big": (0, 1)}
CONFIG = parse_config(
    {"consumers": {name: consumer(9000 + i, "llm") for i, name in enumerate(CARDS)}}
)


class Cards:
    """Job callables that hold their consumer's cards until finished, watching overlap."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.holding: dict[int, str] = {}
        self.started: list[str] = []
        self.pending: dict[str, Deferred[str]] = {}
        self.overlaps: list[tuple[int, str, str]] = []

    def job(self, label: str, name: str) -> Callable[[], Deferred[str]]:
        def run() -> Deferred[str]:
            for card in CARDS[name]:
                if card in self.holding:
                    self.overlaps.append((card, self.holding[card], label))
                self.holding[card] = label
            self.started.append(label)
            d: Deferred[str] = Deferred()
            self.pending[label] = d
            return d

        return run

    def finish(self, label: str) -> None:
        for card, holder in list(self.holding.items()):
            if holder == label:
                del self.holding[card]
        self.pending.pop(label).callback(label)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(EPOCH)
    return clock


def scheduler_on_cards(clock: Clock) -> GpuScheduler:
    return GpuScheduler(clock, Registry(CONFIG), queue=CONFIG.queue, cards_of=CARDS.__getitem__)


def test_jobs_on_different_cards_run_together(clock: Clock) -> None:
    scheduler, cards = scheduler_on_cards(clock), Cards(clock)
    chat = scheduler.submit("chat", cards.job("chat", "chat"))
    image = scheduler.submit("image", cards.job("image", "image"))
    assert cards.started == ["chat", "image"]
    assert [job.cards for job in scheduler.running_jobs] == [(0,), (1,)]
    cards.finish("image")
    cards.finish("chat")
    assert success_result_of(chat) == "chat" and success_result_of(image) == "image"
    assert cards.overlaps == []


def test_jobs_on_one_card_wait_for_each_other(clock: Clock) -> None:
    scheduler, cards = scheduler_on_cards(clock), Cards(clock)
    scheduler.submit("chat", cards.job("chat", "chat"))
    scheduler.submit("voice", cards.job("voice", "voice"))
    scheduler.submit("image", cards.job("image", "image"))
    assert cards.started == ["chat", "image"], "voice waits for card 0; image runs on card 1"
    cards.finish("chat")
    assert cards.started == ["chat", "image", "voice"]
    assert cards.overlaps == []


def test_a_two_card_job_takes_both_cards_at_once_only_when_both_are_free(clock: Clock) -> None:
    scheduler, cards = scheduler_on_cards(clock), Cards(clock)
    scheduler.submit("chat", cards.job("chat", "chat"))
    big = scheduler.submit("big", cards.job("big", "big"))
    assert cards.started == ["chat"]
    assert 1 not in cards.holding, "card 1 is not held while waiting for card 0"
    cards.finish("chat")
    assert cards.started == ["chat", "big"]
    assert cards.holding == {0: "big", 1: "big"}
    cards.finish("big")
    assert success_result_of(big) == "big"


def test_a_two_card_job_is_not_starved_by_one_card_jobs(clock: Clock) -> None:
    scheduler, cards = scheduler_on_cards(clock), Cards(clock)
    scheduler.submit("chat", cards.job("chat-0", "chat"))
    scheduler.submit("image", cards.job("image-0", "image"))
    scheduler.submit("big", cards.job("big", "big"))
    # One-card jobs keep arriving on both cards after the two-card job.
    for n in range(1, 4):
        scheduler.submit("chat", cards.job(f"chat-{n}", "chat"))
        scheduler.submit("image", cards.job(f"image-{n}", "image"))
    cards.finish("image-0")
    assert cards.started == ["chat-0", "image-0"], "card 1 stays reserved for the big job"
    cards.finish("chat-0")
    assert cards.started[-1] == "big", "the big job starts once its cards' jobs end"
    cards.finish("big")
    assert set(cards.started[-2:]) == {"chat-1", "image-1"}
    assert cards.overlaps == []


def test_the_running_job_is_the_earliest_started(clock: Clock) -> None:
    scheduler, cards = scheduler_on_cards(clock), Cards(clock)
    scheduler.submit("chat", cards.job("chat", "chat"))
    clock.advance(1)
    scheduler.submit("image", cards.job("image", "image"))
    running = scheduler.running
    assert running is not None and running.view.consumer == "chat"
    cards.finish("chat")
    running = scheduler.running
    assert running is not None and running.view.consumer == "image"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_workload_never_deadlocks_overlaps_or_loses_a_job(
    clock: Clock, seed: int
) -> None:
    rng = random.Random(seed)
    scheduler, cards = scheduler_on_cards(clock), Cards(clock)
    names = list(CARDS)
    results = []
    for n in range(240):
        name = rng.choice(names)
        results.append(scheduler.submit(name, cards.job(f"{name}-{n}", name)))
        # Finish a random running job now and then, so the queue both grows and drains.
        if cards.pending and rng.random() < 0.6:
            cards.finish(rng.choice(sorted(cards.pending)))
    while cards.pending:
        cards.finish(rng.choice(sorted(cards.pending)))
    assert cards.overlaps == []
    assert all(result.called for result in results), "every job ran: no deadlock"
    assert scheduler.queue_depth == 0 and scheduler.in_flight == 0
    assert len(cards.started) == 240
