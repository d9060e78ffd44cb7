"""
The JSON shapes of ``/v1/status`` and ``/v1/plan/<kind>``, assembled here and
nowhere else.

The lower layers keep plain values (samples, states, decisions, counters);
only this module knows how a client sees them, so a field is renamed or added
in one place, and the same figures feed every reader (the status document,
the events stream, the metrics).
"""

from __future__ import annotations

from collections.abc import Mapping

from mgpumanager.common.answers import JsonDocument
from mgpumanager.common.times import rfc3339
from mgpumanager.config.document import Config
from mgpumanager.scheduling.eviction import Candidate, Fit, Plan, Step
from mgpumanager.scheduling.lifecycle import Decision, Lifecycle
from mgpumanager.scheduling.queued import QueueDecision, QueuedJob, RunningJob
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.yields import CardYields
from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.guests import GuestWatch
from mgpumanager.state.registry import ConsumerState, Registry
from mgpumanager.web.status_cards import cards_status


def status_document(
    *,
    listen: str,
    now: float,
    config: Config,
    sample: GpuSample,
    registry: Registry,
    scheduler: GpuScheduler,
    lifecycle: Lifecycle,
    samples: Mapping[int, GpuSample] | None = None,
    unmanaged_cards: int = 0,
    guests: GuestWatch | None = None,
    yields: CardYields | None = None,
) -> JsonDocument:
    """
    The whole ``/v1/status`` document.

    :param sample: the latest sample of the first managed card, which ``gpu``
        describes as the one-card daemon always has.
    :param samples: the latest sample of every managed card, by card number,
        for ``gpus``; by default ``sample`` is the first card's and the others
        have none yet.
    :param unmanaged_cards: the cards NVML lists that the file does not manage.
    :param guests: each card's guests; :param yields: each card's yield.
    """
    first = config.cards[0]
    if samples is None:
        samples = {first.index: sample}
    return {
        "listen": listen,
        "time": rfc3339(now),
        "gpu": {
            **gpu_status(sample, first.settings.total_mib, first.settings.reserved_mib),
            "holders": holders_status(registry),
            "released_holders": released_holders_status(registry),
        },
        "gpus": cards_status(
            config, samples, registry, scheduler.running_jobs, guests, yields
        ),
        "unmanaged_cards": unmanaged_cards,
        "routing": dict(config.routing),
        "consumers": [consumer_status(state) for state in registry],
        "scheduler": {
            **scheduler_status(scheduler),
            **lifecycle_status(lifecycle),
            **queue_status(scheduler, now),
            "decisions": decision_log(lifecycle, scheduler),
        },
    }


def gpu_status(sample: GpuSample, total_mib: int | None, reserved_mib: int) -> JsonDocument:
    """The ``gpu`` object: the configured size wins over NVML's."""
    reading = sample.reading
    status: JsonDocument = {
        "total_mib": total_mib if total_mib is not None else (
            reading.total_mib if reading else None
        ),
        "used_mib": reading.used_mib if reading else None,
        "free_mib": reading.free_mib if reading else None,
        "reserved_mib": reserved_mib,
        "last_sample": rfc3339(sample.time),
    }
    if reading is not None:
        status["name"] = reading.name
        status["processes"] = [
            {"pid": pid, "used_mib": mib} for pid, mib in sorted(reading.processes.items())
        ]
    if sample.err:
        status["err"] = sample.err
    return status


def holders_status(registry: Registry) -> list[JsonDocument]:
    """Memory that consumers a reload removed still hold, which the budget counts."""
    return [
        {"name": holder.name, "size_mib": holder.size_mib}
        for holder in sorted(registry.holders.values(), key=lambda holder: holder.name)
    ]


def released_holders_status(registry: Registry) -> list[JsonDocument]:
    """
    The latest holders let go, newest last, with the rule that let each go:
    ``processes_gone``, ``card_dropped`` or ``verify_timeout`` (never seen go).
    """
    return [
        {
            "name": released.name,
            "size_mib": released.size_mib,
            "rule": released.rule,
            "released": rfc3339(released.released_at),
        }
        for released in registry.released_holders
    ]


def consumer_status(state: ConsumerState) -> JsonDocument:
    """One entry of ``consumers``."""
    config = state.config
    status: JsonDocument = {
        "name": config.name,
        "url": config.url,
        "healthy": state.healthy,
        "loaded": state.resident,
        "gpu_resident_mib": state.gpu_resident_mib,
        "peak_resident_mib": state.peak_resident_mib,
        "vram_budget_mib": config.vram_resident_mib,
        "vram_managed": config.vram_managed,
        "active": state.active,
        "total_requests": state.total_requests,
        "loads": state.load_count,
        "unloads": state.unload_count,
        "last_used": rfc3339(state.last_used),
        "last_probe": rfc3339(state.last_probe),
        "last_error": state.last_error,
        "priority": config.priority,
        "can_coexist_with": sorted(config.can_coexist_with),
        "adapter": config.adapter,
        "size_mib": state.size_mib,
        "gpus": list(config.cards),
        # JSON keys are strings: {"0": mib}.
        "gpu_resident_mib_by_card": {
            str(card): mib for card, mib in sorted(state.gpu_resident_mib_by_card.items())
        },
    }
    if state.models is not None:
        status["models"] = [
            {"name": m.name, "size_vram_mib": m.size_vram_mib, "expires_at": m.expires_at}
            for m in state.models
        ]
    measured = state.measured_resident_mib
    if config.vram_resident_mib and measured is not None and measured > config.vram_resident_mib:
        status["warning"] = (
            f"measured {measured} MiB exceeds declared "
            f"vram_resident_mib {config.vram_resident_mib}"
        )
    return status


