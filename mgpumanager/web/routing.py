"""
The route table: every route of every port is declared once, beside its
handler, with its policy, and Klein routes the request.

A declaration (:func:`~mgpumanager.web.declare.route`) says what a route is
(a GPU job, a passthrough, the daemon's own), whose body limit holds it, what
opens it when a token is configured, and in which shape its errors are
written.  The site asks the same table at header time for the body limit, the
guard for the token rule, the error renderer for the shape, and Klein calls
the handler: no second list of paths exists anywhere, so no copy can disagree
with another.

Matching sees the path with each segment percent-decoded, as Klein does, so
``/v1/%6Clm`` is the ``/v1/llm`` job everywhere it is looked up and cannot
dodge that job's body limit.  A segment whose decoding would yield a ``/`` or
invalid UTF-8 is matched as it was sent (so ``/upstream%2Fx`` is no
passthrough).  Handlers that forward a path take it raw from the request line
(:func:`raw_rest`): a consumer gets it byte for byte.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import MapAdapter

from mgpumanager.common.errors import BAD_REQUEST, METHOD_NOT_ALLOWED, NOT_FOUND, ApiError
from mgpumanager.common.paths import is_utf8, routing_segments
from mgpumanager.config.document import Config
from mgpumanager.web.answers import Shape, answer_failure
from mgpumanager.web.declare import Declared, Does, Policy

#: What the routes of a port are looked up by, at most this many raw paths kept.
LOOKUPS_KEPT = 1024


@attrs.frozen
class Match:
    """What a request target is, as the table sees it (None: no route)."""

    declared: Declared | None
    args: Mapping[str, Any]
    #: The methods a path allows when the request's method is not one of them.
    allowed: tuple[str, ...] = ()
    #: How a path no route serves is treated.
    unrouted: Policy | None = None

    @property
    def policy(self) -> Policy:
        if self.declared is not None:
            return self.declared.policy
        assert self.unrouted is not None
        return self.unrouted


#: A path no route serves: the bearer token and the global limit, and OpenAI's
#: error shape under /v1/ (an unknown path there is one of OpenAI's, as far as a
#: client knows).
_NO_ROUTE = Policy(Does.OWN)
_NO_ROUTE_V1 = Policy(Does.OWN, shape=Shape.OPENAI)


def declared_path(request: Request) -> str:
    """The path pattern of the route Klein sent ``request`` to: its plain spelling."""
    declared: Declared = getattr(request, _ROUTE)
    return declared.path


def raw_rest(request: Request) -> bytes:
    """
    The raw path after the route's fixed segments, as the client spelled it
    (empty for a route without a ``<path:…>`` part): what a consumer is sent.
    """
    declared: Declared = getattr(request, _ROUTE)
    return b"/".join(request.path.split(b"/")[declared.fixed_segments + 1:])


#: The request attribute holding the declaration Klein routed it to.
_ROUTE = "_mgpumanager_route"


class RouteTable:
    """
    The routes of one port, from the handlers its owners declare, as one
    Klein app, and the lookups the site, the guard and the error renderer make.

    :param owners: objects whose methods carry :func:`~mgpumanager.web.declare.route`
        declarations.
    :param config: the configuration whose audio prefix fills ``{audio}``, and
        whose consumers' limits hold the requests.
    :param port_args: arguments every route of this port has besides its
        path's (a consumer's own port names its consumer).
    """

    def __init__(
        self,
        owners: Sequence[object],
        config: Config,
        port_args: Mapping[str, Any] | None = None,
    ) -> None:
        self._owners = owners
        self._port_args = dict(port_args or {})
        self.declared: list[Declared] = []
        self.config = config
        #: The port's resource: stays the same object when a reload rebuilds the routes.
        self.resource: Resource = _RoutedResource(self)
        self._build(config)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded configuration: the audio prefix may have moved."""
        self.config = config
        self._limits.clear()
        if config.audio_path_prefix != self._audio:
            self._build(config)

    def body_limit(self, method: bytes, target: bytes) -> int:
        """
        The body limit in bytes of a request for ``target`` (path and query):
        the largest limit among the consumers its route may reach, else the
        global one.  Kept per path until the next reload.
        """
        key = (method, target.partition(b"?")[0])
        limit = self._limits.get(key)
        if limit is None:
            if len(self._limits) >= LOOKUPS_KEPT:
                self._limits.clear()
            found = self.lookup(*key)
            reachable = found.policy.limit(self.config, found.args)
            limit = self._limits[key] = max(
                (self.config.body_limit_of(consumer) for consumer in reachable),
                default=self.config.body_limit_of(None),
            )
        return limit

    def _build(self, config: Config) -> None:
        self._audio = config.audio_path_prefix
        app = Klein()
        # Match paths as declared: no redirects to a merged or slashed spelling.
        app.url_map.merge_slashes = False
        app.url_map.strict_slashes = False
        by_endpoint: dict[str, Declared] = {}
        declared_all: list[Declared] = []
        for owner in self._owners:
            for name, handler in _declared_handlers(owner):
                for number, declared in enumerate(handler.__routes__):
                    declared = attrs.evolve(
                        declared, path=declared.path.replace("{audio}/", self._audio)
                    )
                    endpoint = f"{type(owner).__name__}.{name}.{number}"
                    app.route(
                        declared.path, methods=declared.methods, endpoint=endpoint,
                        defaults=dict(declared.defaults) or None,
                    )(_endpoint(handler, declared))
                    by_endpoint[endpoint] = declared
                    declared_all.append(declared)
        app.handle_errors(Exception)(self._answer_failure)
        self._app = app
        self._by_endpoint = by_endpoint
        self.declared = declared_all
        self._adapter: MapAdapter = app.url_map.bind("")
        self._lookups: dict[tuple[bytes, bytes], Match] = {}
        self._limits: dict[tuple[bytes, bytes], int] = {}
        self.klein_resource = app.resource()

    def lookup(self, method: bytes, raw_path: bytes) -> Match:
        """The route a request (raw path, no query) is for, cached per path."""
        key = (method, raw_path)
        found = self._lookups.get(key)
        if found is None:
            if len(self._lookups) >= LOOKUPS_KEPT:
                self._lookups.clear()
            found = self._lookups[key] = self._match(method, raw_path)
        return found

    def _match(self, method: bytes, raw_path: bytes) -> Match:
        text = (b"/" + b"/".join(routing_segments(raw_path))).decode("utf-8")
        verb = method.decode("ascii", "replace")
        try:
            endpoint, args = self._adapter.match(text, method=verb)
        except MethodNotAllowed as refused:
            allowed = tuple(sorted(refused.valid_methods or ()))
            endpoint, args = self._adapter.match(text, method=allowed[0])
            return Match(self._by_endpoint[endpoint], {**self._port_args, **args}, allowed)
        except NotFound:
            return self._unrouted(raw_path)
        return Match(self._by_endpoint[endpoint], {**self._port_args, **args})

    @staticmethod
    def _unrouted(raw_path: bytes) -> Match:
        policy = _NO_ROUTE_V1 if raw_path.startswith(b"/v1/") else _NO_ROUTE
        return Match(None, {}, unrouted=policy)

    def error_shape(self, method: bytes, raw_path: bytes) -> Shape:
        """How the daemon's errors look on a path (the site's refusals ask)."""
        return self.lookup(method, raw_path).policy.shape

    def _answer_failure(self, request: Any, failure: Failure) -> bytes | None:
        """Klein's one error handler: every failure in the route's error shape."""
        found = self.lookup(request.method, request.path)
        error = failure.value
        if isinstance(error, MethodNotAllowed):
            failure = Failure(ApiError(
                METHOD_NOT_ALLOWED,
                f"method {request.method.decode('ascii', 'replace')} not allowed here",
                headers={"Allow": ", ".join(found.allowed)},
            ))
        elif isinstance(error, NotFound):
            failure = Failure(unrouted_error(request.path))
        return answer_failure(request, failure, found.policy.shape)


