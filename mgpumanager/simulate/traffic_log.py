"""
What a simulated host in its own process tells the process that drives it:
every request its servers received, one JSON line each, written and flushed
as it arrives, and the card's out-of-memory count, rewritten a few times a
second.  A soak that ``kill -9``\\ s the host still finds, in the files, every
POST the servers saw before it died: that is how a POST delivered twice is
counted at the servers, not guessed at the client.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from twisted.internet.task import LoopingCall

from mgpumanager.simulate.recording import RecordedRequest
from mgpumanager.simulate.server import SimServer

#: The request header whose value identifies a client's request in the log.
REQUEST_ID_HEADER = "x-request-id"
STATS_INTERVAL_SECONDS = 0.1


class RequestLog:
    """Appends one line per request to ``path``: server, method, path, request id."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def __call__(self, server: SimServer, request: RecordedRequest) -> None:
        line = {
            "server": server.name,
            "method": request.method,
            "path": request.path,
            "id": request.header(REQUEST_ID_HEADER),
            "at": request.received_at,
        }
        # Flushed at once: the host may be killed with SIGKILL at any moment.
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_stats(path: str, host: Any) -> None:
    """Replace ``path`` with the card's counters (atomically: a reader never sees half)."""
    document = {
        "oom_count": sum(card.oom_count for card in host.cards),
        "oom_errors": {name: server.oom_errors for name, server in host.servers.items()},
        "max_gpu_jobs": host.gpu_jobs.max_active,
    }
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(document, f)
    os.replace(temporary, path)


def stats_loop(path: str, host: Any, clock: Any) -> LoopingCall:
    """Keep ``path`` current while the host runs; the caller stops the loop."""
    loop = LoopingCall(write_stats, path, host)
    loop.clock = clock
    loop.start(STATS_INTERVAL_SECONDS)
    return loop
