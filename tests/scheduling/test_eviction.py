"""
Tests for :mod:`mgpumanager.scheduling.eviction`, the pure half of making room: whether a
target fits (by NVML's free memory with a cushion, else by the declared budget of
the residents that may not share the card with it), which consumers may be
unloaded and in what order (least recently used first, never used oldest), and
the dry run behind ``GET /v1/plan/<kind>``, which must touch nothing.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.eviction import (
    CUSHION_MIB,
    MAX_EVICTIONS,
    Candidate,
    check_fit,
    dry_run_plan,
    pick_victim,
    rank_candidates,
    why_no_room_needed,
)
from mgpumanager.state.gpu import GpuReading, GpuSample
from mgpumanager.state.registry import ConsumerState, Registry
from mgpumanager.web.status import candidate_status, plan_document
from tests.builders import consumer as _consumer
from tests.support import EPOCH


def plan_of(*args: Any) -> dict[str, Any]:
    """The dry run as ``GET /v1/plan/<kind>`` shows it."""
    return plan_document(dry_run_plan(*args))

def _config(gpu: dict[str, Any], consumers: dict[str, Any]) -> Config:
    return parse_config({"gpu": gpu, "consumers": consumers})


#: The card the tests talk about: 16 GiB, 1 GiB reserved, so a 15360 MiB budget.
CONSUMERS: dict[str, Any] = {
    # load + unload routes: believed resident at start.
    "voice": _consumer(
        9001,
        "tts",
        vram_resident_mib=3000,
        load={"path": "/admin/load"},
        unload={"path": "/admin/unload"},
        can_coexist_with=["llm"],
    ),
    "llm": _consumer(9002, "llm", vram_managed=True, vram_resident_mib=4000),
    # unload without load: lazy, believed empty at start.
    "image": _consumer(9003, "image", vram_resident_mib=13000, unload={"path": "/api/free"}),
    "whisper": _consumer(9004, "stt", vram_resident_mib=1500, systemd_unit="whisper.service"),
    # no way to unload it at all.
    "embed": _consumer(9005, vram_resident_mib=500),
}
CONFIG = _config({"total_mib": 16384, "reserved_mib": 1024}, CONSUMERS)
NO_TOTAL = _config({"reserved_mib": 1024}, CONSUMERS)

#: Coexistence both ways: image lists whisper; voice lists image.
COEXIST = _config(
    {"total_mib": 16384, "reserved_mib": 1024},
    {
        "image": _consumer(
            9003,
            "image",
            vram_resident_mib=13000,
            unload={"path": "/api/free"},
            can_coexist_with=["whisper"],
        ),
        "whisper": _consumer(9004, "stt", vram_resident_mib=1500, systemd_unit="w.service"),
        "voice": _consumer(
            9001,
            "tts",
            vram_resident_mib=3000,
            unload={"path": "/unload"},
            can_coexist_with=["image"],
        ),
        "other": _consumer(9006, vram_resident_mib=2000, unload={"path": "/unload"}),
    },
)

#: Six small unloadable consumers and one big target.
SMALL = _config(
    {"total_mib": 8192, "reserved_mib": 0},
    {
        "big": _consumer(9100, "image", vram_resident_mib=7000, load={"path": "/load"}),
        **{
            f"s{i}": _consumer(9100 + i, vram_resident_mib=1000, unload={"path": "/unload"})
            for i in range(1, 7)
        },
    },
)


def nvml(free_mib: int, total_mib: int = 16384) -> GpuSample:
    return GpuSample(
        time=EPOCH,
        reading=GpuReading(
            name="card", total_mib=total_mib, used_mib=total_mib - free_mib, free_mib=free_mib
        ),
    )


NO_NVML = GpuSample(time=EPOCH, err="NVML Shared Library Not Found")


def registry(config: Config = CONFIG, **loaded: bool) -> Registry:
    reg = Registry(config)
    for name, value in loaded.items():
        reg[name].believed_loaded = value
    return reg


def all_loaded(config: Config, *unloaded: str) -> Registry:
    """Every consumer believed on the card except ``unloaded``."""
    reg = Registry(config)
    for state in reg:
        state.believed_loaded = state.name not in unloaded
    return reg


def residents(reg: Registry) -> list[ConsumerState]:
    return [state for state in reg if state.resident]


# -- initial residency -------------------------------------------------------


def test_initial_residency_follows_the_configuration() -> None:
    reg = Registry(CONFIG)

    assert {state.name: state.resident for state in reg} == {
        "embed": True,  # neither route nor unit
        "image": False,  # unload without load: lazy
        "llm": True,  # vram_managed
        "voice": True,  # load and unload
        "whisper": True,  # systemd unit
    }


def test_vram_managed_is_resident_even_with_an_unload_route_and_no_load_route() -> None:
    config = _config(
        {}, {"llm": _consumer(9002, vram_managed=True, unload={"path": "/unload"})}
    )

    assert Registry(config)["llm"].resident is True


def test_the_probe_report_overrides_believed_residency_both_ways() -> None:
    reg = Registry(CONFIG)
    reg["image"].reported_loaded = True
    reg["voice"].reported_loaded = False

    assert reg["image"].resident is True
    assert reg["voice"].resident is False

    reg["image"].mark_loaded(False, EPOCH)
    assert reg["image"].reported_loaded is None
    assert reg["image"].resident is False


# -- why_no_room_needed --------------------------------------------------------------


def test_why_no_room_needed_skips_a_target_that_manages_its_own_vram() -> None:
    reg = registry(llm=False)

    assert why_no_room_needed(reg["llm"]) == "target manages its own VRAM"


def test_why_no_room_needed_skips_a_target_without_a_declared_size() -> None:
    config = _config({}, {"tiny": _consumer(9010, load={"path": "/l"}, unload={"path": "/u"})})
    reg = registry(config, tiny=False)

    assert why_no_room_needed(reg["tiny"]) == "target declares no VRAM size"


def test_why_no_room_needed_skips_a_target_already_resident_also_by_report() -> None:
    reg = registry()
    assert why_no_room_needed(reg["voice"]) == "target is already resident"
    reg["image"].reported_loaded = True
    assert why_no_room_needed(reg["image"]) == "target is already resident"


def test_why_no_room_needed_is_none_for_an_unloaded_target_with_a_size() -> None:
    reg = registry()

    assert why_no_room_needed(reg["image"]) is None


# -- check_fit: NVML ---------------------------------------------------------


def test_by_nvml_the_target_fits_with_exactly_the_cushion_free() -> None:
    reg = registry()
    target = CONFIG.consumers["image"]

    fit = check_fit(CONFIG, target, nvml(13000 + CUSHION_MIB), residents(reg))

    assert CUSHION_MIB == 256
    assert (fit.fits, fit.basis, fit.needed_mib, fit.available_mib) == (
        True,
        "nvml",
        13256,
        13256,
    )
    assert "256" in fit.why


def test_by_nvml_one_mib_short_of_the_cushion_does_not_fit() -> None:
    reg = registry()

    fit = check_fit(CONFIG, CONFIG.consumers["image"], nvml(13255), residents(reg))

    assert (fit.fits, fit.basis, fit.needed_mib, fit.available_mib) == (
        False,
        "nvml",
        13256,
        13255,
    )


def test_by_nvml_the_budget_is_ignored() -> None:
    # Nobody resident by the books, but NVML says the card is full: NVML wins.
    reg = registry(voice=False, whisper=False, embed=False, llm=False)

    fit = check_fit(CONFIG, CONFIG.consumers["image"], nvml(1000), residents(reg))

    assert not fit.fits
    assert fit.basis == "nvml"


# -- check_fit: budget -------------------------------------------------------


def test_by_budget_the_blocking_residents_are_summed() -> None:
    # image needs 13000; 16384 - 1024 - (voice 3000 + whisper 1500 + embed 500) = 10360.
    reg = registry()

    fit = check_fit(CONFIG, CONFIG.consumers["image"], NO_NVML, residents(reg))

    assert (fit.fits, fit.basis, fit.needed_mib, fit.available_mib) == (
        False,
        "budget",
        13000,
        10360,
    )
    assert "16384" in fit.why and "1024" in fit.why and "5000" in fit.why


def test_by_budget_a_sample_not_yet_taken_counts_as_no_nvml() -> None:
    reg = registry()

    fit = check_fit(CONFIG, CONFIG.consumers["image"], GpuSample(), residents(reg))

    assert fit.basis == "budget"


def test_by_budget_it_fits_with_exactly_enough_headroom() -> None:
    # Only whisper (1500) and embed (500) left: 15360 - 2000 = 13360 >= 13000.
    reg = registry(voice=False)

    fit = check_fit(CONFIG, CONFIG.consumers["image"], NO_NVML, residents(reg))

    assert (fit.fits, fit.available_mib) == (True, 13360)


def test_by_budget_the_exact_boundary_fits() -> None:
    config = _config(
        {"total_mib": 14000, "reserved_mib": 500},
        {
            "a": _consumer(9001, vram_resident_mib=1000, unload={"path": "/u"}),
            "b": _consumer(9002, vram_resident_mib=12500, load={"path": "/l"}),
        },
    )
    reg = all_loaded(config, "b")

    fit = check_fit(config, config.consumers["b"], NO_NVML, residents(reg))
    assert (fit.fits, fit.available_mib) == (True, 12500)
    config_short = attrs.evolve(config, gpu=attrs.evolve(config.gpu, reserved_mib=501))
    fit = check_fit(config_short, config.consumers["b"], NO_NVML, residents(reg))
    assert (fit.fits, fit.available_mib) == (False, 12499)


def test_by_budget_vram_managed_residents_are_not_billed() -> None:
    # llm declares 4000 but manages its own VRAM: it is left out of the sum.
    reg = registry(embed=False, whisper=False)

    fit = check_fit(CONFIG, CONFIG.consumers["whisper"], NO_NVML, residents(reg))

    # whisper's budget: 15360 - voice 3000 = 12360 (llm excluded, target excluded).
    assert fit.available_mib == 12360


def test_by_budget_coexisting_residents_are_not_billed() -> None:
    reg = all_loaded(COEXIST)
    target = COEXIST.consumers["image"]
    everyone = [*reg]  # all taken as loaded, the target included

    fit = check_fit(COEXIST, target, NO_NVML, everyone)

    # whisper (image lists it) and voice (it lists image) are left out; other 2000 is not.
    assert fit.available_mib == 15360 - 2000
    assert fit.fits


def test_by_budget_the_target_itself_is_never_billed() -> None:
    reg = registry()
    reg["image"].believed_loaded = True

    fit = check_fit(CONFIG, CONFIG.consumers["image"], NO_NVML, residents(reg))

    assert fit.available_mib == 10360


def test_without_a_card_size_the_target_needs_the_card_to_itself() -> None:
    reg = registry()

    fit = check_fit(NO_TOTAL, NO_TOTAL.consumers["image"], NO_NVML, residents(reg))

    assert (fit.fits, fit.basis, fit.needed_mib, fit.available_mib) == (
        False,
        "budget",
        13000,
        None,
    )
    assert "exclusive" in fit.why


def test_without_a_card_size_only_coexisting_and_managed_residents_may_stay() -> None:
    # For voice: llm is both managed and coexisting; everything else gone.
    reg = registry(NO_TOTAL, whisper=False, embed=False, voice=False)

    fit = check_fit(NO_TOTAL, NO_TOTAL.consumers["voice"], NO_NVML, residents(reg))

    assert fit.fits
    assert fit.available_mib is None


# -- rank_candidates / pick_victim --------------------------------------------


def _by_name(candidates: list[Candidate]) -> dict[str, Candidate]:
    return {c.name: c for c in candidates}


def test_every_other_consumer_is_listed_with_its_reason() -> None:
    reg = registry()

    ranked = _by_name(rank_candidates(CONFIG, "voice", reg))

    assert "voice" not in ranked
    assert {name: c.reason for name, c in ranked.items()} == {
        "embed": "no unload route or systemd unit",
        "image": "not resident",
        "llm": "manages its own VRAM",
        "whisper": "eligible",
    }
    assert [name for name, c in ranked.items() if c.eligible] == ["whisper"]


def test_a_consumer_running_a_job_is_not_a_victim() -> None:
    reg = registry()
    reg["whisper"].active = 1

    ranked = _by_name(rank_candidates(CONFIG, "image", reg))

    assert (ranked["whisper"].eligible, ranked["whisper"].reason) == (False, "running a job")


def test_coexistence_counts_whichever_side_lists_the_other() -> None:
    reg = all_loaded(COEXIST)

    ranked = _by_name(rank_candidates(COEXIST, "image", reg))

    # image lists whisper:
    assert ranked["whisper"].reason == "may coexist with image"
    # voice lists image:
    assert ranked["voice"].reason == "may coexist with image"
    assert not ranked["whisper"].eligible and not ranked["voice"].eligible
    assert ranked["other"].eligible
    assert pick_victim(rank_candidates(COEXIST, "image", reg)) == ranked["other"]


def test_coexistence_is_symmetric_from_the_other_target_too() -> None:
    reg = all_loaded(COEXIST)

    # Target whisper: image (which lists whisper) may stay; voice may not.
    ranked = _by_name(rank_candidates(COEXIST, "whisper", reg))
    assert ranked["image"].reason == "may coexist with whisper"
    assert ranked["voice"].eligible
    # Target voice: image (which voice lists) may stay.
    ranked = _by_name(rank_candidates(COEXIST, "voice", reg))
    assert ranked["image"].reason == "may coexist with voice"
    assert ranked["whisper"].eligible


def test_a_vram_managed_consumer_is_never_a_victim_even_when_unloadable() -> None:
    config = _config(
        {"total_mib": 8000},
        {
            "llm": _consumer(9002, vram_managed=True, unload={"path": "/u"}),
            "t": _consumer(9003, vram_resident_mib=7000, load={"path": "/l"}),
        },
    )
    reg = registry(config, t=False)

    ranked = rank_candidates(config, "t", reg)

    assert [(c.name, c.eligible, c.reason) for c in ranked] == [
        ("llm", False, "manages its own VRAM")
    ]
    assert pick_victim(ranked) is None


def test_victims_are_ranked_least_recently_used_first_never_used_oldest() -> None:
    reg = all_loaded(SMALL, "big")
    reg["s1"].last_used = EPOCH - 10
    reg["s2"].last_used = EPOCH - 30
    reg["s3"].last_used = None
    reg["s4"].last_used = EPOCH - 20
    reg["s5"].last_used = None
    reg["s6"].last_used = EPOCH - 1

    ranked = rank_candidates(SMALL, "big", reg)

    assert [c.name for c in ranked] == ["s3", "s5", "s2", "s4", "s1", "s6"]
    assert all(c.eligible for c in ranked)
    assert ranked[0].last_used is None
    assert ranked[2].last_used == EPOCH - 30
    assert pick_victim(ranked) is not None
    assert pick_victim(ranked) == ranked[0]


def test_equal_last_use_is_broken_by_name() -> None:
    reg = all_loaded(SMALL, "big")
    for name in ("s6", "s2", "s4"):
        reg[name].last_used = EPOCH
    for name in ("s1", "s3", "s5"):
        reg[name].last_used = EPOCH + 5

    assert [c.name for c in rank_candidates(SMALL, "big", reg)] == [
        "s2", "s4", "s6", "s1", "s3", "s5",
    ]


def test_ineligible_candidates_come_after_every_eligible_one() -> None:
    reg = registry(image=False)
    reg["whisper"].last_used = EPOCH + 100  # recently used, but the only eligible one

    ranked = rank_candidates(CONFIG, "voice", reg)

    assert ranked[0].name == "whisper"
    assert [c.eligible for c in ranked] == [True, False, False, False]


def test_consumers_unloaded_in_an_earlier_step_are_not_candidates_again() -> None:
    reg = registry()

    ranked = _by_name(rank_candidates(CONFIG, "image", reg, evicted=["voice"]))

    assert (ranked["voice"].eligible, ranked["voice"].reason) == (
        False,
        "unloaded in an earlier step",
    )
    assert ranked["whisper"].eligible


def test_pick_victim_is_none_when_nothing_is_eligible_or_nothing_is_listed() -> None:
    assert pick_victim([]) is None
    assert pick_victim([Candidate(name="x", eligible=False, reason="not resident")]) is None


def test_candidate_status_shows_last_use_as_rfc3339() -> None:
    assert candidate_status(Candidate("a", True, "eligible", EPOCH)) == {
        "name": "a",
        "eligible": True,
        "reason": "eligible",
        "last_used": "2026-05-15T10:00:00.000Z",
    }
    assert candidate_status(Candidate("a", True, "eligible"))["last_used"] is None


# -- dry_run_plan ------------------------------------------------------------


def _snapshot(reg: Registry) -> list[ConsumerState]:
    return [attrs.evolve(state) for state in reg]


def test_the_plan_lists_victims_in_order_until_the_target_fits_by_nvml() -> None:
    reg = registry()
    reg["voice"].last_used = EPOCH - 5
    reg["whisper"].last_used = EPOCH - 50
    before = _snapshot(reg)

    # 9000 free; image needs 13256: whisper (1500) then voice (3000) -> 13500.
    plan = plan_of(CONFIG, reg, "image", nvml(9000))

    assert plan["target"] == "image"
    assert plan["skip_make_room"] is None
    assert plan["would_evict"] == ["whisper", "voice"]
    assert plan["would_load"] is True
    assert plan["load_by"] == "cold start on the first request"
    steps = plan["steps"]
    assert [step["victim"] for step in steps] == ["whisper", "voice", None]
    assert [step["fit"]["available_mib"] for step in steps] == [9000, 10500, 13500]
    assert [step["fit"]["fits"] for step in steps] == [False, False, True]
    assert steps[0]["fit"]["basis"] == "nvml"
    reasons = {c["name"]: c["reason"] for c in steps[1]["candidates"]}
    assert reasons["whisper"] == "unloaded in an earlier step"
    assert reasons["embed"] == "no unload route or systemd unit"
    assert _snapshot(reg) == before


def test_the_plan_frees_measured_memory_when_known() -> None:
    reg = registry()
    reg["voice"].measured_resident_mib = 4500  # grew past its declared 3000

    plan = plan_of(CONFIG, reg, "image", nvml(8800))

    assert plan["would_evict"] == ["voice"]
    assert plan["steps"][-1]["fit"]["available_mib"] == 13300


def test_the_plan_by_budget() -> None:
    reg = registry()

    plan = plan_of(CONFIG, reg, "image", NO_NVML)

    # 10360 with voice, 13360 without it.
    assert plan["would_evict"] == ["voice"]
    assert [s["fit"]["available_mib"] for s in plan["steps"]] == [10360, 13360]
    assert plan["steps"][0]["fit"]["basis"] == "budget"


def test_the_plan_stops_at_the_eviction_cap() -> None:
    reg = all_loaded(SMALL, "big")

    plan = plan_of(SMALL, reg, "big", nvml(692, total_mib=8192))

    assert MAX_EVICTIONS == 5
    assert plan["would_evict"] == ["s1", "s2", "s3", "s4", "s5"]
    assert len(plan["steps"]) == 6
    assert plan["steps"][-1]["victim"] is None
    assert plan["steps"][-1]["fit"]["fits"] is False
    assert plan["load_by"] == "POST /load"
    assert reg["s1"].resident


def test_the_plan_says_when_nothing_can_be_evicted() -> None:
    reg = registry(whisper=False, image=False)
    reg["voice"].believed_loaded = False

    plan = plan_of(CONFIG, reg, "voice", nvml(100))

    assert plan["would_evict"] == []
    assert len(plan["steps"]) == 1
    assert plan["steps"][0]["victim"] is None
    assert plan["load_by"] == "POST /admin/load"


def test_the_plan_for_a_resident_target_does_nothing() -> None:
    reg = registry()

    plan = plan_of(CONFIG, reg, "voice", nvml(0))

    assert plan == {
        "target": "voice",
        "skip_make_room": "target is already resident",
        "would_evict": [],
        "would_load": False,
        "load_by": None,
        "steps": [],
    }


def test_the_plan_for_an_unloaded_systemd_target_starts_the_unit() -> None:
    reg = registry(whisper=False)

    plan = plan_of(CONFIG, reg, "whisper", nvml(12000))

    assert plan["would_evict"] == []
    assert plan["load_by"] == "systemctl start whisper.service"
    assert [s["fit"]["fits"] for s in plan["steps"]] == [True]


@pytest.mark.parametrize("free", [0, 5000, 20000])
def test_the_plan_never_changes_anything(free: int) -> None:
    reg = registry()
    reg["voice"].last_used = EPOCH
    before = _snapshot(reg)

    plan_of(CONFIG, reg, "image", nvml(free))
    plan_of(CONFIG, reg, "image", NO_NVML)

    assert _snapshot(reg) == before


@pytest.mark.parametrize(
    "sample", [NO_NVML, nvml(100), nvml(20000)], ids=["budget", "full", "room"]
)
def test_a_plan_needs_a_swap_exactly_when_its_target_is_not_resident(sample: GpuSample) -> None:
    # The scheduler's policy asks "needs a swap?" at every pick by residency
    # alone; the dry run must agree, whatever the card holds.
    reg = registry(whisper=False)
    reg["voice"].believed_loaded = False

    for name in [state.name for state in reg]:
        plan = dry_run_plan(CONFIG, reg, name, sample)
        assert plan.needs_swap is (not reg[name].resident), name
