"""Small builders for configuration documents, shared by the unit tests."""

from __future__ import annotations

from typing import Any


def consumer(port: int, *kinds: str, **extra: Any) -> dict[str, Any]:
    """A consumer entry on loopback ``port`` serving ``kinds`` at ``/<kind>``."""
    return {
        "url": f"http://127.0.0.1:{port}",
        "health": {"path": "/health"},
        "paths": {kind: {"path": f"/{kind}"} for kind in kinds},
        **extra,
    }
