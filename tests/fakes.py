"""Stand-ins for the daemon's collaborators, shared by the unit suites."""

from __future__ import annotations

from mgpumanager.scheduling.lifecycle import PidLookup


def static_pids(pids: dict[str, frozenset[int]]) -> PidLookup:
    """A fixed consumer-to-processes map."""

    class _Static:
        def pids_of(self, name: str) -> frozenset[int]:
            return pids.get(name, frozenset())

    return _Static()
