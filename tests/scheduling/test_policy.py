"""
The scheduling policies, rule by rule, then on a simulated card: a voice turn
must not wait for a batch of image prompts, and the batch must still run.
"""

from __future__ import annotations

import heapq
import random
import time

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpumanager.scheduling.policy import (
    BATCH,
    DUE_BYPASS,
    DUE_SWAP,
    EMPTY,
    FIFO,
    GUARD,
    INTERACTIVE,
    LINGER,
    NO_SWAP,
    SWAP,
    Estimates,
    FifoPolicy,
    History,
    InteractiveFirstPolicy,
    Policy,
    SchedulingConfig,
    SchedulingConfigError,
    Waiting,
    after_start,
    make_policy,
)

CONFIG = SchedulingConfig()
POLICY = InteractiveFirstPolicy(CONFIG)
FRESH = History()


def job(
    id: int, job_class: str = INTERACTIVE, arrived: float = 0.0, priority: int = 0,
    swap: bool = False, bypassed: int = 0, consumer: str = "",
) -> Waiting:
    return Waiting(id=id, consumer=consumer or f"c{id}", kind="tts", job_class=job_class,
                   priority=priority, arrived=arrived, bypassed=bypassed, needs_swap=swap)


def picked(waiting: list[Waiting], now: float = 10.0, history: History = FRESH,
           policy: Policy = POLICY) -> tuple[int | None, str]:
    choice = policy.pick(waiting, now, history)
    return (choice.job.id if choice.job else None), choice.rule


# --- configuration -----------------------------------------------------------

def test_config_defaults_match_the_documented_section() -> None:
    config = SchedulingConfig.from_mapping(None)
    assert config == SchedulingConfig()
    assert (config.policy, config.batch_guard_seconds, config.swap_bound_seconds,
            config.max_bypass, config.linger_seconds) == ("interactive-first", 300, 30, 8, 12)
    assert [config.class_of(k) for k in ("tts", "stt", "llm", "image", "other")] == [
        INTERACTIVE, INTERACTIVE, INTERACTIVE, BATCH, INTERACTIVE]


def test_config_classes_override_kind_by_kind() -> None:
    config = SchedulingConfig.from_mapping(
        {"policy": "fifo", "linger_seconds": 0, "max_bypass": 3, "classes": {"llm": "batch"}})
    assert (config.policy, config.linger_seconds, config.max_bypass) == (FIFO, 0.0, 3)
    assert (config.class_of("llm"), config.class_of("image"), config.class_of("tts")) == (
        BATCH, BATCH, INTERACTIVE)
    assert isinstance(make_policy(config), FifoPolicy)


@pytest.mark.parametrize(("table", "key", "words"), [
    ({"policy": "lifo"}, "policy", "interactive-first, fifo"),
    ({"batch_guard": 3}, "batch_guard", "unknown key"),
    ({"swap_bound_seconds": 0}, "swap_bound_seconds", "positive"),
    ({"linger_seconds": -1}, "linger_seconds", "zero or more"),
    ({"batch_guard_seconds": "5m"}, "batch_guard_seconds", "number of seconds"),
    ({"max_bypass": 0}, "max_bypass", "at least 1"),
    ({"max_bypass": True}, "max_bypass", "whole number"),
    ({"classes": {"image": "bulk"}}, "classes.image", "interactive or batch"),
    ({"classes": ["image"]}, "classes", "mapping"),
    ([1], "scheduling", "mapping"),
])
def test_config_errors_name_the_key(table: object, key: str, words: str) -> None:
    with pytest.raises(SchedulingConfigError) as caught:
        SchedulingConfig.from_mapping(table)
    assert caught.value.key == key
    assert words in caught.value.problem
    assert isinstance(caught.value, ValueError)


# --- interactive-first, rule by rule --------------------------------------------

def test_an_empty_queue_picks_nothing() -> None:
    assert picked([]) == (None, EMPTY)
    assert picked([], policy=FifoPolicy()) == (None, EMPTY)


def test_interactive_jobs_go_before_earlier_batch_jobs() -> None:
    assert picked([job(1, BATCH, arrived=0), job(2, arrived=5, swap=True)]) == (2, SWAP)


def test_batch_jobs_run_when_no_interactive_job_waits() -> None:
    waiting = [job(1, BATCH, arrived=3, swap=True), job(2, BATCH, arrived=4)]
    assert picked(waiting) == (2, NO_SWAP)


