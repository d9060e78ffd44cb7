"""
ComfyUI's prompt queue and history, as its HTTP routes show them.

A prompt is queued by ``POST /prompt``, run by one worker at a time, and then kept in
the history.  The shapes are ComfyUI's: a queue item is the list
``[number, prompt_id, prompt, extra_data, outputs_to_execute]``, and a history entry
holds that list, the outputs per node and a status with its messages.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import attrs


@attrs.define
class QueuedPrompt:
    """One prompt, from submission to its history entry."""

    number: int
    prompt_id: str
    graph: dict[str, Any]
    client_id: str | None
    work_seconds: float
    outputs: dict[str, Any] = attrs.field(factory=dict)
    messages: list[list[Any]] = attrs.field(factory=list)
    status_str: str | None = None

    @property
    def output_node(self) -> str:
        """The node whose images the prompt saves: a ``SaveImage``, else the last one."""
        for node, spec in self.graph.items():
            if isinstance(spec, dict) and spec.get("class_type") == "SaveImage":
                return str(node)
        return str(list(self.graph)[-1]) if self.graph else "9"

    def queue_item(self) -> list[Any]:
        extra = {"client_id": self.client_id} if self.client_id else {}
        return [self.number, self.prompt_id, self.graph, extra, [self.output_node]]

    def history_entry(self) -> dict[str, Any]:
        return {
            "prompt": self.queue_item(),
            "outputs": self.outputs,
            "status": {
                "status_str": self.status_str,
                "completed": self.status_str == "success",
                "messages": self.messages,
            },
            "meta": {node: {"node_id": node} for node in self.outputs},
        }


class PromptQueue:
    """Pending prompts in submission order, the running one, and the finished ones."""

    def __init__(self) -> None:
        self.pending: list[QueuedPrompt] = []
        self.running: QueuedPrompt | None = None
        self.history: dict[str, QueuedPrompt] = {}
        self.count = 0

    @property
    def remaining(self) -> int:
        """ComfyUI's ``queue_remaining``: pending plus running."""
        return len(self.pending) + (1 if self.running is not None else 0)

    def add(
        self, prompt_id: str, graph: dict[str, Any], client_id: str | None, work_seconds: float
    ) -> QueuedPrompt:
        prompt = QueuedPrompt(self.count, prompt_id, graph, client_id, work_seconds)
        self.count += 1
        self.pending.append(prompt)
        return prompt

    def take(self) -> QueuedPrompt | None:
        """Start the oldest pending prompt, if any."""
        if self.running is None and self.pending:
            self.running = self.pending.pop(0)
        return self.running

    def finish(self, status_str: str) -> QueuedPrompt:
        prompt = self.running
        assert prompt is not None
        prompt.status_str = status_str
        self.running = None
        self.history[prompt.prompt_id] = prompt
        return prompt

    def delete(self, prompt_ids: list[str]) -> int:
        """Drop pending prompts by id (a running one is interrupted, not deleted)."""
        before = len(self.pending)
        self.pending = [p for p in self.pending if p.prompt_id not in prompt_ids]
        return before - len(self.pending)

    def clear(self) -> int:
        dropped = len(self.pending)
        self.pending = []
        return dropped

    def snapshot(self) -> dict[str, list[list[Any]]]:
        running = [self.running.queue_item()] if self.running is not None else []
        return {
            "queue_running": running,
            "queue_pending": [p.queue_item() for p in self.pending],
        }

    def produced(self, filename: str) -> bool:
        """Whether ``filename`` is an image some finished prompt saved."""
        return any(
            image.get("filename") == filename
            for prompt in self.history.values()
            for output in prompt.outputs.values()
            for image in output.get("images", [])
        )


def tiny_png(seed: int) -> bytes:
    """A valid 8x8 grey PNG whose shade depends on ``seed``, so outputs differ."""
    shade = seed * 37 % 256
    rows = b"".join(b"\x00" + bytes([shade]) * 8 for _ in range(8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", crc)

    header = struct.pack("!IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
