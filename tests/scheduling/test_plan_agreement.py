"""
The dry run (``GET /v1/plan/<kind>``) is only worth reading if it tells the
truth: for any registry and any card, it must name exactly the victims the
scheduler's real make-room loop then unloads, in the same order.

Each example builds a random set of consumers (sizes, coexistence, residency by
our books or by their own report, last use, unload routes or systemd units or
neither, self-managed or not) on one card or two (each consumer on either or
both), and random cards (read through NVML or not, with or without a
configured size), asks the dry run, then runs the real
:class:`~mgpumanager.scheduling.lifecycle.Lifecycle` on fake cards that free a
victim's memory on each of its cards when it is unloaded, and compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.commands import CommandResult
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.scheduling.eviction import dry_run_plan
from mgpumanager.scheduling.lifecycle import Lifecycle
from mgpumanager.state.gpu import GpuReading, GpuSample, GpuSampler
from mgpumanager.state.registry import Registry
from mgpumanager.web.status import plan_document
from tests.builders import consumer as _consumer
from tests.fakes import static_pids
from tests.support import EPOCH

CARD_MIB = 24576
#: 2026-05-15T10:00:00Z.


def plan_of(*args: Any) -> dict[str, Any]:
    """The dry run as ``GET /v1/plan/<kind>`` shows it."""
    return plan_document(dry_run_plan(*args))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Config, dict[str, Any], str, dict[int, int] | None]:
    """
    A configuration, the registry's state per consumer, a target, NVML's free
    MiB by card (None: no NVML).  Mostly the target needs room (its size declared, not
    on the card, not self-managed) and the card is tight, so that most examples
    evict someone; the rest cover the cases where nothing is done.
    """
    cards = draw(st.sampled_from([(0,), (0, 1)]))
    count = draw(st.integers(3, 6))
    names = [f"c{i}" for i in range(count)]
    target = draw(st.sampled_from(names))
    needs_room = draw(st.integers(0, 4)) > 0
    consumers: dict[str, Any] = {}
    states: dict[str, Any] = {}
    for i, name in enumerate(names):
        way_out = draw(st.sampled_from(["route", "route", "unit", "none"]))
        extra: dict[str, Any] = {
            "vram_resident_mib": draw(st.sampled_from([0, 500, 1500, 3000, 6000, 13000])),
            "vram_managed": draw(st.integers(0, 3)) == 0,
            "can_coexist_with": draw(
                st.lists(st.sampled_from([n for n in names if n != name]), max_size=1)
            ),
        }
        if len(cards) > 1:
            extra["gpus"] = draw(st.sampled_from([[0], [1], [0, 1]]))
        if way_out == "route":
            extra["unload"] = {"path": "/unload"}
        if way_out == "unit":
            extra["systemd_unit"] = f"{name}.service"
        elif draw(st.booleans()):
            extra["load"] = {"path": "/load"}
        states[name] = {
            "believed_loaded": draw(st.integers(0, 3)) > 0,
            "reported_loaded": draw(st.sampled_from([None, None, True, False])),
            "last_used": draw(st.one_of(st.none(), st.integers(0, 5).map(float))),
        }
        if name == target and needs_room:
            extra["vram_managed"] = False
            extra["vram_resident_mib"] = draw(st.sampled_from([3000, 6000, 13000]))
            states[name].update(believed_loaded=False, reported_loaded=None)
        consumers[name] = _consumer(9200 + i, **extra)
    total = draw(st.sampled_from([None, 16384, CARD_MIB]))
    document: dict[str, Any] = {
        "gpu": {"total_mib": total, "reserved_mib": draw(st.sampled_from([0, 1024]))},
        "consumers": consumers,
    }
    if len(cards) > 1:
        document["gpus"] = [{"index": card} for card in cards]
    config = parse_config(document)
    free = (
        {card: draw(st.integers(0, 16000)) for card in cards} if draw(st.booleans()) else None
    )
    return config, states, target, free


def build_registry(config: Config, states: dict[str, Any]) -> Registry:
    registry = Registry(config)
    for name, fields in states.items():
        state = registry[name]
        state.believed_loaded = fields["believed_loaded"]
        state.reported_loaded = fields["reported_loaded"]
        if fields["last_used"] is not None:
            state.last_used = EPOCH + fields["last_used"]
    return registry


class FakeCard:
    """
    NVML's free memory on each card (or no NVML at all); an unload gives the
    victim's back on each of its cards.
    """

    def __init__(self, config: Config, free_mib: dict[int, int] | None) -> None:
        self.cards = config.card_indexes
        self.free_mib = dict(free_mib) if free_mib is not None else None

    def samples(self) -> dict[int, GpuSample]:
        if self.free_mib is None:
            return {card: GpuSample(time=EPOCH) for card in self.cards}
        return {
            card: GpuSample(
                time=EPOCH, reading=GpuReading("fake", CARD_MIB, CARD_MIB - free, free)
            )
            for card, free in self.free_mib.items()
        }

    def sample(self) -> Deferred[GpuSample]:
        return succeed(self.samples()[self.cards[0]])

    def sample_cards(self) -> Deferred[dict[int, GpuSample]]:
        return succeed(self.samples())

    def release(self, by_card: dict[int, int]) -> None:
        if self.free_mib is not None:
            for card, mib in by_card.items():
                self.free_mib[card] += mib


class Answered:
    """A finished empty 200 answer."""

    code = 200

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(None)
        protocol.connectionLost(Failure(ResponseDone()))


class Consumers:
    """
    Every consumer's routes and units: each call answers success, and an unload
    (route or ``systemctl stop``) frees on the card what the victim holds.
    """

    def __init__(self, config: Config, registry: Registry, card: FakeCard) -> None:
        self._config = config
        self._registry = registry
        self._card = card
        self.unloaded: list[str] = []

    def request(self, method: str, url: str, **_: object) -> Deferred[Answered]:
        for name, consumer in self._config.consumers.items():
            if consumer.unload is not None and url == consumer.url + consumer.unload.path:
                self._unload(name)
        return succeed(Answered())

    def run(self, argv: Sequence[str], timeout: float) -> Deferred[CommandResult]:
        action, unit = argv[-2], argv[-1]
        for name, consumer in self._config.consumers.items():
            if action == "stop" and consumer.systemd_unit == unit:
                self._unload(name)
        return succeed(CommandResult(argv=tuple(argv), code=0, output=""))

    def _unload(self, name: str) -> None:
        self.unloaded.append(name)
        self._card.release(self._registry[name].gpu_resident_mib_by_card)


def run_real_loop(
    config: Config, registry: Registry, target: str, free: dict[int, int] | None
) -> list[str]:
    """Prepare ``target`` for real on the fake cards; the consumers unloaded, in order."""
    clock = Clock()
    clock.advance(EPOCH)
    card = FakeCard(config, free)
    consumers = Consumers(config, registry, card)
    control = ConsumerControl(consumers, clock, consumers.run)
    sampler: GpuSampler = card  # type: ignore[assignment]
    lifecycle = Lifecycle(
        config, registry, sampler, control, clock, lambda name: succeed(True), static_pids({})
    )
    done = lifecycle.prepare(target) or succeed(None)
    for _ in range(100):  # each unload without NVML waits one settle period
        if done.called:
            break
        clock.advance(config.lifecycle.settle_seconds)
    outcome: list[object] = []
    done.addBoth(outcome.append)
    assert outcome == [None], f"the real loop did not finish cleanly: {outcome}"
    return consumers.unloaded


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_the_dry_run_names_the_victims_the_real_loop_unloads(
    world: tuple[Config, dict[str, Any], str, dict[int, int] | None],
) -> None:
    config, states, target, free = world
    samples = FakeCard(config, free).samples()

    plan = plan_of(config, build_registry(config, states), target, samples)
    unloaded = run_real_loop(config, build_registry(config, states), target, free)

    cards = f"{len(config.cards)} card{'s' if len(config.cards) > 1 else ''}"
    event(f"{len(unloaded)} unloaded, {'NVML' if free is not None else 'no NVML'}, {cards}")
    assert unloaded == plan["would_evict"]
