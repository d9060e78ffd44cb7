"""Stand-ins for the daemon's collaborators, shared by the unit suites."""

from __future__ import annotations

from typing import Any

from mgpumanager.scheduling.lifecycle import PidLookup


def static_pids(pids: dict[str, frozenset[int]]) -> PidLookup:
    """
    A fixed consumer-to-processes map.  It also stands for the process
    attributor in a built daemon, so it takes the sampler's readings, and
    ignores them.
    """

    class _Static:
        def pids_of(self, name: str) -> frozenset[int]:
            return pids.get(name, frozenset())

        def on_cards(self, samples: Any) -> None:
            pass

    return _Static()
