"""
Sends a trace to the daemon's HTTP API at its (scaled) arrival times and
records what each job waited.

Every duration is divided by the time scale so that two hours replay in six
minutes at the most (``MAX_SCALE``); the records are scaled back to trace
seconds.  The simulated servers take ``{"work_seconds": s}`` as the work to
do, so the service time travels in the body, scaled like everything else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from treq.client import HTTPClient
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from mgpumanager.replay.report import FAILED, OK, REFUSED, TIMEOUT, JobRecord
from mgpumanager.replay.traces import TraceJob

log = Logger()

MAX_SCALE = 20.0
#: The least a scaled polling interval may be, so a fast replay does not turn
#: the daemon's own polling into the load being measured.
POLL_FLOOR_SECONDS = 0.05

_QUEUE_TIMING = re.compile(r"(?:^|,)\s*queue\s*;[^,]*?\bdur=([0-9.]+)")


def check_scale(scale: float) -> float:
    """:raises ValueError: unless 0 < scale <= ``MAX_SCALE``."""
    if not 0 < scale <= MAX_SCALE:
        raise ValueError(f"time scale must be above 0 and at most {MAX_SCALE:g}, not {scale}")
    return scale


def scaled_interval(seconds: float, scale: float) -> float:
    """A polling interval divided by the scale, never below ``POLL_FLOOR_SECONDS``."""
    return max(POLL_FLOOR_SECONDS, seconds / check_scale(scale))


def queue_seconds(headers: Headers) -> float | None:
    """The ``queue`` entry of ``Server-Timing`` in seconds, if the daemon sent one."""
    for value in headers.getRawHeaders(b"server-timing", []):
        found = _QUEUE_TIMING.search(value.decode("latin-1"))
        if found:
            return float(found.group(1)) / 1000
    return None


def outcome_of(status: int, body: bytes) -> str:
    """``ok`` for any 2xx; a refusal or a timeout by the daemon's error code."""
    if 200 <= status < 300:
        return OK
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        code = None
    if code == "queue_full" or status == 429:
        return REFUSED
    if code in ("queue_timeout", "upstream_timeout") or status == 504:
        return TIMEOUT
    return FAILED


class Replayer:
    """
    One replay of one trace against ``base_url`` (``http://127.0.0.1:8770``).

    :param http: the client to send with; by default one over a
        non-persistent pool, so nothing lingers after the replay.
    """

    def __init__(self, base_url: str, scale: float, reactor: IReactorTime,
                 http: HTTPClient | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._scale = check_scale(scale)
        self._reactor = reactor
        self._http = http or HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self._started = 0.0

    async def replay(self, jobs: Sequence[TraceJob]) -> list[JobRecord]:
        """Send every job and return one record per job once all have answered."""
        chains: dict[int, list[TraceJob]] = {}
        starts: list[list[TraceJob]] = []
        for job in jobs:
            if job.chain is None:
                starts.append([job])
            else:
                chains.setdefault(job.chain, []).append(job)
        starts += [sorted(steps, key=lambda job: job.step) for steps in chains.values()]
        self._started = self._reactor.seconds()
        runs = [ensureDeferred(self._run_chain(steps)) for steps in starts]
        done = await gatherResults(runs, consumeErrors=True)
        return sorted((r for records in done for r in records), key=lambda r: r.arrival)

    async def _run_chain(self, steps: list[TraceJob]) -> list[JobRecord]:
        """Each step only once the one before it answered; a failed step ends the turn."""
        await deferLater(self._reactor, steps[0].at / self._scale)
        records = []
        for job in steps:
            record = await self._send(job)
            records.append(record)
            if record.outcome != OK:
                break
        return records

    def _now(self) -> float:
        """Trace seconds since the replay began."""
        return (self._reactor.seconds() - self._started) * self._scale

    async def _send(self, job: TraceJob) -> JobRecord:
        sent = self._now()
        service = job.service_seconds / self._scale
        try:
            response = await self._http.post(
                f"{self._base}/v1/{job.kind}",
                data=json.dumps({"work_seconds": service}).encode(),
                headers=Headers({b"content-type": [b"application/json"],
                                 b"x-mgpu-class": [job.job_class.encode()]}),
            )
            headers_at = self._now()
            body = await response.content()
        except Exception as error:
            log.info("{kind} job at {at} failed: {error}", kind=job.kind, at=job.at,
                     error=error)
            return JobRecord(sent, job.kind, job.job_class, FAILED, chain=job.chain,
                             step=job.step)
        outcome = outcome_of(response.code, body)
        queued = queue_seconds(response.headers)
        if queued is not None:
            wait: float | None = queued * self._scale
        else:
            wait = max(0.0, headers_at - sent - job.service_seconds)
        return JobRecord(sent, job.kind, job.job_class, outcome,
                         wait if outcome == OK else None, self._now(), job.chain, job.step)
