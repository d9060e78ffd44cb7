"""
An event feed served on ``GET /v1/events`` through a route table of its own,
as the main port serves it, for the feed's tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.server import Request, Site

from mgpumanager.config.parsing import parse_config
from mgpumanager.web.declare import Does, Policy, route
from mgpumanager.web.events import EventFeed
from mgpumanager.web.routing import RouteTable

CONFIG = parse_config(
    {"consumers": {"voice": {"url": "http://127.0.0.1:9001", "health": {"path": "/health"}}}}
)


class _FeedRoutes:
    def __init__(self, feed: EventFeed, seen: Callable[[Request], None]) -> None:
        self._feed = feed
        self._seen = seen

    @route("/v1/events", ["GET"], Policy(Does.OWN))
    def events(self, request: Request) -> Any:
        self._seen(request)
        return self._feed.serve(request)


def feed_site(feed: EventFeed, seen: Callable[[Request], None] = lambda request: None) -> Site:
    """A site serving ``feed``; ``seen`` is told of every request it serves."""
    return Site(RouteTable([_FeedRoutes(feed, seen)], CONFIG).resource)
