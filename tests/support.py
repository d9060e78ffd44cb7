"""
Scaffolding every suite shares: trial's synchronous Deferred assertions under
pytest, a fixed instant to start clocks at, and a real-reactor pause for the
tests that run against loopback sockets.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

_case = SynchronousTestCase()
#: The result of a Deferred that has fired (fails the test otherwise).
success_result_of = _case.successResultOf
#: The failure of a Deferred that has failed, optionally of given types.
failure_result_of = _case.failureResultOf
#: Fails the test if a Deferred has fired.
assert_no_result = _case.assertNoResult

#: 2026-05-15T10:00:00Z: where the unit tests' clocks start.
EPOCH = calendar.timegm((2026, 5, 15, 10, 0, 0))


async def until(check: Callable[[], Awaitable[Any]], what: str, tries: int = 200) -> None:
    """Wait until ``await check()`` is true, 50 ms apart (end-to-end tests only)."""
    for _ in range(tries):
        if await check():
            return
        await sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def sleep(seconds: float) -> Deferred[None]:
    """Let the real reactor run for ``seconds`` (end-to-end tests only)."""
    return deferLater(reactor, seconds, lambda: None)


async def until_idle(
    read_status: Callable[[], Awaitable[dict[str, Any]]], within: float
) -> dict[str, Any]:
    """
    The daemon's status document once no job runs or waits (end-to-end tests;
    ``read_status`` fetches ``/v1/status``); fails after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        document = await read_status()
        scheduler = document["scheduler"]
        if scheduler["in_flight"] == 0 and scheduler["queue_depth"] == 0:
            return document
        assert time.monotonic() < deadline, f"the daemon never went idle: {scheduler}"
        await sleep(0.02)
