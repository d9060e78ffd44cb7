"""
Eviction decisions: does the next job's consumer fit on each of its cards, and
if not, whom to unload.  Pure functions of the configuration, the consumers'
states and the latest GPU samples, so that the real scheduler and the dry-run
``GET /v1/plan/<kind>`` reach the same answer, and every answer can say why.

Making room is per card: on each card the target uses, the fit is that card's
free memory (or its budget), and the victims are the consumers resident on
that card; unloading one frees every card it uses.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import attrs

from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.registry import ConsumerState, Registry

#: Free memory we insist on beyond the target's declared size when NVML
#: answers: allocators fragment, and CUDA contexts cost a few hundred MiB.
CUSHION_MIB = 256
#: A job never evicts more than this many consumers.
MAX_EVICTIONS = 5


@attrs.frozen
class Fit:
    """Whether the target fits now, and on what evidence."""

    fits: bool
    #: "nvml" (live free memory), "budget" (declared sizes), or "skip".
    basis: str
    needed_mib: int
    #: NVML's free MiB, or the budget's headroom; None when neither is known.
    available_mib: int | None
    why: str

@attrs.frozen
class Candidate:
    """One consumer considered as a victim, and why it was or was not chosen."""

    name: str
    eligible: bool
    reason: str
    last_used: float | None = None

def why_no_room_needed(target: ConsumerState) -> str | None:
    """Why making room can be skipped for this target, or None if it cannot."""
    config = target.config
    if config.vram_managed:
        return "target manages its own VRAM"
    if target.size_mib == 0:
        return "target declares no VRAM size"
    if target.resident:
        return "target is already resident"
    return None


def check_fit(
    config: Config,
    target: ConsumerConfig,
    sample: GpuSample,
    resident: Iterable[ConsumerState],
    size_mib: int | None = None,
    held_elsewhere_mib: int = 0,
    card: int | None = None,
) -> Fit:
    """
    Whether ``target`` fits on ``card`` (the first managed card when not
    given): by NVML's live free memory when the card's sample is at hand, else
    by the budget of the consumers on that card that may not share it with
    the target.  ``resident`` are the consumers taken as loaded; every size is
    the one on that card (:meth:`~mgpumanager.state.registry.ConsumerState.size_on`),
    the target's ``size_mib`` (its declared size there when not given).
    ``held_elsewhere_mib`` is memory the budget must count that no consumer of
    ours holds (a consumer a reload removed while it was loaded).
    """
    card = config.card_indexes[0] if card is None else card
    needed = target.vram_mib_on(card) if size_mib is None else size_mib
    reading = sample.reading
    if reading is not None:
        wanted = needed + CUSHION_MIB
        return Fit(
            fits=reading.free_mib >= wanted,
            basis="nvml",
            needed_mib=wanted,
            available_mib=reading.free_mib,
            why=f"NVML free {reading.free_mib} MiB vs {needed} + {CUSHION_MIB} MiB cushion",
        )
    blocking = [
        state
        for state in resident
        if state.name != target.name
        and card in state.config.cards
        and not state.config.vram_managed
        and not config.may_coexist(state.name, target.name)
    ]
    settings = config.card(card).settings
    total = settings.total_mib
    if total is None:
        # No card size at all: the only safe assumption is that the target
        # needs the card to itself.
        return Fit(
            fits=not blocking and not held_elsewhere_mib,
            basis="budget",
            needed_mib=needed,
            available_mib=None,
            why="card size unknown (no NVML, no gpu.total_mib): exclusive use assumed",
        )
    held = sum(state.size_on(card) for state in blocking) + held_elsewhere_mib
    headroom = total - settings.reserved_mib - held
    return Fit(
        fits=headroom >= needed,
        basis="budget",
        needed_mib=needed,
        available_mib=headroom,
        why=(
            f"budget {total} total - {settings.reserved_mib} reserved - {held} held "
            f"by non-coexisting residents = {headroom} MiB vs {needed} MiB"
        ),
    )


def rank_candidates(
    config: Config,
    target: str,
    states: Iterable[ConsumerState],
    evicted: Iterable[str] = (),
    adapters: Adapters | None = None,
    card: int | None = None,
) -> list[Candidate]:
    """
    Every other consumer with the reason it may or may not be unloaded to
    make room on ``card`` (any card when not given); the eligible ones first,
    least recently used first (never used counts as oldest, ties broken by
    name).  ``evicted`` were unloaded in earlier steps.
    """
    gone = set(evicted)
    candidates = []
    for state in states:
        if state.name == target:
            continue
        if state.name in gone:
            reason: str | None = "unloaded in an earlier step"
        elif card is not None and card not in state.config.cards:
            reason = f"not on card {card}"
        else:
            reason = _ineligible(config, target, state, adapters)
        candidates.append(
            Candidate(
                name=state.name,
                eligible=reason is None,
                reason=reason or "eligible",
                last_used=state.last_used,
            )
        )
    busy = {state.name for state in states if state.busy_elsewhere}
    # A server busy with work sent around us is the last resort: it is only
    # unloaded (after its queue drains) when no one else frees enough.
    return sorted(
        candidates,
        key=lambda c: (
            not c.eligible,
            c.name in busy,
            c.last_used if c.last_used is not None else -1.0,
            c.name,
        ),
    )


def _ineligible(
    config: Config, target: str, state: ConsumerState, adapters: Adapters | None
) -> str | None:
    if not state.resident:
        return "not resident"
    if state.config.vram_managed:
        return "manages its own VRAM"
    if target in config.consumers and config.may_coexist(state.name, target):
        return f"may coexist with {target}"
    adapter = (adapters.of(state.config) if adapters is not None
               else adapter_named(state.config.adapter))
    if not adapter.can_unload(state.config):
        return "no unload route or systemd unit"
    if state.active:
        return "running a job"
    return None


def pick_victim(candidates: list[Candidate]) -> Candidate | None:
    """The least recently used eligible candidate, if any."""
    return candidates[0] if candidates and candidates[0].eligible else None


@attrs.frozen
class Step:
    """
    One step of making room: the fit test on the evidence at hand, every other
    consumer ranked as a victim, and the victim to unload next, or why the
    making of room stops here.
    """

    fit: Fit
    candidates: list[Candidate]
    victim: Candidate | None
    #: None while there is a victim; else "fits", or why nothing more is unloaded.
    stop: str | None
    #: The card this step makes room on.
    card: int = 0

def plan_step(
    config: Config,
    states: Collection[ConsumerState],
    target: ConsumerState,
    sample: GpuSample,
    already_evicted: Collection[str] = (),
    held_elsewhere_mib: int = 0,
    adapters: Adapters | None = None,
    card: int | None = None,
) -> Step:
    """
    The next step of making room for ``target`` on ``card`` (the first
    managed card when not given): the one decision both the scheduler's real
    loop and the dry run take.  ``sample`` is that card's.  ``already_evicted``
    were unloaded in earlier steps of the same run; they count as gone
    whatever the registry still believes, and at most :data:`MAX_EVICTIONS`
    are.  ``adapters`` are the daemon's resolved ones; without them (a test,
    a one-off dry run) each is found by name.
    """
    card = config.card_indexes[0] if card is None else card
    resident = [s for s in states if s.resident and s.name not in already_evicted]
    fit = check_fit(
        config, target.config, sample, resident, target.size_on(card), held_elsewhere_mib, card
    )
    ranked_on = card if len(config.cards) > 1 else None
    candidates = rank_candidates(
        config, target.name, states, already_evicted, adapters, ranked_on
    )
    if fit.fits:
        return Step(fit, candidates, None, "fits", card)
    if len(already_evicted) >= MAX_EVICTIONS:
        return Step(fit, candidates, None, f"still short after {MAX_EVICTIONS} evictions", card)
    victim = pick_victim(candidates)
    return Step(fit, candidates, victim, None if victim else "nothing can be evicted", card)


@attrs.frozen
class Plan:
    """What making room for a target would do now: the dry run's answer."""

    target: str
    #: Why making room is skipped altogether, if it is.
    skip_make_room: str | None
    steps: tuple[Step, ...]
    would_evict: tuple[str, ...]
    would_load: bool
    #: How it would be loaded, when it would be.
    load_by: str | None

    @property
    def needs_swap(self) -> bool:
        """Whether the job would unload or load anything before it runs."""
        return bool(self.would_evict) or self.would_load


