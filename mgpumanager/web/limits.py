"""
How long an idle connection to a server is kept: the shortest keep-alive of
the consumers behind one address.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.web.client import URI

from mgpumanager.config.consumers import Timeouts
from mgpumanager.config.document import Config


def idle_limit(config: Config, key: Any) -> float:
    """
    How long an idle pooled connection to the server at ``key`` (the pool's
    ``(scheme, host, port)``) is kept: the shortest ``timeouts.keepalive_seconds``
    of the consumers there.
    """
    limits = [
        consumer.timeouts.keepalive_seconds
        for consumer in config.consumers.values()
        if _pool_key(consumer.url) == tuple(key)
    ]
    return min(limits, default=Timeouts().keepalive_seconds)


@functools.lru_cache(maxsize=256)
def _pool_key(url: str) -> tuple[bytes, bytes, int]:
    # Asked every time a connection goes back to the pool: parse each URL once.
    uri = URI.fromBytes(url.encode("ascii"))
    return uri.scheme, uri.host, uri.port
