"""
Whether an unload gave the memory back.  An unload route answering 200 is not
proof (CUDA frees the memory when the process's context goes), so after each
unload :func:`wait_for_memory_back` watches each card the victim used until
enough of what it held there is free again, or its own processes hardly hold any.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from mgpumanager.config.document import LifecycleConfig
from mgpumanager.state.gpu import GpuReading, GpuSample, GpuSampler
from mgpumanager.state.registry import ConsumerState

#: An unload counts as verified once this share of the victim's memory is back...
RECOVERED_SHARE = 0.75
#: ...or once its own processes hold less than this share of it.
LEFTOVER_SHARE = 0.05


def held_before_unload(victim: ConsumerState) -> dict[int, int]:
    """
    What the victim held on each of its cards just before its unload: the
    memory that must come back.  Not its size (the most it ever held): a
    server that once held more would never seem to give enough back.
    """
    if len(victim.config.cards) == 1:
        size = (
            victim.measured_resident_mib
            or victim.reported_resident_mib
            or victim.config.vram_resident_mib
            or victim.size_mib
        )
        return {victim.config.cards[0]: size}
    measured = victim.measured_by_card or {}
    return {
        card: measured.get(card) or victim.config.vram_mib_on(card) or victim.size_on(card)
        for card in victim.config.cards
    }


def memory_back(
    baseline: GpuReading, reading: GpuReading | None, declared: int, pids: frozenset[int]
) -> int | None:
    """
    The MiB a card got back since ``baseline``, once that counts as the
    victim's memory returned (enough of it free again, or its processes
    hardly holding any); None while it does not.
    """
    if reading is None:
        return None
    recovered = reading.free_mib - baseline.free_mib
    if recovered >= RECOVERED_SHARE * declared:
        return max(recovered, 0)
    held_before = sum(baseline.processes.get(pid, 0) for pid in pids)
    if held_before > 0:
        # NVML sees the victim's own processes: trust that directly.
        held_now = sum(reading.processes.get(pid, 0) for pid in pids)
        if held_now < LEFTOVER_SHARE * max(declared, held_before):
            return max(recovered, 0)
    return None


async def wait_for_memory_back(
    sampler: GpuSampler,
    clock: IReactorTime,
    lifecycle: LifecycleConfig,
    sizes: Mapping[int, int],
    before: Mapping[int, GpuSample],
    pids: frozenset[int],
) -> int | bool | None:
    """
    Poll the victim's cards until its memory is back on every one: the
    recovered MiB, ``False`` if it never came back in time, ``None``
    without NVML (after a fixed settle).

    :param sizes: what it held on each card (:func:`held_before_unload`).
    :param before: every card's sample from before the unload.
    :param pids: its processes, for :func:`memory_back`.
    """
    baselines = {card: before[card].reading for card in sizes if card in before}
    if not baselines or any(reading is None for reading in baselines.values()):
        await deferLater(clock, lifecycle.settle_seconds)
        return None
    deadline = clock.seconds() + lifecycle.verify_timeout_seconds
    while True:
        samples = await sampler.sample_cards()
        back = [
            memory_back(baseline, samples[card].reading, sizes[card], pids)
            for card, baseline in baselines.items()
            if baseline is not None and card in samples
        ]
        if len(back) == len(baselines) and all(mib is not None for mib in back):
            return sum(mib for mib in back if mib is not None)
        if clock.seconds() >= deadline:
            return False
        await deferLater(clock, lifecycle.verify_interval_seconds)
