"""
A bounded look at a request's JSON body, for the decisions that need it (is
this Ollama call an unload, which consumer serves this ``model``?).

The body has been received whole by then (twisted.web buffers it, a
temporary file past 100 KB), but it is read only when it is small: a large
upload is routed by its path, never parsed.  The file is rewound, so the body
is still forwarded byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.web.server import Request

#: Larger bodies are not parsed; the request is routed by its path.
JSON_READ_LIMIT = 1024 * 1024


def json_object(request: Request, limit: int = JSON_READ_LIMIT) -> dict[str, Any] | None:
    """
    The request's body as a JSON object, or None when it is empty, larger
    than ``limit`` bytes, not JSON, or not an object.
    """
    content = request.content
    if content is None:
        return None
    size = content.seek(0, os.SEEK_END)
    content.seek(0)
    if size == 0 or size > limit:
        return None
    try:
        raw = content.read(limit + 1)
    finally:
        content.seek(0)
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
