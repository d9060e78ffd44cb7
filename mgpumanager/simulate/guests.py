"""
Guests on the simulated cards: processes that belong to no server, such as a game
or a training run, holding memory until they end.

A guest takes its memory the way a real CUDA program does: all at once when it
starts, and an allocation that does not fit fails (there is no oversubscription
of a card's memory on Linux), so a guest that does not fit never appears.  Once
it holds its memory, the servers' later loads on that card may run out of memory,
and the card counts those as it always did.  A guest's own refusal is counted
apart (``refusals``): the card's ``oom_count`` says a server ran out of memory.

Guests get process ids from :data:`GUEST_PID_BASE` up.  The servers' ids are far
below (:data:`~mgpumanager.simulate.profile.PIDS`, and the ids derived from an
owner's name, under 70000), and a reader in another process derives those the
same way without knowing of any guest, so a guest must never take one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from mgpumanager.simulate.card import CudaOutOfMemory, PidBook, SimulatedCard

#: The first guest's process id; every later guest gets the next one.
GUEST_PID_BASE = 100001


class UnknownCard(LookupError):
    """A guest was asked for on a card the host does not have."""


class UnknownGuest(LookupError):
    """No guest has that process id (it never came, or it ended)."""


@attrs.frozen
class Guest:
    """One guest process: its id, its card, what it holds, and its name."""

    pid: int
    card: int
    mib: int
    name: str

    @property
    def owner(self) -> str:
        """Its owner name on the card: unique, since two guests may share a name."""
        return f"guest-{self.pid}"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "card": self.card, "mib": self.mib, "name": self.name}


class GuestBook:
    """
    The guests of one host.

    :param cards: the host's cards, in NVML order.
    :param pids: the host's book of process ids, which NVML's process list reads.
    """

    def __init__(self, cards: Sequence[SimulatedCard], pids: PidBook) -> None:
        self._cards = tuple(cards)
        self._pids = pids
        self._guests: dict[int, Guest] = {}
        self._next_pid = GUEST_PID_BASE
        #: Guests refused because they did not fit, by card index.
        self.refusals = [0] * len(self._cards)

    def arrive(self, card: int, mib: int, name: str) -> Guest:
        """
        Start a guest holding ``mib`` on ``card``.

        :raises UnknownCard: when the host has no such card.
        :raises CudaOutOfMemory: when ``mib`` is more than the card has free;
            nothing is held then.
        """
        if not 0 <= card < len(self._cards):
            raise UnknownCard(f"no card {card} (the host has {len(self._cards)})")
        guest = Guest(pid=self._take_pid(), card=card, mib=mib, name=name)
        self._pids.register(guest.owner, guest.pid, name)
        try:
            self._cards[card].allocate(guest.owner, mib, counted=False)
        except CudaOutOfMemory:
            self.refusals[card] += 1
            raise
        self._guests[guest.pid] = guest
        return guest

    def leave(self, pid: int) -> Guest:
        """
        End the guest ``pid``; its memory comes back to its card at once, as when
        a process exits.

        :raises UnknownGuest: when no guest has that id.
        """
        guest = self._guests.pop(pid, None)
        if guest is None:
            raise UnknownGuest(f"no guest with pid {pid}")
        self._cards[guest.card].release(guest.owner)
        return guest

    def leave_all(self) -> None:
        """End every guest: the host is going away."""
        for pid in list(self._guests):
            self.leave(pid)

    def on_card(self, card: int) -> list[Guest]:
        return [guest for guest in self._guests.values() if guest.card == card]

    def by_owner(self) -> dict[str, Guest]:
        return {guest.owner: guest for guest in self._guests.values()}

    def _take_pid(self) -> int:
        # Never reused, unlike a real kernel's: a test that ended one guest must
        # not find its id again on another.
        pid = self._next_pid
        self._next_pid += 1
        return pid
