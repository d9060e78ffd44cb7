"""
``/v1/status`` on a host with several cards, built from a
configuration and stand-in samples: one ``gpus`` entry per card from its own
settings and sample, the job holding each card, each consumer's cards and its
memory on each, the running jobs and the queue with their cards, removed
consumers' memory on the card that shows it, the placeholders of guests and
yield; and on one card, the document of before with the new keys added and
nothing else changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.eviction import Fit, Step
from mgpumanager.scheduling.lifecycle import Decision, Lifecycle
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.gpu import GpuReading, GpuSample, GpuSampler
from mgpumanager.state.holding import Holder
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import card_of, status_document
from tests.builders import consumer
from tests.support import EPOCH

TWO_CARDS = parse_config({
    "gpu": {"reserved_mib": 1024},
    "gpus": [{"index": 0}, {"index": 1, "reserved_mib": 512, "total_mib": 20000}],
    "routing": {"llm": "chat", "image": "image", "tts": "voice"},
    "consumers": {
        "chat": consumer(9001, "llm", gpus=[0], vram_resident_mib=6000),
        "image": consumer(9002, "image", gpus=[1], vram_resident_mib=9000),
        "voice": consumer(9003, "tts", gpus=[0], vram_resident_mib=3000),
        "wide": consumer(9004, "stt", gpus=[0, 1], vram_resident_mib={0: 2000, 1: 1000}),
    },
})

#: Card 0 read by NVML; card 1 lost by the driver.
SAMPLES = {
    0: GpuSample(time=EPOCH, reading=GpuReading(
        name="Card Zero", total_mib=24576, used_mib=10000, free_mib=14576,
        processes={101: 6000, 4242: 3000}, uuid="GPU-zero")),
    1: GpuSample(time=EPOCH, err="GPU is lost"),
}


class Host:
    """The daemon's state for ``config``, and jobs that run until told to end."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.registry = Registry(config)
        self.scheduler = GpuScheduler(
            self.clock, self.registry, queue=config.queue,
            cards_of=lambda name: config.consumers[name].cards,
        )
        self.lifecycle = Lifecycle(
            config=config, registry=self.registry,
            sampler=GpuSampler(
                lambda: None, lambda call: Deferred(), self.clock, 2, 5  # type: ignore[arg-type,return-value]
            ),
            control=None,  # type: ignore[arg-type]
            clock=self.clock,
            health_check=None,  # type: ignore[arg-type]
            pids=None,  # type: ignore[arg-type]
        )
        self.pending: list[Deferred[None]] = []

    def job(self) -> Callable[[], Deferred[None]]:
        def run() -> Deferred[None]:
            done: Deferred[None] = Deferred()
            self.pending.append(done)
            return done

        return run

    def status(
        self, samples: Mapping[int, GpuSample] | None = None, unmanaged: int = 0
    ) -> dict[str, Any]:
        first = self.config.cards[0].index
        samples = samples if samples is not None else {first: GpuSample()}
        return status_document(
            listen="127.0.0.1:8770", now=self.clock.seconds(), config=self.config,
            sample=samples.get(first, GpuSample()), registry=self.registry,
            scheduler=self.scheduler, lifecycle=self.lifecycle,
            samples=samples, unmanaged_cards=unmanaged,
        )


def busy_host() -> Host:
    """A chat on card 0 and an image on card 1 running, a voice job waiting for card 0."""
    host = Host(TWO_CARDS)
    host.scheduler.submit("chat", host.job())
    host.clock.advance(1)
    host.scheduler.submit("image", host.job())
    host.scheduler.submit("voice", host.job())
    chat = host.registry["chat"]
    chat.measured_resident_mib, chat.measured_by_card = 6000, {0: 6000}
    chat.measured_at = EPOCH
    host.registry.holders["gone"] = Holder(name="gone", size_mib=3000, pids=frozenset({4242}))
    host.registry.holders["unseen"] = Holder(name="unseen", size_mib=700, pids=frozenset())
    return host


def test_each_card_is_an_entry_of_gpus_from_its_own_settings_and_sample() -> None:
    status = busy_host().status(SAMPLES, unmanaged=2)
    zero, one = status["gpus"]
    assert zero == {
        "index": 0, "uuid": "GPU-zero", "name": "Card Zero", "total_mib": 24576,
        "used_mib": 10000, "free_mib": 14576, "reserved_mib": 1024,
        "last_sample": "2026-05-15T10:00:00.000Z", "err": None,
        "holders": [{"name": "gone", "size_mib": 3000}, {"name": "unseen", "size_mib": 700}],
        "guests": [], "guest_mib": 0, "running": 1, "yielded": None,
    }
    assert one["index"] == 1 and one["err"] == "GPU is lost"
    assert one["total_mib"] == 20000, "the configured size, as for gpu"
    assert one["reserved_mib"] == 512, "the card's own setting"
    assert (one["used_mib"], one["free_mib"], one["name"], one["uuid"]) == (None,) * 4
    assert one["running"] == 2 and one["holders"] == []
    assert status["unmanaged_cards"] == 2


