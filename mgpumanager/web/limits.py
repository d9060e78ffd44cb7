"""
Limits that depend on where a request goes: the body limit of the consumer a
request target reaches, and how long an idle connection to a server is kept.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.web.client import URI

from mgpumanager.config.consumers import Timeouts
from mgpumanager.config.document import Config
from mgpumanager.web.api import job_kind
from mgpumanager.web.openai_routes import family_consumer
from mgpumanager.web.passthrough import passthrough_consumer


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


def body_limit_for_path(config: Config, target: bytes) -> int:
    """
    The body limit for a request target: the consumer's it goes to (a job,
    the passthrough, an OpenAI route), else the global one.
    """
    path = target.partition(b"?")[0]
    consumer = passthrough_consumer(config, path) or family_consumer(config, path)
    if consumer is not None:
        return (consumer.max_body_mib or config.max_body_mib) * 1024 * 1024
    return config.body_limit_for(job_kind(path))
