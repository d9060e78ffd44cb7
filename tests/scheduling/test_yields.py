"""
Guests on the card, with a ``Clock`` and a scripted card: a yield waits for
the running job (never interrupting it), unloads the card's consumers and holds
the card; jobs wait meanwhile and run after the resume; ``seconds`` end a yield
by themselves; a resume before the card is held gives the yield up; the
queue's ETAs count a yield's end; auto-yield starts after two samples over the
threshold and ends after the cooldown; reclaim unloads the least recently used
idle consumers until the headroom is met; without NVML they are off.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred

from mgpumanager.common.errors import ApiError
from mgpumanager.config.document import Config
from mgpumanager.config.scheduling import SchedulingConfig
from mgpumanager.scheduling.choosing import PolicyChooser
from mgpumanager.scheduling.policy import make_policy
from mgpumanager.scheduling.reclaim import GuestKeeper
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.yields import CardYields, Yielded
from mgpumanager.state.guests import GuestWatch
from tests.jobs import Jobs
from tests.lifecycle_world import CONFIG, SMALL, World
from tests.support import EPOCH, assert_no_result, failure_result_of, success_result_of

GUEST_PID = 999  # what the scripted card reports for a holder it does not know


@attrs.define
class Host:
    world: World
    scheduler: GpuScheduler
    yields: CardYields
    jobs: Jobs

    def settle(self, result: Deferred[Any], seconds: float = 30.0) -> None:
        """Let the clock run (unloads are verified by polling) until ``result`` fires."""
        for _ in range(int(seconds / 0.25)):
            if result.called:
                return
            self.world.clock.advance(0.25)


def host(config: Config = CONFIG, loaded: dict[str, bool] | None = None) -> Host:
    world = World(config, loaded=loaded)
    return Host(world, world.built.scheduler, world.built.yields, Jobs())


def test_a_yield_waits_for_the_running_job_then_unloads_every_consumer_on_the_card() -> None:
    h = host(loaded={"voice": True, "whisper": True, "image": False})
    job = h.scheduler.submit("voice", h.jobs.job("voice"))
    asked = h.yields.yield_card(0, reason="a game")
    assert_no_result(asked)
    assert h.world.client.urls() == [], "nothing is unloaded under the running job"
    h.jobs.finish("voice")
    assert success_result_of(job) == "voice", "the running job ends as it would have"
    h.settle(asked)
    held = success_result_of(asked)
    assert (held.reason, held.until) == ("a game", None)
    assert not h.world.registry["voice"].resident and not h.world.registry["whisper"].resident
    assert ["sudo", "-n", "systemctl", "stop", "whisper.service"] in [
        argv for argv, _ in h.world.commands.calls]
    types = [(d.type, d.card) for d in h.world.lifecycle.decisions]
    assert ("yield", 0) in types and types.count(("yield", 0)) >= 2


def test_jobs_wait_during_a_yield_and_run_whole_after_the_resume() -> None:
    h = host(loaded={"voice": True})
    asked = h.yields.yield_card(0, reason="a game")
    h.settle(asked)
    job = h.scheduler.submit("voice", h.jobs.job("voice"))
    h.world.clock.advance(60)
    assert h.jobs.started == [] and h.scheduler.queue_depth == 1
    assert h.yields.resume(0) is True
    h.settle(Deferred())  # the job's consumer loads again first
    assert h.jobs.started == ["voice"]
    h.jobs.finish("voice")
    assert success_result_of(job) == "voice"
    assert "resume" in [d.type for d in h.world.lifecycle.decisions]


def test_a_yield_with_seconds_ends_by_itself() -> None:
    h = host(loaded={"voice": True})
    asked = h.yields.yield_card(0, seconds=30, reason="a match")
    h.settle(asked)
    held: Yielded = success_result_of(asked)
    assert held.until == held.since + 30
    h.world.clock.advance(29)
    assert h.yields.of(0) is not None
    h.world.clock.advance(1)
    assert h.yields.of(0) is None
    job = h.scheduler.submit("voice", h.jobs.job("voice"))
    h.settle(Deferred(), 5)
    assert h.jobs.started == ["voice"]
    h.jobs.finish("voice")
    success_result_of(job)


def test_a_resume_before_the_card_is_held_gives_the_yield_up() -> None:
    h = host(loaded={"voice": True})
    h.scheduler.submit("voice", h.jobs.job("first"))
    asked = h.yields.yield_card(0, reason="a game")
    h.yields.resume(0)
    error = failure_result_of(asked, ApiError).value
    assert (error.kind.code, error.status) == ("yield_given_up", 409)
    second = h.scheduler.submit("voice", h.jobs.job("second"))
    h.jobs.finish("first")
    assert h.jobs.started == ["first", "second"], "the card went straight to the next job"
    h.jobs.finish("second")
    success_result_of(second)
    assert h.yields.of(0) is None


def test_the_queue_counts_a_yields_end_in_its_etas() -> None:
    h = host(loaded={"voice": True})
    # The default chooser knows no ETAs: the policy's does.
    chooser = PolicyChooser(make_policy(SchedulingConfig()), lambda name: False)
    h.scheduler = GpuScheduler(h.world.clock, h.world.registry, h.world.lifecycle.prepare,
                               queue=CONFIG.queue, chooser=chooser)
    h.world.clock.advance(0)
    chooser.estimates.observe("run", "voice", 5.0)
    h.scheduler.submit("voice", h.jobs.job("first"))
    h.scheduler.submit("voice", h.jobs.job("second"))
    [entry] = h.scheduler.queue_entries()
    assert entry.eta_seconds is not None and entry.eta_seconds <= 5.0
    now = h.world.clock.seconds()
    h.scheduler.holds.held_until(0, now + 100)
    assert [e.eta_seconds for e in h.scheduler.queue_entries()] == [100.0]
    h.scheduler.holds.held_until(0, None)
    assert [e.eta_seconds for e in h.scheduler.queue_entries()] == [None]
    h.scheduler.holds.given_back(0)
    assert h.scheduler.queue_entries()[0].eta_seconds == entry.eta_seconds


def keeper_for(h: Host) -> tuple[GuestWatch, GuestKeeper]:
    return h.world.built.guests, h.world.built.keeper


def with_gpu(config: Config, **settings: Any) -> Config:
    return attrs.evolve(config, gpu=attrs.evolve(config.gpu, **settings))


def sample(h: Host) -> None:
    success_result_of(h.world.sampler.sample_cards())


def test_auto_yield_starts_after_two_samples_over_and_ends_after_the_cooldown() -> None:
    config = with_gpu(CONFIG, yield_to_guests_mib=4000, yield_cooldown_seconds=30)
    h = host(config, loaded={"voice": True})
    guests, _ = keeper_for(h)
    h.world.card.held["game"] = 5000
    sample(h)
    assert [(g.pid, g.mib) for g in guests.on(0)] == [(GUEST_PID, 5000)]
    assert h.yields.of(0) is None, "one sample over is not yet enough"
    sample(h)
    h.settle(Deferred(), 5)
    held = h.yields.of(0)
    assert held is not None and (held.reason, held.auto) == ("guest", True)
    assert not h.world.registry["voice"].resident
    del h.world.card.held["game"]
    sample(h)
    h.world.clock.advance(29)
    sample(h)
    assert h.yields.of(0) is not None, "the cooldown is not over"
    h.world.clock.advance(1)
    sample(h)
    assert h.yields.of(0) is None


def test_reclaim_unloads_the_least_recently_used_idle_consumers_until_the_headroom() -> None:
    config = with_gpu(SMALL, guest_headroom_mib=3000)
    loaded = {f"s{i}": True for i in range(1, 5)} | {"big": False}
    h = host(config, loaded=loaded)
    for age, name in enumerate(["s3", "s1", "s4", "s2"]):
        h.world.registry[name].last_used = EPOCH + age  # s3 is the least recently used
    for name in loaded:
        if loaded[name]:
            h.world.card.held[name] = 1000
    keeper_for(h)
    h.world.card.held["game"] = 3000  # 8192 - 4000 - 3000: 1192 MiB free
    sample(h)
    h.settle(Deferred(), 10)
    gone = [name for name in ("s1", "s2", "s3", "s4") if not h.world.registry[name].resident]
    assert gone == ["s1", "s3"], "least recently used first, and no more than the headroom needs"
    assert h.world.card.free_mib >= 3000
    assert {d.type for d in h.world.lifecycle.decisions} == {"reclaim"}


def test_without_nvml_reclaim_and_auto_yield_are_off_and_a_yield_still_works() -> None:
    config = with_gpu(CONFIG, yield_to_guests_mib=1, guest_headroom_mib=100000)
    h = host(config, loaded={"voice": True})
    h.world.card.available = False
    keeper_for(h)
    sample(h)
    sample(h)
    assert h.yields.of(0) is None and h.world.registry["voice"].resident
    asked = h.yields.yield_card(0, reason="manual")
    h.settle(asked)
    assert success_result_of(asked).reason == "manual"