def test_a_job_that_needs_no_swap_goes_first_within_its_class() -> None:
    waiting = [job(1, arrived=1, swap=True, priority=4), job(2, arrived=2)]
    assert picked(waiting) == (2, NO_SWAP)


def test_priority_then_arrival_within_a_group() -> None:
    waiting = [job(1, arrived=1), job(2, arrived=2, priority=3), job(3, arrived=0.5, priority=3)]
    assert picked(waiting) == (3, NO_SWAP)
    assert picked(waiting[:2]) == (2, NO_SWAP)
    assert picked([job(5, arrived=1), job(4, arrived=1)]) == (4, NO_SWAP)


def test_the_batch_guard_picks_the_oldest_batch_job_once_expired() -> None:
    waiting = [job(1, arrived=0), job(2, BATCH, arrived=50, priority=4),
               job(3, BATCH, arrived=20, swap=True)]
    history = History(last_batch_start=100)
    assert picked(waiting, now=399.9, history=history) == (1, NO_SWAP)
    assert picked(waiting, now=400, history=history) == (3, GUARD)
    # Without a batch start, the guard counts from the oldest waiting batch job.
    assert picked(waiting, now=320, history=FRESH) == (3, GUARD)


def test_a_job_bypassed_max_times_is_due() -> None:
    waiting = [job(1, arrived=5), job(2, BATCH, arrived=0, swap=True, bypassed=8)]
    assert picked(waiting) == (2, DUE_BYPASS)
    assert picked([job(1, arrived=5), job(2, BATCH, swap=True, bypassed=7)]) == (1, NO_SWAP)


def test_an_interactive_job_needing_a_swap_is_due_after_the_swap_bound() -> None:
    waiting = [job(1, arrived=10), job(2, arrived=0, swap=True)]
    assert picked(waiting, now=29.9) == (1, NO_SWAP)
    assert picked(waiting, now=30) == (2, DUE_SWAP)
    # A batch job is never due by the swap bound, however long it waits.
    assert picked([job(1, arrived=100), job(2, BATCH, arrived=0, swap=True)], now=200) == (
        1, NO_SWAP)


def test_linger_holds_batch_work_that_needs_a_swap() -> None:
    history = History(last_interactive_end=10)
    waiting = [job(1, BATCH, arrived=2, swap=True), job(2, BATCH, arrived=3, swap=True)]
    hold = POLICY.pick(waiting, 10.4, history)
    assert (hold.job, hold.rule, hold.wake_at) == (None, LINGER, 22)
    assert picked(waiting, now=21.9, history=history) == (None, LINGER)
    assert picked(waiting, now=22, history=history) == (1, SWAP)
    # A job that needs no swap ends the linger at once, of either class.
    assert picked([*waiting, job(3, arrived=10.2)], 10.4, history) == (3, NO_SWAP)
    assert picked([*waiting, job(4, BATCH, arrived=10.2)], 10.4, history) == (4, NO_SWAP)


def test_linger_never_holds_an_interactive_job() -> None:
    history = History(last_interactive_end=10)
    # However fresh the linger and whatever else waits, an interactive job
    # that needs a swap starts at once: only batch work waits on the card.
    assert picked([job(1, arrived=9, swap=True)], 10.0, history) == (1, SWAP)
    waiting = [job(1, BATCH, arrived=2, swap=True), job(2, arrived=3, swap=True)]
    assert picked(waiting, 10.4, history) == (2, SWAP)


def test_linger_never_holds_a_due_job_or_an_expired_guard() -> None:
    history = History(last_interactive_end=400)
    assert picked([job(1, arrived=370, swap=True)], 400.5, history) == (1, DUE_SWAP)
    assert picked([job(2, BATCH, arrived=0, swap=True)], 400.5, history) == (2, GUARD)
    assert picked([job(3, BATCH, arrived=390, swap=True, bypassed=8)], 400.5, history) == (
        3, DUE_BYPASS)
    # The linger wakes when the guard expires, if that comes first.
    guard_soon = POLICY.pick([job(4, BATCH, arrived=104, swap=True)], 400.5, history)
    assert (guard_soon.rule, guard_soon.wake_at) == (LINGER, pytest.approx(404))


def test_no_linger_after_a_batch_job_or_when_disabled() -> None:
    waiting = [job(1, arrived=3, swap=True)]
    assert picked(waiting, 10.2, History(last_batch_start=9)) == (1, SWAP)
    off = InteractiveFirstPolicy(attrs.evolve(CONFIG, linger_seconds=0))
    assert picked(waiting, 10.0, History(last_interactive_end=10), policy=off) == (1, SWAP)