def unrouted_error(raw_path: bytes) -> ApiError:
    """The error for a path no route serves."""
    if not is_utf8(unquote_to_bytes(raw_path)):
        return ApiError(BAD_REQUEST, "the request path is not UTF-8 once decoded")
    return ApiError(NOT_FOUND, "no such endpoint; see GET / for the routes")


def _declared_handlers(owner: object) -> Iterable[tuple[str, Any]]:
    # An owner given as a class declares its routes without serving them (a
    # table for lookups and documentation only).
    cls = owner if isinstance(owner, type) else type(owner)
    for name in dir(cls):
        if getattr(getattr(cls, name, None), "__routes__", None):
            yield name, getattr(owner, name)


def _endpoint(handler: Callable[..., Any], declared: Declared) -> Callable[..., Any]:
    """Klein's endpoint for a bound handler (Klein marks what it registers)."""

    def endpoint(request: Request, **args: Any) -> Any:
        setattr(request, _ROUTE, declared)
        return handler(request, **args)

    return endpoint


class _RoutedResource(Resource):
    """
    The port's resource: Klein's, over the path's segments as matching sees
    them (twisted.web would decode a ``%2F`` into a segment boundary).
    """

    isLeaf = True

    def __init__(self, table: RouteTable) -> None:
        super().__init__()
        self._table = table

    def render(self, request: Request) -> Any:
        request.postpath = list(_segments(request.path))
        return self._table.klein_resource.render(request)


@functools.lru_cache(maxsize=LOOKUPS_KEPT)
def _segments(raw_path: bytes) -> tuple[bytes, ...]:
    """The path's segments as matching sees them, kept for the paths last asked."""
    return tuple(routing_segments(raw_path))