def dry_run_plan(
    config: Config,
    registry: Registry,
    target: str,
    samples: GpuSample | Mapping[int, GpuSample],
    adapters: Adapters | None = None,
) -> Plan:
    """
    What making room for ``target`` would do now, touching nothing: the
    scheduler's own :func:`plan_step` on each of its cards in turn, with each
    eviction assumed to free the victim's declared (or measured) memory on
    every card it uses.  ``samples`` are each card's (one sample: the first
    card's, on a one-card host).
    """
    if isinstance(samples, GpuSample):
        samples = {config.card_indexes[0]: samples}
    state = registry[target]
    skip = why_no_room_needed(state)
    # Asked at every pick: most targets skip making room, and need no list of states.
    states = list(registry) if skip is None else []
    steps: list[Step] = []
    evict: list[str] = []
    freed: dict[int, int] = {}
    for card in state.config.cards if skip is None else ():
        sample = samples.get(card, GpuSample())
        held = registry.held_elsewhere_on(card)
        while True:
            step = plan_step(
                config, states, state, _plus_free(sample, freed.get(card, 0)), evict,
                held, adapters, card,
            )
            steps.append(step)
            if step.victim is None:
                break
            evict.append(step.victim.name)
            victim = registry[step.victim.name]
            for its_card in victim.config.cards:
                freed[its_card] = freed.get(its_card, 0) + victim.size_on(its_card)
    return Plan(
        target=target,
        skip_make_room=skip,
        steps=tuple(steps),
        would_evict=tuple(evict),
        would_load=not state.resident,
        load_by=load_method(state.config) if not state.resident else None,
    )


def _plus_free(sample: GpuSample, freed: int) -> GpuSample:
    if sample.reading is None or freed == 0:
        return sample
    reading = sample.reading
    return attrs.evolve(
        sample,
        reading=attrs.evolve(
            reading, free_mib=reading.free_mib + freed, used_mib=reading.used_mib - freed
        ),
    )


def load_method(config: ConsumerConfig) -> str:
    """How the lifecycle loads ``config`` (what the plan and ``mgpumanager check`` say)."""
    if config.load is not None:
        return f"{config.load.method} {config.load.path}"
    if config.systemd_unit is not None:
        return f"systemctl start {config.systemd_unit}"
    return "cold start on the first request"
