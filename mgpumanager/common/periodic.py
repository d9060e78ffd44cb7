"""Work done on a timer, started and stopped with its service."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Periodic:
    """
    Calls ``work`` every ``interval`` seconds, first at :meth:`start`.  The
    work must never raise: a LoopingCall stops for good on the first error.
    """

    def __init__(self, work: Callable[[], object], clock: IReactorTime, interval: float) -> None:
        self._interval = interval
        self._loop = LoopingCall(work)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def set_interval(self, interval: float) -> None:
        """Run every ``interval`` seconds from now on (a reload changed it)."""
        if interval == self._interval:
            return
        self._interval = interval
        if self._loop.running:
            self._loop.stop()
            self._loop.start(interval, now=False)
