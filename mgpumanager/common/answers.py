"""
A consumer's small HTTP answer as a value: what control calls, probes and the
relay read back when they read the body themselves (health, load, an error).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

#: A JSON object as read from an answer: each value must be checked before use.
JsonObject = dict[str, object]
#: A JSON document the daemon builds itself, whose shape it knows.
JsonDocument = dict[str, Any]

#: How much of a refusing answer's body an error message quotes.
QUOTED_BYTES = 200


@attrs.frozen
class Answer:
    """A consumer's HTTP answer: its status and body, ``None`` when over the cap."""

    code: int
    body: bytes | None

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def json_object(self) -> JsonObject | None:
        """The body as a JSON object; ``None`` when it is not one or was over the cap."""
        if self.body is None:
            return None
        try:
            document = json.loads(self.body)
        except ValueError:
            return None
        return document if isinstance(document, dict) else None

    def quoted(self) -> str:
        """The start of the body on one line, for an error message."""
        text = (self.body or b"")[:QUOTED_BYTES].decode("utf-8", "replace")
        return " ".join(text.split())
