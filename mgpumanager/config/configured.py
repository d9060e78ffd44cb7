"""
The one way a component takes a reloaded configuration.

A reload replaces the whole :class:`~mgpumanager.config.document.Config`; a
component that read a piece of the old one and was not told keeps acting on
it, silently.  So every component that depends on configuration takes the new
one through :class:`Configured`, and ``app.service.build`` registers each of
them, in an order it writes down, with the registry that a reload goes through.
Nothing else assigns settings to a component from outside, and nothing reads
"the current configuration" from a shared holder per call.

It lives in the configuration layer so that every layer above can provide it
without importing upward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred

from mgpumanager.config.document import Config

_A = TypeVar("_A")
_R = TypeVar("_R")


class Configured(Protocol):
    """A component that depends on configuration and takes every new one."""

    def reconfigure(self, config: Config) -> Deferred[None] | None:
        """
        Work to ``config`` from now on; work already under way may finish as
        it began.  May return a Deferred that fires once the change is in
        effect (a port opened); a failure is logged and the reload goes on.
        """


class PerConfig(Generic[_A, _R]):
    """
    ``read(config, argument)`` against the configuration the last reload gave:
    for a collaborator that takes a plain callable (the pool's idle limit per
    server) and must not keep a configuration of its own.  Each answer is
    kept until the next reload (``read`` is pure, and asked on every request).

    :param config: the configuration the daemon starts with.
    :param read: a pure function of a configuration and one hashable argument.
    """

    #: At most this many answers are kept (the arguments seen are few: servers).
    KEPT = 256

    def __init__(self, config: Config, read: Callable[[Config, _A], _R]) -> None:
        self._config = config
        self._read = read
        self._answers: dict[_A, _R] = {}

    def __call__(self, argument: _A) -> _R:
        answers = self._answers
        if argument in answers:
            return answers[argument]
        if len(answers) >= self.KEPT:
            answers.clear()
        answer = answers[argument] = self._read(self._config, argument)
        return answer

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._answers = {}
