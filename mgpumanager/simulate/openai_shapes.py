"""
The JSON documents of OpenAI's API as Ollama's compatibility layer answers them.

Only shapes live here; :mod:`mgpumanager.simulate.ollama` decides when to send them.
Streams are server-sent events: one ``data: {...}`` event per chunk, then
``data: [DONE]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import uuid
from typing import Any

DONE_EVENT = b"data: [DONE]\n\n"


def sse(document: object) -> bytes:
    return b"data: " + json.dumps(document).encode("utf-8") + b"\n\n"


def error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def fake_embedding(text: str, dimensions: int = 8) -> list[float]:
    """A unit vector derived from ``text``: equal texts embed equally."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:dimensions]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Completion:
    """
    One chat or text completion, answered whole or as chunks.

    :param chat: ``chat.completion`` (messages) rather than ``text_completion``.
    """

    def __init__(self, model: str, created: int, chat: bool) -> None:
        self.model = model
        self.created = created
        self.chat = chat
        self.id = completion_id("chatcmpl" if chat else "cmpl")

    def _base(self, object_kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
        }

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"text": text, "index": 0, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def whole(self, text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"text": text, "index": 0, "finish_reason": "stop"}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage}


def embeddings(model: str, inputs: list[str], encoding: str) -> dict[str, Any]:
    """``/v1/embeddings``: floats, or base64 little-endian float32 when asked."""
    data = []
    for index, text in enumerate(inputs):
        vector: Any = fake_embedding(text)
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "embedding": vector, "index": index})
    tokens = sum(len(text.split()) for text in inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def models(names: list[str], created: int) -> dict[str, Any]:
    data = [{"id": n, "object": "model", "created": created, "owned_by": "library"} for n in names]
    return {"object": "list", "data": data}


def texts(value: object) -> list[str]:
    """An ``input`` or ``prompt`` that may be one string or a list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []
