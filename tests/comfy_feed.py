"""Reading ComfyUI's progress feed the way its scripts do, with a real WebSocket client."""

from __future__ import annotations

import json
from typing import Any


def messages_until_idle(socket: Any) -> list[dict[str, Any]]:
    """
    Every message on a ``websocket-client`` socket until ComfyUI says it is
    idle (``executing`` with no node).  Blocking: run it in a thread.
    """
    messages = []
    while True:
        message = json.loads(socket.recv())
        messages.append(message)
        if message["type"] == "executing" and message["data"]["node"] is None:
            return messages
