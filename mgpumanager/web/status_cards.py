"""
The cards in ``/v1/status``: one entry of ``gpus`` per managed card, in the
file's order.

Each entry is read from the card's own settings (``gpus:`` entries inherit
``gpu:``), its own sample, the running jobs that hold it and the memory of
removed consumers seen on it.  The ``gpu`` object of the one-card daemon
keeps its own shape (:func:`mgpumanager.web.status.gpu_status`) and describes
the first of these cards.
"""

from __future__ import annotations

from collections.abc import Mapping

from mgpumanager.common.answers import JsonDocument
from mgpumanager.common.times import rfc3339
from mgpumanager.config.cards import CardConfig
from mgpumanager.config.document import Config
from mgpumanager.scheduling.queued import RunningJob
from mgpumanager.scheduling.yields import CardYields, Yielded
from mgpumanager.state.gpu import GpuSample
from mgpumanager.state.guests import GuestWatch
from mgpumanager.state.holding import Holder
from mgpumanager.state.registry import Registry

#: What a card shows before its first sample.
NO_SAMPLE = GpuSample()


def cards_status(
    config: Config,
    samples: Mapping[int, GpuSample],
    registry: Registry,
    running_jobs: list[RunningJob],
    guests: GuestWatch | None = None,
    yields: CardYields | None = None,
) -> list[JsonDocument]:
    """
    ``gpus``: every managed card.

    :param samples: the latest sample of each card, by card number; a card
        the sampler has not read yet shows no figures.
    :param running_jobs: the scheduler's running jobs, earliest started first,
        so a card shows the job that holds it.
    """
    running: dict[int, int] = {}
    for job in running_jobs:
        for card in job.cards:
            running.setdefault(card, job.view.id)
    holders = holders_by_card(registry, samples, config.card_indexes)
    return [
        {
            **card_status(card, samples.get(card.index, NO_SAMPLE)),
            "holders": holders.get(card.index, []),
            **guest_status(card, guests, yields),
            "running": running.get(card.index),
        }
        for card in config.cards
    ]


def card_status(card: CardConfig, sample: GpuSample) -> JsonDocument:
    """
    One card's memory: the configured ``total_mib`` wins over NVML's (as for
    ``gpu``), ``reserved_mib`` is the card's own, ``err`` is ``null`` unless
    the last read failed.
    """
    reading = sample.reading
    settings = card.settings
    total = settings.total_mib
    if total is None and reading is not None:
        total = reading.total_mib
    return {
        "index": card.index,
        "uuid": card.uuid or (reading.uuid if reading is not None else "") or None,
        "name": reading.name if reading is not None else None,
        "total_mib": total,
        "used_mib": reading.used_mib if reading is not None else None,
        "free_mib": reading.free_mib if reading is not None else None,
        "reserved_mib": settings.reserved_mib,
        "last_sample": rfc3339(sample.time),
        "err": sample.err or None,
    }


def guest_status(
    card: CardConfig, guests: GuestWatch | None, yields: CardYields | None
) -> JsonDocument:
    """
    What the card's guests hold and whether it is yielded to them:
    ``guests`` (``[{pid, name, mib}]``, most memory first), ``guest_mib``
    (their sum) and ``yielded`` (``null`` or ``{reason, since, until}``); the
    metrics read them from here.
    """
    seen = guests.on(card.index) if guests is not None else ()
    return {
        "guests": [{"pid": guest.pid, "name": guest.name, "mib": guest.mib} for guest in seen],
        "guest_mib": sum(guest.mib for guest in seen),
        "yielded": yielded_document(yields.of(card.index) if yields is not None else None),
    }


def yielded_document(held: Yielded | None) -> JsonDocument | None:
    """A card's ``yielded``, in status and in a yield's answer."""
    if held is None:
        return None
    return {"reason": held.reason, "since": rfc3339(held.since),
            "until": rfc3339(held.until) if held.until is not None else None}


def holders_by_card(
    registry: Registry, samples: Mapping[int, GpuSample], cards: tuple[int, ...]
) -> dict[int, list[JsonDocument]]:
    """
    The memory of consumers a reload removed, by card: on each card whose
    reading shows one of its processes.  A holder seen on no card (no
    processes known, or no reading) is listed on the first card, where the
    one-card daemon has always listed it.
    """
    by_card: dict[int, list[JsonDocument]] = {}
    for holder in sorted(registry.holders.values(), key=lambda holder: holder.name):
        for card in _cards_holding(holder, samples, cards) or cards[:1]:
            by_card.setdefault(card, []).append(
                {"name": holder.name, "size_mib": holder.size_mib}
            )
    return by_card


def _cards_holding(
    holder: Holder, samples: Mapping[int, GpuSample], cards: tuple[int, ...]
) -> list[int]:
    seen = []
    for card in cards:
        reading = samples.get(card, NO_SAMPLE).reading
        if reading is not None and not holder.pids.isdisjoint(reading.processes):
            seen.append(card)
    return seen
