"""
Header hygiene for a proxy: which headers cross it, in either direction.

Hop-by-hop headers describe one TCP connection, not the message (RFC 9110
section 7.6.1); forwarding them lets a client steer our connection to the
consumer, or confuses the framing of the client's own.  Framing headers
(Content-Length, Transfer-Encoding) and Host are set by the HTTP client that
makes the upstream request, exactly once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Sequence

from twisted.web.client import URI
from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Never sent upstream: the agent writes its own Host and framing, and the
#: inbound body has already been received whole, so ``Expect`` is spent.
NOT_FORWARDED_UP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}

#: Never relayed back: our server frames the client's response itself, except
#: Content-Length, which is kept so a short upstream body is detectable.
NOT_RELAYED_DOWN = HOP_BY_HOP


def _named_by_connection(connection: Iterable[bytes]) -> set[bytes]:
    named: set[bytes] = set()
    for value in connection:
        named.update(
            token.strip().lower() for token in value.split(b",") if token.strip()
        )
    return named


def end_to_end(
    headers: Headers, never: Collection[bytes], connection: Iterable[bytes] | None = None
) -> list[tuple[bytes, Sequence[bytes]]]:
    """
    The headers that may cross the proxy: all of them, less ``never`` and any
    header the message's ``Connection`` header names (``connection``, when the
    HTTP library keeps it apart from ``headers``).  Repeated headers keep every
    value, in order.
    """
    if connection is None:
        connection = headers.getRawHeaders(b"connection", [])
    # Most messages name nothing in Connection: then ``never`` serves as it is.
    named = _named_by_connection(connection) if connection else None
    dropped = set(never) | named if named else never
    return [
        (name, values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in dropped
    ]


#: Set by the daemon from what it saw, never taken from the client.
FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-real-ip",
        b"client-ip",
    }
)

#: A Host value we are willing to repeat to a consumer: a name or address and
#: an optional port, nothing that could smuggle another parameter in.
_PLAIN_HOST = re.compile(rb"\A(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?\Z")


#: Never sent upstream, with and without the client's ``Authorization``: made
#: once, not per request.
_NEVER_UP = NOT_FORWARDED_UP | FORWARDING
_NEVER_UP_NOR_AUTHORIZATION = _NEVER_UP | {b"authorization"}


#: The daemon's own request headers (``X-Mgpu-Class``, ``X-Mgpu-Priority``):
#: instructions to the scheduler, never sent on to a consumer.
_DAEMON_PREFIX = b"x-mgpu-"


#: The cookie that holds the daemon's token for its status page: the daemon's
#: own, never sent on to a consumer (a browser sends it to every port).
TOKEN_COOKIE = b"mgpumanager_token"


def without_token_cookie(values: Iterable[bytes]) -> list[bytes]:
    """``Cookie`` header values less the daemon's token cookie (and empty ones)."""
    kept = []
    for value in values:
        pairs = [
            pair.strip()
            for pair in value.split(b";")
            if pair.strip() and pair.strip().partition(b"=")[0].strip() != TOKEN_COOKIE
        ]
        if pairs:
            kept.append(b"; ".join(pairs))
    return kept


def upstream_headers(
    inbound: Headers,
    client: str | None = None,
    drop_authorization: bool = False,
) -> Headers:
    """
    The headers of the request we make on the consumer.  A client's own
    forwarding headers are replaced with what the daemon saw (``client`` is
    the peer address; None leaves them out); ``drop_authorization`` keeps the
    daemon's bearer token from reaching a consumer, and its token cookie never
    does.
    """
    never = _NEVER_UP_NOR_AUTHORIZATION if drop_authorization else _NEVER_UP
    outbound = Headers()
    for name, values in end_to_end(inbound, never):
        lowered = name.lower()
        if lowered == b"cookie":
            values = without_token_cookie(values)
        if values and not lowered.startswith(_DAEMON_PREFIX):
            outbound.setRawHeaders(name, values)
    if client is not None:
        raw_host = (inbound.getRawHeaders(b"host") or [b""])[0]
        for name, value in _forwarding(client, raw_host):
            outbound.setRawHeaders(name, [value])
    return outbound


@functools.lru_cache(maxsize=256)
def _forwarding(client: str, raw_host: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """
    What the daemon says it saw: the client's address, the ``Host`` it asked
    for (when it is a plain name) and the scheme.  The same few clients ask
    by the same few names, so each pair is spelled once.
    """
    host = raw_host.decode("ascii") if _PLAIN_HOST.match(raw_host) else ""
    node = f'"[{client}]"' if ":" in client else client
    forwarded = f"for={node};proto=http"
    headers = []
    if host:
        headers.append((b"x-forwarded-host", host.encode("ascii")))
        forwarded += f';host="{host}"'
    headers += [
        (b"x-forwarded-for", client.encode("ascii")),
        (b"x-forwarded-proto", b"http"),
        (b"forwarded", forwarded.encode("ascii")),
    ]
    return tuple(headers)


@functools.lru_cache(maxsize=256)
def host_header(url: str) -> bytes:
    """
    The ``Host`` a request to the consumer at ``url`` carries, as Twisted's
    ``Agent`` would write it (the port left out where it is the scheme's
    own, an IPv6 address in brackets).  Set by the relay, so that the agent
    need not copy the headers to add it on every request.
    """
    uri = URI.fromBytes(url.encode("ascii"))
    # An IPv6 address keeps its brackets: URI.fromBytes strips them.
    host = b"[%s]" % uri.host if b":" in uri.host else uri.host
    default_port = {b"http": 80, b"https": 443}.get(uri.scheme)
    return host if uri.port == default_port else b"%s:%d" % (host, uri.port)


def relay_response_headers(
    upstream: Headers, outbound: Headers, connection: Iterable[bytes] = ()
) -> None:
    """Copy a consumer's response headers onto the client's response."""
    for name, values in end_to_end(upstream, NOT_RELAYED_DOWN, connection):
        outbound.setRawHeaders(name, values)


def reuse_for(
    version: tuple[bytes, int, int], connection: Sequence[bytes], keep_alive: Sequence[bytes]
) -> float | None:
    """
    How long the connection that carried an answer may wait idle for the next
    request: ``None`` when it must not be reused at all (an HTTP/1.0 answer
    without ``Connection: keep-alive``, or one that said ``close``: the server
    is closing it, and a request sent before we see the close is lost); else
    one second less than the server's ``Keep-Alive: timeout=N`` (so we stop
    using it before the server closes it), or infinity when it names none.
    """
    tokens = {t.strip().lower() for value in connection for t in value.split(b",")}
    if b"close" in tokens:
        return None
    if version[1:] < (1, 1) and b"keep-alive" not in tokens:
        return None
    for value in keep_alive:
        for parameter in value.split(b","):
            name, _, number = parameter.strip().partition(b"=")
            if name.strip().lower() == b"timeout":
                try:
                    return max(0.0, float(number.strip()) - 1)
                except ValueError:
                    continue
    return float("inf")
