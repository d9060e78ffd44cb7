"""
Following a ComfyUI prompt from its answer to its end.

``POST /prompt`` answers as soon as the prompt is queued; the generation
happens afterwards.  A job that ended with the answer would let the next job
load its model beside a generation in full flight, which is exactly the
out-of-memory the daemon exists to prevent.  So the job keeps the GPU until
``/history/<id>`` shows the prompt finished, or ComfyUI shows it never will.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mgpumanager.common.answers import JsonObject
from mgpumanager.consumers.adapters.base import POLL_TIMEOUT_SECONDS
from mgpumanager.consumers.adapters.polling import sleep
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.state.registry import ConsumerState

log = Logger()

#: How many polls in a row must miss the prompt in ``/queue`` before it counts as gone:
#: one miss may be the moment between the queue and the history.
MISSES_FOR_GONE = 2


def queued_ids(queue: JsonObject) -> set[str]:
    """The prompt ids in ``/queue``'s ``queue_running`` and ``queue_pending``."""
    ids = set()
    for key in ("queue_running", "queue_pending"):
        entries = queue.get(key)
        for entry in entries if isinstance(entries, list) else ():
            # Each entry is [number, prompt_id, prompt, extra_data, outputs].
            if isinstance(entry, list) and len(entry) > 1 and isinstance(entry[1], str):
                ids.add(entry[1])
    return ids


def queue_is_empty(queue: JsonObject) -> bool:
    return not any(queue.get(key) for key in ("queue_running", "queue_pending"))


@attrs.define
class PromptCompletion:
    """
    One queued prompt, followed until it ends.

    :ivar work_id: the prompt's id.
    """

    control: ConsumerControl
    state: ConsumerState
    clock: IReactorTime
    work_id: str

    async def until_done(self) -> str:
        """
        Fires with how the prompt ended: ``done`` (in the history),
        ``gone`` (twice in a row in neither queue: deleted, or ComfyUI
        restarted), ``probe failed``, or ``timeout`` (then it was deleted
        from the queue and interrupted).
        """
        completion = self.state.config.completion
        deadline = self.clock.seconds() + completion.timeout_seconds
        misses = 0
        while True:
            if self.state.healthy is False:
                return "probe failed"
            try:
                if await self._in_history():
                    return "done"
                misses = 0 if self.work_id in await self._queued() else misses + 1
            except ControlFailed as e:
                # One failed poll proves nothing; a dead server fails its probe.
                log.debug("polling {id}: {e}", id=self.work_id, e=e.message)
            if misses >= MISSES_FOR_GONE:
                return "gone"
            if self.clock.seconds() >= deadline:
                await self._give_up()
                return "timeout"
            await sleep(self.clock, completion.poll_seconds)

    async def _in_history(self) -> bool:
        code, history = await self._get(f"/history/{self.work_id}")
        return code == 200 and bool(history)

    async def _queued(self) -> set[str]:
        code, queue = await self._get("/queue")
        if code != 200 or queue is None:
            raise ControlFailed(f"GET /queue answered HTTP {code}")
        return queued_ids(queue)

    async def _get(self, path: str) -> tuple[int, JsonObject | None]:
        return await self.control.get_json(
            self.state.config, "GET", path, POLL_TIMEOUT_SECONDS, cap=1024 * 1024
        )

    async def _give_up(self) -> None:
        """Take the prompt out of the queue, or stop it running."""
        calls: list[tuple[str, JsonObject]] = [
            ("/queue", {"delete": [self.work_id]}),
            ("/interrupt", {"prompt_id": self.work_id}),
        ]
        for path, body in calls:
            try:
                await self.control.get_json(
                    self.state.config, "POST", path, POLL_TIMEOUT_SECONDS, body=body
                )
            except ControlFailed as e:
                log.warn("giving up on prompt {id}: {e}", id=self.work_id, e=e.message)
