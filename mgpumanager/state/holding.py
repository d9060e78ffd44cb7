"""
When memory that a removed consumer held may leave the budget.

A reload can remove a consumer whose model is on the card; the daemon no
longer manages it, but until its memory is gone the budget must count it, or
the next load lands on top of it.  The card is the witness, in one of two
ways: its processes, when the daemon had attributed them, hold (almost)
nothing; or, when it never could (no process attribution, a server in a
container), the card's used memory has dropped by most of the holder's size
since the removal.  A card that never shows either (the server kept running
unmanaged, or NVML cannot be read) must not shrink the budget for good: after
the verify timeout the holder is let go with a warning, as an unload that was
never verified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from mgpumanager.state.gpu import GpuReading

#: Its processes hold under this share of its size.
PROCESSES_SHARE = 0.05
#: The card's used memory dropped by at least this share of its size.
CARD_DROP_SHARE = 0.75

#: The rules, as status names them.
PROCESSES_GONE = "processes_gone"
CARD_DROPPED = "card_dropped"
VERIFY_TIMEOUT = "verify_timeout"

#: How many released holders status remembers.
RELEASED_KEPT = 10


@attrs.frozen
class Holder:
    """
    A consumer a reload removed while its model was on the card: no longer
    ours to schedule or unload, but its memory is still taken until the card
    shows it gone.
    """

    name: str
    size_mib: int
    #: Its processes when it was removed, to see its memory go; may be empty.
    pids: frozenset[int]
    #: When the reload removed it, and the card's used MiB then (None until a
    #: reading says): without its processes, the card's drop since then is the
    #: only sign that its memory went.
    removed_at: float = 0.0
    card_used_mib: int | None = None
    #: The cards it used.
    cards: frozenset[int] = frozenset({0})


@attrs.frozen
class ReleasedHolder:
    """A holder let go: which, how big, by which rule, when (POSIX time)."""

    name: str
    size_mib: int
    rule: str
    released_at: float


def release_rule(
    holder: Holder, reading: GpuReading | None, now: float, verify_timeout: float
) -> str | None:
    """
    The rule by which ``holder`` leaves the budget at ``now``, or None while
    it stays.

    :param reading: the card now; None when the read failed.
    :param verify_timeout: the seconds after the removal when a holder
        without processes goes regardless (``lifecycle.verify_timeout_seconds``).
    """
    if holder.pids:
        if reading is None:
            return None
        held = sum(reading.processes.get(pid, 0) for pid in holder.pids)
        return PROCESSES_GONE if held < PROCESSES_SHARE * holder.size_mib else None
    if reading is not None and holder.card_used_mib is not None:
        if holder.card_used_mib - reading.used_mib >= CARD_DROP_SHARE * holder.size_mib:
            return CARD_DROPPED
    if now - holder.removed_at >= verify_timeout:
        return VERIFY_TIMEOUT
    return None
