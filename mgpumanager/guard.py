"""
Who may use the daemon: checks made before any route runs.

A daemon on loopback is still reachable from every web page the host's browser
opens: a page can POST to ``127.0.0.1:8770`` (cross-origin), or rebind a DNS
name it controls to 127.0.0.1 and then read our answers (DNS rebinding).  So on
loopback the ``Host`` must be a loopback name, a POST carrying a foreign
``Origin`` is refused, and an optional bearer token closes the rest.
"""

from __future__ import annotations

import hmac
import ipaddress

from twisted.web.http_headers import Headers

from mgpumanager.config import Config
from mgpumanager.errors import BAD_REQUEST, FORBIDDEN, UNAUTHORIZED, ApiError

#: Routes open without the bearer token: liveness checks carry no secrets.
OPEN_PATHS = frozenset({b"/healthz"})


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
    """

    def __init__(self, config: Config, loopback: bool) -> None:
        self._loopback = loopback
        self._origins = {origin.rstrip("/").encode("ascii", "replace")
                         for origin in config.allowed_origins}
        self._token = config.auth_token

    def refusal(self, method: bytes, path: bytes, headers: Headers) -> ApiError | None:
        """
        Why a request with this method, path (no query) and headers is refused,
        or None.  Needs nothing but the head: the site asks before reading any
        body, so a refused client cannot make us store its upload first.
        """
        hosts = headers.getRawHeaders(b"host") or []
        if len(hosts) != 1 or not hosts[0].strip():
            return ApiError(BAD_REQUEST, "exactly one Host header is required")
        if self._loopback and not is_loopback_host(hosts[0]):
            return ApiError(
                FORBIDDEN,
                "this daemon listens on loopback and answers only loopback host names",
            )
        if method.upper() == b"POST":
            for origin in headers.getRawHeaders(b"origin") or []:
                if origin.rstrip(b"/") not in self._origins:
                    return ApiError(FORBIDDEN, "cross-origin requests are not allowed")
        if self._token is not None and path not in OPEN_PATHS:
            if not self._authorized(headers):
                return ApiError(
                    UNAUTHORIZED,
                    "a valid bearer token is required",
                    headers={"WWW-Authenticate": 'Bearer realm="mgpumanager"'},
                )
        return None

    def _authorized(self, headers: Headers) -> bool:
        assert self._token is not None
        presented = headers.getRawHeaders(b"authorization") or []
        if len(presented) != 1:
            return False
        scheme, _, credential = presented[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credential.strip(), self._token)