def test_fifo_is_priority_then_arrival_whatever_the_class_or_swap() -> None:
    fifo = FifoPolicy()
    waiting = [job(1, BATCH, arrived=0, swap=True), job(2, arrived=1), job(3, arrived=2,
                                                                           priority=1)]
    assert picked(waiting, policy=fifo) == (3, FIFO)
    assert [j.id for j in fifo.order(waiting, 10, FRESH)] == [3, 1, 2]


# --- scale and order -------------------------------------------------------------

def test_a_full_queue_of_512_is_picked_correctly_in_one_pass() -> None:
    rng = random.Random(7)
    waiting = [job(i, rng.choice([INTERACTIVE, BATCH]), arrived=rng.uniform(0, 100),
                   priority=rng.randrange(5), swap=rng.random() < 0.7) for i in range(512)]
    expected = min((j for j in waiting if j.job_class == INTERACTIVE and not j.needs_swap),
                   key=lambda j: (-j.priority, j.arrived))
    started = time.perf_counter()
    rounds = 200
    for _ in range(rounds):
        choice = POLICY.pick(waiting, 20.0, FRESH)
    per_pick = (time.perf_counter() - started) / rounds
    assert choice.job == expected and choice.rule == NO_SWAP
    started = time.perf_counter()
    order = POLICY.order(waiting, 20.0, FRESH)
    print(f"\npick over 512 waiting: {per_pick * 1e3:.2f} ms; "
          f"order: {(time.perf_counter() - started) * 1e3:.2f} ms")
    assert sorted(j.id for j in order) == list(range(512))


def successive_picks(policy: Policy, waiting: list[Waiting], now: float,
                     history: History) -> list[int]:
    ids = []
    while waiting:
        choice = policy.pick(waiting, now, history)
        assert choice.job is not None
        ids.append(choice.job.id)
        waiting, history = after_start(choice.job, waiting, now, history)
    return ids


