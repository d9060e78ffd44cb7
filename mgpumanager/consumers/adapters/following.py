"""
Jobs that outlive their HTTP answer, followed to their end.

What the daemon holds the GPU for is the server's work, not the exchange that
started it.  For most servers the two end together; a ComfyUI prompt goes on
for minutes after ``POST /prompt`` has answered.  :class:`Completions` gives
the job runner what it needs to wait for that work without knowing whose it is:
the consumer's adapter decides whether and how.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime

from mgpumanager.common.answers import Answer
from mgpumanager.common.paths import normalise
from mgpumanager.consumers.adapters.base import FollowedWork
from mgpumanager.consumers.adapters.resolved import Adapters
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.state.registry import ConsumerState

#: What a follow ended with when it ran out of time (see ``comfy_completion``).
TIMED_OUT = "timeout"


@attrs.frozen
class Completions:
    """
    :param control: polls the consumers.
    :param clock: paces the polls.
    :param on_timeout: told ``(consumer, work_id, seconds)`` when work was
        given up on after its consumer's ``completion.timeout_seconds``.
    :param adapters: each consumer's adapter, which decides whether and how.
    """

    control: ConsumerControl
    clock: IReactorTime
    on_timeout: Callable[[str, str, float], None]
    adapters: Adapters

    def completes_later(self, state: ConsumerState, method: str, path: str) -> bool:
        """Whether a job sent as ``method path`` (as sent, encoded) may outlive its answer."""
        adapter = self.adapters.of(state.config)
        return bool(adapter.completes_later(method, normalise(path.encode("ascii"))))

    def work_started_by(self, state: ConsumerState, answer: Answer) -> FollowedWork | None:
        """
        The work ``answer`` started, or ``None`` when it started nothing the
        job must wait for.
        """
        return self.adapters.of(state.config).follow(
            self.control, state, answer, self.clock
        )

    async def settle(self, state: ConsumerState) -> None:
        """Wait until the consumer is idle after an exchange that broke (its adapter's way)."""
        await self.adapters.of(state.config).settle(self.control, state, self.clock)

    def outcome(self, state: ConsumerState, work_id: str, how: str) -> None:
        """Record how followed work ended; only a timeout is worth a decision entry."""
        if how == TIMED_OUT:
            self.on_timeout(state.name, work_id, state.config.completion.timeout_seconds)
