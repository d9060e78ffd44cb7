"""
Moments as the status page and the logs show them.

Every timestamp the daemon reports is POSIX seconds inside and RFC 3339 UTC outside,
written one way so that clients can compare them as strings.
"""

from __future__ import annotations

import datetime


def rfc3339(when: float | None) -> str | None:
    """POSIX seconds as RFC 3339 UTC; ``None`` stays ``None`` (never year 0001)."""
    if when is None:
        return None
    moment = datetime.datetime.fromtimestamp(when, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