waiting_jobs = st.lists(
    st.builds(lambda cls, arrived, priority, swap, bypassed: (cls, arrived, priority, swap,
                                                              bypassed),
              st.sampled_from([INTERACTIVE, BATCH]), st.integers(0, 400), st.integers(0, 2),
              st.booleans(), st.integers(0, 3)),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(waiting_jobs, st.sampled_from([None, 50, 150]), st.sampled_from([2, 3, 8]))
def test_order_is_what_successive_picks_would_run(
    specs: list[tuple[str, int, int, bool, int]], last_batch: int | None, max_bypass: int
) -> None:
    waiting = [job(i, cls, arrived, prio, swap, bypassed)
               for i, (cls, arrived, prio, swap, bypassed) in enumerate(specs)]
    policy = InteractiveFirstPolicy(attrs.evolve(CONFIG, max_bypass=max_bypass,
                                                 batch_guard_seconds=200))
    history = History(last_batch_start=last_batch)
    expected = successive_picks(policy, waiting, 420.0, history)
    assert [j.id for j in policy.order(waiting, 420.0, history)] == expected
    assert [j.id for j in FifoPolicy().order(waiting, 420.0, history)] == successive_picks(
        FifoPolicy(), waiting, 420.0, history)


def test_after_start_bumps_only_the_jobs_before_it_in_class_priority_arrival_order() -> None:
    waiting = [job(1, arrived=1), job(2, BATCH, arrived=2), job(3, arrived=3),
               job(4, BATCH, arrived=1), job(5, BATCH, arrived=4), job(6, BATCH, arrived=0,
                                                                      priority=1)]
    # A batch job going first bypasses every interactive job, earlier or later
    # arrival, and the batch jobs before it: earlier, or of higher priority.
    rest, history = after_start(waiting[1], waiting, 9.0, FRESH)
    assert [(j.id, j.bypassed) for j in rest] == [(1, 1), (3, 1), (4, 1), (5, 0), (6, 1)]
    assert history == History(last_batch_start=9.0)
    # An interactive job going first bypasses no batch job, however early.
    rest, _ = after_start(waiting[2], waiting, 9.0, FRESH)
    assert [(j.id, j.bypassed) for j in rest] == [(1, 1), (2, 0), (4, 0), (5, 0), (6, 0)]
    assert history.ended(INTERACTIVE, 12.0) == History(9.0, 12.0)
    assert history.ended(BATCH, 12.0) == history


# --- ETA -------------------------------------------------------------------------

def test_eta_adds_run_load_and_unload_averages_in_run_order() -> None:
    estimates = Estimates(weight=0.5)
    for what, consumer, seconds in [("run", "tts", 2), ("run", "tts", 4), ("run", "image", 20),
                                    ("load", "image", 15), ("unload", "tts", 1)]:
        estimates.observe(what, consumer, seconds)
    assert estimates.average("run", "tts") == 3.0
    order = [job(1, consumer="tts"), job(2, BATCH, consumer="image", swap=True),
             job(3, consumer="tts")]

    def needs_swap(this: Waiting, previous: Waiting | None) -> bool:
        return this.consumer != (previous.consumer if previous else "tts")

    # 5 s left of the running job, tts 3 s, then unload tts 1 + load image 15 + run 20.
    assert estimates.eta_seconds(order, 5.0, needs_swap, "tts") == [5.0, 8.0, 44.0]
    # The tts job after the image needs tts loaded again: no load average yet.
    assert estimates.eta_seconds([*order, job(4)], 5.0, needs_swap, "tts")[3] is None
    estimates.observe("load", "tts", 2)
    estimates.observe("unload", "image", 2)
    assert estimates.eta_seconds([*order, job(4, consumer="tts")], 5.0, needs_swap, "tts")[
        3] == 44.0 + 2 + 2 + 3


def test_eta_is_unknown_after_a_consumer_without_averages() -> None:
    estimates = Estimates()
    estimates.observe("run", "tts", 2)
    order = [job(1, consumer="stt"), job(2, consumer="tts")]
    assert estimates.eta_seconds(order, 0.0, lambda j, p: False) == [0.0, None]
    assert estimates.eta_seconds(order[1:], None, lambda j, p: False) == [None]
    with pytest.raises(ValueError):
        Estimates(weight=0)


# --- a simulated card --------------------------------------------------------------

SIZE_GIB = {"stt": 2, "tts": 2, "llm": 8, "image": 13}
LOAD_SECONDS = {"stt": 2.0, "tts": 2.0, "llm": 4.0, "image": 15.0}
UNLOAD_SECONDS = 1.0
CARD_GIB = 16
CHAIN = (("stt", 1.0), ("llm", 3.0), ("tts", 2.0))


@attrs.define
class Run:
    waits: dict[str, list[float]] = attrs.Factory(lambda: {INTERACTIVE: [], BATCH: []})
    guard_gaps: list[float] = attrs.Factory(list)
    rules: list[str] = attrs.Factory(list)
    longest_job: float = 0.0


def voice_and_image_bursts(seed: int, seconds: float, turn_gap: tuple[float, float],
                           burst_gap: tuple[float, float]) -> list[tuple[float, str, float, int]]:
    """Voice turns (chains of stt, llm, tts) and bursts of image prompts."""
    rng = random.Random(seed)
    arrivals = []
    at = 0.0
    while (at := at + rng.uniform(*turn_gap)) < seconds:
        arrivals.append((at, "voice", 0.0, 0))
    at = 0.0
    while (at := at + rng.uniform(*burst_gap)) < seconds:
        arrivals += [(at, "image", rng.uniform(15, 30), 0)] * rng.randint(3, 10)
    return arrivals


def simulate(policy: Policy, arrivals: list[tuple[float, str, float, int]]) -> Run:
    """One lock, least-recently-used eviction, real load and unload costs."""
    run = Run()
    events: list[tuple[float, int, str, float, int]] = []
    for n, (at, kind, service, step) in enumerate(arrivals):
        heapq.heappush(events, (at, n, kind, service, step))
    next_id = len(arrivals)
    resident: list[str] = []
    queue: list[Waiting] = []
    details: dict[int, tuple[str, float, int]] = {}
    history, now, busy_until = History(), 0.0, 0.0
    wake: float | None = None

    def admit(until: float) -> None:
        while events and events[0][0] <= until:
            at, n, kind, service, step = heapq.heappop(events)
            if kind == "voice":
                kind, service = CHAIN[step]
            details[n] = (kind, service, step)
            queue.append(Waiting(n, kind, kind, CONFIG.class_of(kind), 0, at))

    while events or queue:
        admit(now)
        queue = [attrs.evolve(j, needs_swap=j.consumer not in resident) for j in queue]
        choice = policy.pick(queue, now, history) if queue else None
        if choice is None or choice.job is None:
            wake = choice.wake_at if choice else None
            upcoming = [t for t in (wake, events[0][0] if events else None) if t is not None]
            now = max(now, min(upcoming))
            continue
        started = choice.job
        run.rules.append(choice.rule)
        if started.job_class == BATCH and history.last_batch_start is not None:
            oldest = min(j.arrived for j in queue if j.job_class == BATCH)
            run.guard_gaps.append(now - max(history.last_batch_start, oldest))
        queue, history = after_start(started, queue, now, history)
        run.waits[started.job_class].append(now - started.arrived)
        kind, service, step = details.pop(started.id)
        cost = service
        if kind in resident:
            resident.remove(kind)
        else:
            while sum(SIZE_GIB[c] for c in resident) + SIZE_GIB[kind] > CARD_GIB:
                resident.pop(0)
                cost += UNLOAD_SECONDS
            cost += LOAD_SECONDS[kind]
        resident.append(kind)
        run.longest_job = max(run.longest_job, cost)
        busy_until = now + cost
        admit(busy_until)
        now = busy_until
        history = history.ended(started.job_class, now)
        if started.job_class == INTERACTIVE and step + 1 < len(CHAIN):
            heapq.heappush(events, (now, next_id, "voice", 0.0, step + 1))
            next_id += 1
    return run


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def test_voice_waits_seconds_not_minutes_behind_image_bursts() -> None:
    # With the defaults: voice turns starting ahead of a burst bypass none of
    # it (interactive comes first), so the burst never turns due all at once
    # and runs ahead of the voice; the guard alone bounds the batch's wait.
    arrivals = voice_and_image_bursts(11, 7200, turn_gap=(20, 60), burst_gap=(180, 480))
    fifo = simulate(FifoPolicy(), arrivals)
    first = simulate(POLICY, arrivals)
    fifo_p95, first_p95 = p95(fifo.waits[INTERACTIVE]), p95(first.waits[INTERACTIVE])
    print(f"\ninteractive p95 wait: fifo {fifo_p95:.0f} s, interactive-first {first_p95:.0f} s; "
          f"batch p95: fifo {p95(fifo.waits[BATCH]):.0f} s, "
          f"interactive-first {p95(first.waits[BATCH]):.0f} s")
    assert len(first.waits[BATCH]) == len(fifo.waits[BATCH]) > 100
    assert first_p95 < fifo_p95 / 3
    assert DUE_BYPASS not in first.rules
    assert max(first.guard_gaps) <= CONFIG.batch_guard_seconds + first.longest_job


def test_the_batch_guard_keeps_images_running_under_a_voice_flood() -> None:
    # A voice turn every 4-8 s keeps the interactive class busy all the time;
    # with the bypass cap out of the way, only the guard lets images through.
    config = attrs.evolve(CONFIG, batch_guard_seconds=120, max_bypass=10_000)
    arrivals = voice_and_image_bursts(5, 3600, turn_gap=(4, 8), burst_gap=(300, 600))
    run = simulate(InteractiveFirstPolicy(config), arrivals)
    images = sum(1 for a in arrivals if a[1] == "image")
    assert len(run.waits[BATCH]) == images
    assert run.rules.count(GUARD) >= images // 2
    assert max(run.guard_gaps) <= config.batch_guard_seconds + run.longest_job


@settings(max_examples=200, deadline=None)
@given(
    policy_name=st.sampled_from(["interactive-first", "fifo"]),
    swap=st.booleans(),
    bypassed=st.integers(0, 20),
    waited=st.floats(0, 1000),
    batch_start=st.none() | st.floats(0, 1000),
    interactive_end=st.none() | st.floats(0, 1000),
    linger=st.floats(0, 60),
)
def test_an_interactive_job_alone_is_always_picked(
    policy_name: str, swap: bool, bypassed: int, waited: float,
    batch_start: float | None, interactive_end: float | None, linger: float,
) -> None:
    # The chooser starts a lone interactive job without the policy's survey
    # (PolicyChooser._alone): every policy must pick it, by the rule it names.
    policy = make_policy(SchedulingConfig.from_mapping(
        {"policy": policy_name, "linger_seconds": linger}))
    now = 1000.0
    alone = job(1, arrived=now - waited, swap=swap, bypassed=bypassed)

    assert picked([alone], now, History(batch_start, interactive_end), policy) == (
        1, policy.rule_alone(alone, now))
