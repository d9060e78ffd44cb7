"""Job callables for the scheduler's tests: each records that it ran and finishes on command."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred


class Jobs:
    """Job callables that record when they are called, and finish (or are cancelled) on command."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.pending: dict[str, Deferred[str]] = {}
        self.cancelled: list[str] = []

    def job(self, label: str) -> Callable[[], Deferred[str]]:
        def run() -> Deferred[str]:
            self.started.append(label)
            d: Deferred[str] = Deferred(lambda _: self.cancelled.append(label))
            self.pending[label] = d
            return d

        return run

    def finish(self, label: str) -> None:
        self.pending[label].callback(label)