def test_gpu_describes_the_first_card() -> None:
    status = busy_host().status(SAMPLES)
    gpu, zero = status["gpu"], status["gpus"][0]
    for key in ("total_mib", "used_mib", "free_mib", "reserved_mib", "last_sample", "name"):
        assert gpu[key] == zero[key], key
    assert "err" not in gpu


def test_a_card_read_by_uuid_and_a_card_not_read_yet() -> None:
    config = parse_config({
        "gpus": [{"index": 0}, {"uuid": "GPU-abc"}], "consumers": {"chat": consumer(9001, "llm")},
    })
    zero, one = Host(config).status({0: SAMPLES[0]})["gpus"]
    assert (one["index"], one["uuid"], one["last_sample"], one["running"]) == (
        1, "GPU-abc", None, None)
    assert zero["running"] is None


def test_consumers_say_their_cards_and_their_memory_on_each() -> None:
    consumers = {c["name"]: c for c in busy_host().status(SAMPLES)["consumers"]}
    assert consumers["chat"]["gpus"] == [0]
    assert consumers["chat"]["gpu_resident_mib_by_card"] == {"0": 6000}
    assert consumers["image"]["gpus"] == [1]
    assert consumers["wide"]["gpus"] == [0, 1]
    # Resident by our bookkeeping, not measured: its declared size on each card.
    assert consumers["wide"]["gpu_resident_mib_by_card"] == {"0": 2000, "1": 1000}


def test_running_jobs_and_the_queue_carry_their_cards() -> None:
    scheduler = busy_host().status(SAMPLES)["scheduler"]
    running = scheduler["running_jobs"]
    assert [(job["id"], job["consumer"], job["cards"]) for job in running] == [
        (1, "chat", [0]), (2, "image", [1])]
    assert scheduler["running"] == running[0], "the earliest started, as before"
    assert [(job["consumer"], job["cards"]) for job in scheduler["queue"]] == [("voice", [0])]


def test_a_plan_step_or_decision_says_its_card() -> None:
    fit = Fit(True, "nvml", 0, 0, "fits")
    assert card_of(Step(fit, [], None, "fits", card=1)) == {"card": 1}
    made_room = Decision(0.0, "voice", fit, [], None, card=1)
    assert card_of(made_room) == {"card": 1}
    timeout = Decision(0.0, "voice", fit, [], None, type="timeout")
    assert card_of(timeout) == {"card": None}


#: The keys the one-card document had before several cards.
GPU_KEYS = {"total_mib", "used_mib", "free_mib", "reserved_mib", "last_sample", "holders",
            "released_holders"}
CONSUMER_KEYS = {
    "name", "url", "healthy", "loaded", "gpu_resident_mib", "peak_resident_mib",
    "vram_budget_mib", "vram_managed", "active", "total_requests", "loads", "unloads",
    "last_used", "last_probe", "last_error", "priority", "can_coexist_with", "adapter",
    "size_mib",
}


def test_one_card_shows_what_it_showed_plus_the_new_keys() -> None:
    config = parse_config({
        "gpu": {"total_mib": 16384},
        "consumers": {"chat": consumer(9001, "llm", vram_resident_mib=6000)},
    })
    host = Host(config)
    host.scheduler.submit("chat", host.job())
    status = host.status()
    assert set(status) == {"listen", "time", "gpu", "routing", "consumers", "scheduler",
                           "gpus", "unmanaged_cards"}
    assert set(status["gpu"]) == GPU_KEYS
    (card,) = status["gpus"]
    assert (card["index"], card["total_mib"], card["running"]) == (0, 16384, 1)
    (chat,) = status["consumers"]
    assert set(chat) == CONSUMER_KEYS | {"gpus", "gpu_resident_mib_by_card"}
    assert (chat["gpus"], chat["gpu_resident_mib_by_card"]) == ([0], {"0": 6000})
    running = status["scheduler"]["running"]
    assert status["scheduler"]["running_jobs"] == [running]
    assert running["cards"] == [0]
