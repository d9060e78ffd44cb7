"""
The simulated cards' state as a value, and the JSON file that carries it to
another process.

A card mirrors its state into a small file so that the daemon, through
:class:`mgpumanager.simulate.nvml.SimulatedNvml`, can watch it like NVML from
another process.  A host with one card writes that card's state; a host with
several writes ``{"cards": [...]}``, each card's state in NVML order.  The
files are replaced in one step, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import attrs

#: What ``nvmlDeviceGetName`` answers for a card nobody named.
DEFAULT_CARD_NAME = "Simulated GPU"


@attrs.frozen
class ProcessUsage:
    """One process holding memory on the card, as NVML would list it."""

    pid: int
    owner: str
    used_mib: int
    #: The process name (``nvmlSystemGetProcessName``); empty: the owner's.
    name: str = ""

    @property
    def process_name(self) -> str:
        return self.name or self.owner


@attrs.frozen
class CardState:
    """
    A consistent snapshot of the card: what the JSON state file holds.

    Reading the file and asking the card object give the same value, so the NVML
    stand-in has one code path for both.
    """

    name: str
    total_mib: int
    used_mib: int
    processes: tuple[ProcessUsage, ...]
    uuid: str = ""

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **({"uuid": self.uuid} if self.uuid else {}),
            "total_mib": self.total_mib,
            "used_mib": self.used_mib,
            # A name only where one was given: the servers' entries stay as they were.
            "processes": [
                {"pid": p.pid, "owner": p.owner, "used_mib": p.used_mib}
                | ({"name": p.name} if p.name else {})
                for p in self.processes
            ],
        }

    @classmethod
    def from_json(cls, document: object) -> CardState:
        """
        :raises ValueError: when ``document`` is not a card state; a half-understood
            file must not be reported as a healthy card.
        """
        if not isinstance(document, Mapping):
            raise ValueError("card state must be a JSON object")
        try:
            processes = tuple(
                ProcessUsage(
                    int(p["pid"]), str(p["owner"]), int(p["used_mib"]), str(p.get("name", ""))
                )
                for p in document.get("processes", [])
            )
            return cls(
                name=str(document.get("name", DEFAULT_CARD_NAME)),
                total_mib=int(document["total_mib"]),
                used_mib=int(document["used_mib"]),
                processes=processes,
                uuid=str(document.get("uuid", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed card state: {e!r}") from None


def write_state_file(path: str, document: object, prefix: str) -> None:
    """
    Replace ``path`` with ``document`` as JSON.  A reader must never see half
    a file: it is written beside ``path``, then renamed over it.

    :param prefix: the start of the name of the file written beside it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def read_card_state(path: str) -> CardState:
    """
    Read a card state file written by :class:`~mgpumanager.simulate.card.SimulatedCard`.

    :raises OSError: when the file cannot be read.
    :raises ValueError: when it does not hold a card state.
    """
    return CardState.from_json(_read_json(path))


def read_cards_state(path: str) -> list[CardState]:
    """
    Read a state file of one card or of several.

    :raises OSError: when the file cannot be read.
    :raises ValueError: when it does not hold card states.
    """
    document = _read_json(path)
    if isinstance(document, dict) and "cards" in document:
        cards = document["cards"]
        if not isinstance(cards, list) or not cards:
            raise ValueError("'cards' must be a non-empty list of card states")
        return [CardState.from_json(card) for card in cards]
    return [CardState.from_json(document)]


def _read_json(path: str) -> object:
    with open(path, encoding="utf-8") as f:
        try:
            document: object = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"card state is not JSON: {e}") from None
    return document
