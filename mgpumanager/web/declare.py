"""
How a route is declared beside its handler: what it is, whose body limit
holds it, what opens it when a token is configured, and its error shape.
:class:`~mgpumanager.web.routing.RouteTable` turns the declarations of a
port's owners into that port's routes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.web.answers import Shape

_F = TypeVar("_F", bound=Callable[..., Any])


class Does(enum.Enum):
    """What a route is."""

    #: A GPU job: it queues for the card (the passthrough may make one too).
    JOB = "job"
    #: Forwarded to a consumer as it came; a GPU job only where its adapter says so.
    PASSTHROUGH = "passthrough"
    #: Answered by the daemon itself.
    OWN = "own"


class Token(enum.Enum):
    """What opens a route when ``auth.token_file`` is set."""

    #: Nothing needed: liveness checks carry no secrets.
    OPEN = "open"
    #: The bearer token, or the page's cookie on GET (read-only page routes).
    PAGE = "page"
    #: As PAGE, and ``?token=`` once: the status page a person opens from a link.
    PAGE_LINK = "page_link"
    #: The bearer token only.
    BEARER = "bearer"


#: Whose body limit holds a request, from the configuration and the route's
#: arguments: a consumer (its ``max_body_mib`` if set), or None for the global one.
LimitSource = Callable[[Config, Mapping[str, Any]], Iterable[ConsumerConfig]]


def global_limit(config: Config, args: Mapping[str, Any]) -> Iterable[ConsumerConfig]:
    """The global limit alone: the daemon's own routes."""
    return ()


@attrs.frozen
class Policy:
    """
    What a route is, and how the site, the guard and the error renderer treat it.

    :param limit: the consumers a request may reach; the largest of their
        limits holds it at header time (the handler holds it to the one it
        reaches, once known).
    :param kind: the GPU job kind, where the route is a job of one kind.
    """

    does: Does
    token: Token = Token.BEARER
    shape: Shape = Shape.OURS
    limit: LimitSource = global_limit
    kind: str | None = None
    summary: str = ""


@attrs.frozen
class Declared:
    """
    One route: its Klein path pattern, its methods (None: any), its policy,
    and arguments its handler gets besides the path's.
    """

    path: str
    methods: tuple[str, ...] | None
    policy: Policy
    defaults: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def fixed_segments(self) -> int:
        """How many segments come before a trailing ``<path:…>`` part."""
        parts = self.path.strip("/").split("/")
        for index, part in enumerate(parts):
            if part.startswith("<path:"):
                return index
        return len(parts)


def route(
    path: str, methods: Sequence[str] | None, policy: Policy, **defaults: str
) -> Callable[[_F], _F]:
    """
    Declare a route beside its handler; stack several for one handler.  The
    handler is called with the request, the path's arguments and
    ``defaults``; ``{audio}`` in ``path`` stands for the configured audio prefix.
    """

    def declare(handler: _F) -> _F:
        verbs = tuple(methods) if methods is not None else None
        declared = Declared(path, verbs, policy, defaults)
        routes: list[Declared] = list(getattr(handler, "__routes__", ()))
        handler.__routes__ = [declared, *routes]  # type: ignore[attr-defined]
        return handler

    return declare
