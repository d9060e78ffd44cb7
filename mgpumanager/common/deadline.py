"""
Time limits that say they were time limits.

``Deferred.addTimeout`` cancels the operation and converts a bare
``CancelledError`` into ``TimeoutError``; but an HTTP request cancelled on an
open connection fails with ``ResponseNeverReceived([CancelledError])``, which
would reach an operator as "connection closed".  :func:`within` remembers that
it was the clock that ran out and says so.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

_T = TypeVar("_T")


class TimedOut(Exception):
    """An operation outlived its time limit and was cancelled."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"{what} timed out after {seconds:g} s")
        self.seconds = seconds


def within(pending: Deferred[_T], seconds: float, clock: IReactorTime, what: str) -> Deferred[_T]:
    """
    Cancel ``pending`` after ``seconds``; if it then fails in any way, fail
    with :class:`TimedOut` instead.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        pending.cancel()

    timer = clock.callLater(seconds, expire)

    def settle(result: _T | Failure) -> _T | Failure:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(TimedOut(what, seconds))
        return result

    return pending.addBoth(settle)