def scheduler_status(scheduler: GpuScheduler) -> JsonDocument:
    """The queue's and the jobs' counters."""
    return {
        "queue_depth": scheduler.queue_depth,
        "in_flight": scheduler.in_flight,
        "total_jobs": scheduler.total_jobs,
        "failed_jobs": scheduler.failed_jobs,
        "cancelled_jobs": scheduler.cancelled_jobs,
        "last_wait_ms": scheduler.last_wait_ms,
        "last_run_ms": scheduler.last_run_ms,
        "oldest_queued": rfc3339(scheduler.oldest_arrival()),
        "max_depth": scheduler.max_depth,
        "refused_queue_full": scheduler.refused_queue_full,
        "queue_timeouts": scheduler.queue_timeouts,
    }


def lifecycle_status(lifecycle: Lifecycle) -> JsonDocument:
    """Evictions, loads and the recent decisions, oldest first."""
    return {
        "evictions": lifecycle.evictions,
        "failed_unloads": lifecycle.failed_unloads,
        "loads": lifecycle.loads,
        "failed_loads": lifecycle.failed_loads,
        "decisions": [decision_status(d) for d in lifecycle.decisions],
    }


def queue_status(scheduler: GpuScheduler, now: float) -> JsonDocument:
    """
    The policy, the running jobs, and the waiting jobs in the order they would
    run, each with the cards it holds or needs.  ``running`` is the
    earliest-started running job (the one job of a one-card host);
    ``running_jobs`` is every one.
    """
    running = scheduler.running
    return {
        "policy": scheduler.policy_name,
        "running": None if running is None else running_status(running),
        "running_jobs": [running_status(job) for job in scheduler.running_jobs],
        "queue": [
            {**job_status(entry.job), "waited_ms": round((now - entry.job.arrived) * 1000),
             "bypassed": entry.job.bypassed, "needs_swap": entry.needs_swap,
             "eta_seconds": entry.eta_seconds,
             "cards": list(scheduler.cards_of(entry.job.consumer))}
            for entry in scheduler.queue_entries()
        ],
    }


def job_status(job: QueuedJob) -> JsonDocument:
    return {"id": job.id, "consumer": job.consumer, "kind": job.kind, "class": job.job_class,
            "priority": job.priority}


def running_status(running: RunningJob) -> JsonDocument:
    status = {**job_status(running.view), "phase": running.phase,
              "started": rfc3339(running.started), "cards": list(running.cards)}
    if running.prompt_id is not None:
        status["prompt_id"] = running.prompt_id
    return status


def decision_log(lifecycle: Lifecycle, scheduler: GpuScheduler) -> list[JsonDocument]:
    """Evictions, picks out of arrival order and timeouts, oldest first."""
    entries = [(d.time, {**decision_status(d), "type": d.type}) for d in lifecycle.decisions]
    entries += [(d.time, queue_decision_status(d)) for d in scheduler.decisions]
    return [entry for _, entry in sorted(entries, key=lambda pair: pair[0])]


def queue_decision_status(decision: QueueDecision) -> JsonDocument:
    return {
        "time": rfc3339(decision.time),
        "type": decision.type,
        "target": decision.job.consumer,
        "job": job_status(decision.job),
        "rule": decision.rule,
        "ahead_of": list(decision.ahead_of),
        "why": _WHY.get(decision.rule, decision.rule) + (
            f"; started ahead of job {', '.join(map(str, decision.ahead_of))}"
            if decision.ahead_of else ""),
    }


#: The rules of a pick or timeout, as the status page says them.
_WHY = {
    "no-swap": "needs no swap while earlier jobs do",
    "swap": "every job waiting needs a swap",
    "due-bypass": "due: bypassed max_bypass times",
    "due-swap": "due: interactive, needing a swap, waited swap_bound_seconds",
    "guard": "batch guard expired",
    "linger": "arrived during the linger and needs no swap",
    "max_wait_seconds": "waited queue.max_wait_seconds without the GPU",
}


def decision_status(decision: Decision) -> JsonDocument:
    return {
        "time": rfc3339(decision.time),
        "target": decision.target,
        **card_of(decision),
        **fit_status(decision.fit),
        "candidates": [candidate_status(c) for c in decision.candidates],
        "victim": decision.victim,
        "outcome": decision.outcome,
        "unload_ms": decision.unload_ms,
        "recovery_ms": decision.recovery_ms,
        "recovered_mib": decision.recovered_mib,
    }


def card_of(made: Decision | Step) -> JsonDocument:
    """``{"card": n}``: the card a make-room decision or plan step is about (null: none)."""
    return {"card": made.card}




def fit_status(fit: Fit) -> JsonDocument:
    return {
        "fits": fit.fits,
        "basis": fit.basis,
        "needed_mib": fit.needed_mib,
        "available_mib": fit.available_mib,
        "why": fit.why,
    }


def candidate_status(candidate: Candidate) -> JsonDocument:
    return {
        "name": candidate.name,
        "eligible": candidate.eligible,
        "reason": candidate.reason,
        "last_used": rfc3339(candidate.last_used),
    }


def step_status(step: Step) -> JsonDocument:
    return {
        **card_of(step),
        "fit": fit_status(step.fit),
        "candidates": [candidate_status(c) for c in step.candidates],
        "victim": step.victim.name if step.victim else None,
    }


def plan_document(plan: Plan) -> JsonDocument:
    """The ``/v1/plan/<kind>`` document (less its kind): a dry run of making room."""
    return {
        "target": plan.target,
        "skip_make_room": plan.skip_make_room,
        "would_evict": list(plan.would_evict),
        "would_load": plan.would_load,
        "load_by": plan.load_by,
        "steps": [step_status(step) for step in plan.steps],
    }
