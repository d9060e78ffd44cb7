"""
Who may use the daemon: checks made before any route runs.

A daemon on loopback is still reachable from every web page the host's browser
opens: a page can POST to ``127.0.0.1:8770`` (cross-origin), or rebind a DNS
name it controls to 127.0.0.1 and then read our answers (DNS rebinding).  So on
loopback the ``Host`` must be a loopback name, a request that changes anything
(every method but GET, HEAD and OPTIONS) carrying a foreign ``Origin`` is
refused, and an optional bearer token closes the rest.

A page served by the port it talks to is same-origin (``Origin`` is
``http://<Host>``): ComfyUI's own web UI, opened through a per-server port or
the passthrough, posts its prompts that way.  A browser cannot send a bearer
token from a plain link, so the status page takes ``?token=`` once and sets an
HttpOnly, SameSite=Strict cookie that only the read-only page routes accept.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from twisted.web.http_headers import Headers

from mgpumanager.common.errors import BAD_REQUEST, FORBIDDEN, UNAUTHORIZED, ApiError
from mgpumanager.config.document import Config
from mgpumanager.relay.headers import TOKEN_COOKIE as COOKIE_NAME
from mgpumanager.web.declare import Token
from mgpumanager.web.routing import RouteTable

#: Methods that change nothing: a foreign ``Origin`` is no threat on them.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
#: What the page's cookie opens: reads only.
COOKIE_METHODS = frozenset({b"GET", b"HEAD"})
#: The cookie holding the token for the page routes.
TOKEN_COOKIE = COOKIE_NAME.decode("ascii")


# Asked for every request, and clients send the same few Host headers: each is
# parsed once (an ipaddress parse costs more than the rest of the check).
@functools.lru_cache(maxsize=64)
def is_loopback_host(host: bytes) -> bool:
    """Whether a ``Host`` header names this machine's loopback interface."""
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if text.startswith("["):
        address, closed, port = text[1:].partition("]")
        if not closed or not (port == "" or (port[:1] == ":" and port[1:].isdigit())):
            return False
    else:
        address = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    address = address.rstrip(".")
    if address == "localhost" or address.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Guard:
    """
    :param loopback: whether the daemon listens on loopback only; the Host
        check only makes sense then.
    :param routes: the port's route table, whose declarations say what opens
        each route when a token is configured (on a consumer's own port every
        path is the consumer's, and only the bearer token opens it).
    """

    def __init__(self, config: Config, loopback: bool, routes: RouteTable) -> None:
        self._loopback = loopback
        self._routes = routes
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the allowed origins and the token of a reloaded configuration."""
        self._origins = {origin.rstrip("/").encode("ascii", "replace")
                         for origin in config.allowed_origins}
        self._token = config.auth_token

    def refusal(self, method: bytes, target: bytes, headers: Headers) -> ApiError | None:
        """
        Why a request with this method, target (path and query) and headers
        is refused, or None.  Needs nothing but the head: the site asks
        before reading any body, so a refused client cannot make us store its
        upload first.
        """
        path, _, query = target.partition(b"?")
        method = method.upper()
        hosts = headers.getRawHeaders(b"host") or []
        if len(hosts) != 1 or not hosts[0].strip():
            return ApiError(BAD_REQUEST, "exactly one Host header is required")
        if self._loopback and not is_loopback_host(hosts[0]):
            return ApiError(
                FORBIDDEN,
                "this daemon listens on loopback and answers only loopback host names",
            )
        if method not in SAFE_METHODS:
            same_origin = b"http://" + hosts[0].strip().lower()
            for origin in headers.getRawHeaders(b"origin") or []:
                origin = origin.rstrip(b"/")
                if origin not in self._origins and origin.lower() != same_origin:
                    return ApiError(FORBIDDEN, "cross-origin requests are not allowed")
        if self._token is not None:
            rule = self._routes.lookup(method, path).policy.token
            if rule is not Token.OPEN and not self._authorized(method, query, headers, rule):
                return ApiError(
                    UNAUTHORIZED,
                    "a valid bearer token is required",
                    headers={"WWW-Authenticate": 'Bearer realm="mgpumanager"'},
                )
        return None

    def _authorized(self, method: bytes, query: bytes, headers: Headers, rule: Token) -> bool:
        assert self._token is not None
        presented = headers.getRawHeaders(b"authorization") or []
        if len(presented) == 1:
            scheme, _, credential = presented[0].partition(b" ")
            return scheme.lower() == b"bearer" and self.is_token(credential.strip())
        if presented or method not in COOKIE_METHODS or rule is Token.BEARER:
            return False
        if rule is Token.PAGE_LINK and self.is_token(query_token(query)):
            return True
        return self.is_token(cookie_token(headers))

    def is_token(self, candidate: bytes | None) -> bool:
        """Whether ``candidate`` is the configured token (compared in constant time)."""
        if self._token is None or candidate is None:
            return False
        return hmac.compare_digest(candidate, self._token)


def query_token(query: bytes) -> bytes | None:
    """The ``token`` a page link carries in its query, if exactly one."""
    values = parse_qs(query.decode("latin-1")).get("token", [])
    return values[0].encode("latin-1") if len(values) == 1 else None


def cookie_token(headers: Headers) -> bytes | None:
    """The token cookie a browser sent, if any."""
    jar: SimpleCookie = SimpleCookie()
    for value in headers.getRawHeaders(b"cookie") or []:
        try:
            jar.load(value.decode("latin-1"))
        except Exception:
            return None
    morsel = jar.get(TOKEN_COOKIE)
    return morsel.value.encode("latin-1") if morsel is not None else None


def token_cookie(token: bytes) -> bytes:
    """
    The ``Set-Cookie`` value the page sends once it was opened with
    ``?token=``: scripts cannot read it, and no other site's page can make
    the browser send it.
    """
    return b"%s=%s; Path=/; HttpOnly; SameSite=Strict" % (TOKEN_COOKIE.encode(), token)
