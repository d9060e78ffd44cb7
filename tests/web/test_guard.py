"""
Tests for :mod:`mgpumanager.web.guard`: which ``Host`` names count as loopback, and
the refusals :meth:`Guard.refusal` makes before any route runs (a missing or
doubled Host, a foreign Host on loopback, a cross-origin POST, a missing or
wrong bearer token), each the documented :class:`ApiError`.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import pytest
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from mgpumanager.common.errors import ApiError
from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.web.api import main_port_routes
from mgpumanager.web.guard import TOKEN_COOKIE, Guard, is_loopback_host, token_cookie
from mgpumanager.web.ports import ConsumerPort
from mgpumanager.web.routing import RouteTable

TOKEN = b"s3cret-token-0123456789"

CONFIG = parse_config(
    {
        "allowed_origins": ["http://localhost:3000", "https://app.example/"],
        "consumers": {
            "voice": {"url": "http://127.0.0.1:9001", "health": {"path": "/health"}},
        },
    }
)
WITH_TOKEN = attrs.evolve(CONFIG, auth_token=TOKEN)


def make_request(
    method: bytes = b"GET",
    path: bytes = b"/v1/status",
    headers: dict[bytes, list[bytes]] | None = None,
    host: bytes | None = b"localhost:8770",
) -> Request:
    """A ``DummyRequest`` with a Host header (unless ``host`` is None) and ``headers``."""
    request: Any = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    request.path = path
    request.uri = path
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    for name, values in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, values)
    return cast(Request, request)


def check(guard: Guard, request: Request) -> None:
    """Raise the refusal the guard gives a whole request, as the site would."""
    refused = guard.refusal(request.method, request.path, request.requestHeaders)
    if refused is not None:
        raise refused


def refusal(guard: Guard, request: Request) -> ApiError:
    with pytest.raises(ApiError) as info:
        check(guard, request)
    return info.value


def guard(config: Config = CONFIG, loopback: bool = True) -> Guard:
    """The main port's guard, over the main port's route declarations."""
    return Guard(config, loopback, main_port_routes(config))


# --- is_loopback_host ----------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        b"localhost",
        b"LOCALHOST",
        b"localhost:8770",
        b"foo.localhost",
        b"localhost.",
        b"127.0.0.1",
        b"127.1.2.3:80",
        b"[::1]",
        b"[::1]:8770",
        b"::1",
    ],
)
def test_loopback_host_names_are_accepted(host: bytes) -> None:
    assert is_loopback_host(host) is True


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example",
        b"evil.example:8770",
        b"192.168.1.1",
        b"0.0.0.0",
        b"[::ffff:192.168.0.1]",
        b"localhost.evil.example",
        b"localhost.evil.example:8770",
        "l\u043ecalhost".encode(),  # a Cyrillic "o": not ASCII at all
        b"127.0.0.1.evil.example",
        b"",
    ],
)
def test_other_host_names_are_refused(host: bytes) -> None:
    assert is_loopback_host(host) is False


# --- Host ------------------------------------------------------------------------


def test_a_request_without_host_is_a_bad_request() -> None:
    error = refusal(guard(), make_request(host=None))

    assert error.kind.code == "bad_request"
    assert error.status == 400


def test_a_request_with_two_host_headers_is_a_bad_request() -> None:
    request = make_request(headers={b"host": [b"localhost", b"localhost"]})

    error = refusal(guard(), request)

    assert error.kind.code == "bad_request"
    assert error.status == 400


def test_a_blank_host_is_a_bad_request() -> None:
    assert refusal(guard(), make_request(host=b"  ")).status == 400


def test_a_host_is_required_even_when_not_on_loopback() -> None:
    assert refusal(guard(loopback=False), make_request(host=None)).status == 400


@pytest.mark.parametrize("host", [b"evil.example", b"192.168.1.1:8770", b"rebound.example:8770"])
def test_a_foreign_host_on_loopback_is_forbidden(host: bytes) -> None:
    error = refusal(guard(), make_request(host=host))

    assert error.kind.code == "forbidden"
    assert error.status == 403
    assert error.kind.retryable is False


@pytest.mark.parametrize("host", [b"localhost:8770", b"127.0.0.1:8770", b"[::1]:8770"])
def test_a_loopback_host_on_loopback_passes(host: bytes) -> None:
    check(guard(), make_request(host=host))


def test_a_foreign_host_is_allowed_when_not_listening_on_loopback() -> None:
    check(guard(loopback=False), make_request(host=b"gpu-box.lan:8770"))


# --- Origin ----------------------------------------------------------------------


def test_a_post_with_a_foreign_origin_is_forbidden() -> None:
    request = make_request(
        b"POST", b"/v1/tts", headers={b"origin": [b"https://evil.example"]}
    )

    error = refusal(guard(), request)

    assert error.kind.code == "forbidden"
    assert error.status == 403


def test_a_post_with_a_null_origin_is_forbidden() -> None:
    request = make_request(b"POST", b"/v1/tts", headers={b"origin": [b"null"]})

    assert refusal(guard(), request).status == 403


def test_one_foreign_origin_among_allowed_ones_is_forbidden() -> None:
    origins = [b"http://localhost:3000", b"https://evil.example"]
    request = make_request(b"POST", b"/v1/tts", headers={b"origin": origins})

    assert refusal(guard(), request).status == 403


@pytest.mark.parametrize(
    "origin",
    [
        b"http://localhost:3000",
        b"http://localhost:3000/",
        b"https://app.example",  # configured with a trailing slash
        b"https://app.example/",
    ],
)
def test_a_post_from_an_allowed_origin_passes(origin: bytes) -> None:
    check(guard(), make_request(b"POST", b"/v1/tts", headers={b"origin": [origin]}))


def test_a_post_without_origin_passes() -> None:
    check(guard(), make_request(b"POST", b"/v1/tts"))


def test_a_get_with_any_origin_passes() -> None:
    request = make_request(b"GET", b"/v1/status", headers={b"origin": [b"https://evil.example"]})

    check(guard(), request)


def test_a_foreign_origin_is_refused_even_when_not_on_loopback() -> None:
    request = make_request(
        b"POST", b"/v1/tts", headers={b"origin": [b"https://evil.example"]}, host=b"gpu.lan"
    )

    assert refusal(guard(loopback=False), request).status == 403


# --- bearer token ----------------------------------------------------------------


def test_without_a_configured_token_no_authorization_is_needed() -> None:
    check(guard(), make_request())


def test_with_a_configured_token_it_is_required() -> None:
    with pytest.raises(ApiError) as refused:
        check(guard(WITH_TOKEN), make_request())
    assert refused.value.kind.code == "unauthorized"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        [b"Bearer wrong-token-0123456789"],
        [b"Bearer " + TOKEN[:-1]],
        [b"Bearer " + TOKEN + b"x"],
        [b"Bearer"],
        [b"Bearer "],
        [b"Basic " + TOKEN],
        [b"Token " + TOKEN],
        [TOKEN],
        [b"Bearer " + TOKEN, b"Bearer " + TOKEN],
    ],
    ids=[
        "none",
        "wrong",
        "prefix",
        "longer",
        "scheme-only",
        "empty",
        "basic",
        "other-scheme",
        "bare",
        "duplicated",
    ],
)
def test_a_missing_or_wrong_token_is_unauthorized(authorization: list[bytes] | None) -> None:
    headers = {b"authorization": authorization} if authorization is not None else {}
    request = make_request(headers=headers)

    error = refusal(guard(WITH_TOKEN), request)

    assert error.kind.code == "unauthorized"
    assert error.status == 401
    assert error.headers["WWW-Authenticate"].startswith("Bearer ")
    assert TOKEN.decode() not in error.message


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer " + TOKEN, b"bearer " + TOKEN, b"BEARER " + TOKEN, b"Bearer " + TOKEN + b" "],
)
def test_the_right_token_passes(authorization: bytes) -> None:
    check(guard(WITH_TOKEN), make_request(headers={b"authorization": [authorization]}))


@pytest.mark.parametrize("method,path", [(b"POST", b"/v1/tts"), (b"GET", b"/v1/status")])
def test_every_route_but_healthz_needs_the_token(method: bytes, path: bytes) -> None:
    assert refusal(guard(WITH_TOKEN), make_request(method, path)).status == 401


def test_healthz_is_open_without_a_token() -> None:
    check(guard(WITH_TOKEN), make_request(b"GET", b"/healthz"))


def test_healthz_still_needs_a_loopback_host() -> None:
    request = make_request(b"GET", b"/healthz", host=b"evil.example")

    assert refusal(guard(WITH_TOKEN), request).status == 403


def test_the_host_is_checked_before_the_token() -> None:
    """A rebound page learns nothing about whether a token is configured."""
    request = make_request(host=b"evil.example")

    assert refusal(guard(WITH_TOKEN), request).status == 403


# --- Part 2: same origin, every unsafe method, the page's cookie ----------------------


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_every_unsafe_method_with_a_foreign_origin_is_forbidden(method: bytes) -> None:
    request = make_request(method, b"/upstream/comfyui/queue",
                           headers={b"origin": [b"https://evil.example"]})

    assert refusal(guard(), request).status == 403


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS"])
def test_a_safe_method_with_a_foreign_origin_passes(method: bytes) -> None:
    check(guard(), make_request(method, headers={b"origin": [b"https://evil.example"]}))


@pytest.mark.parametrize("origin", [b"http://localhost:8770", b"http://LOCALHOST:8770/"])
def test_a_page_served_by_the_same_host_may_post(origin: bytes) -> None:
    check(guard(), make_request(b"POST", b"/upstream/comfyui/prompt",
                                headers={b"origin": [origin]}))


@pytest.mark.parametrize(
    "origin", [b"https://localhost:8770", b"http://localhost:8771", b"http://localhost"]
)
def test_another_scheme_or_port_is_not_the_same_origin(origin: bytes) -> None:
    request = make_request(b"POST", b"/v1/tts", headers={b"origin": [origin]})

    assert refusal(guard(), request).status == 403


def cookie(value: bytes) -> dict[bytes, list[bytes]]:
    return {b"cookie": [b"theme=dark; " + TOKEN_COOKIE.encode() + b"=" + value]}


@pytest.mark.parametrize("path", [b"/", b"/v1/status", b"/v1/events"])
def test_the_token_cookie_opens_the_read_only_page_routes(path: bytes) -> None:
    check(guard(WITH_TOKEN), make_request(b"GET", path, headers=cookie(TOKEN)))


@pytest.mark.parametrize(
    "method,path",
    [(b"POST", b"/v1/tts"), (b"GET", b"/v1/plan/llm"), (b"GET", b"/upstream/ollama/api/tags"),
     (b"POST", b"/v1/status")],
)
def test_the_token_cookie_opens_nothing_else(method: bytes, path: bytes) -> None:
    request = make_request(method, path, headers=cookie(TOKEN))

    assert refusal(guard(WITH_TOKEN), request).status == 401


def test_a_wrong_cookie_is_unauthorized() -> None:
    request = make_request(b"GET", b"/v1/status", headers=cookie(b"guess"))

    assert refusal(guard(WITH_TOKEN), request).status == 401


def test_the_page_takes_the_token_once_in_its_query() -> None:
    target = b"/?token=" + TOKEN
    g = guard(WITH_TOKEN)
    headers = make_request(b"GET", b"/").requestHeaders

    assert g.refusal(b"GET", target, headers) is None
    refused = g.refusal(b"GET", b"/v1/status?token=" + TOKEN, headers)
    assert refused is not None and refused.status == 401, "only the page takes ?token="
    wrong = g.refusal(b"GET", b"/?token=guess", headers)
    assert wrong is not None and wrong.status == 401


def test_the_token_cookie_is_http_only_and_same_site_strict() -> None:
    value = token_cookie(TOKEN)
    assert value.startswith(TOKEN_COOKIE.encode() + b"=" + TOKEN + b";")
    attributes = {part.strip().lower() for part in value.split(b";")[1:]}
    assert {b"httponly", b"samesite=strict", b"path=/"} <= attributes


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (b"/", cookie(TOKEN)),
        (b"/v1/status", cookie(TOKEN)),
        (b"/?token=" + TOKEN, {}),
        (b"/healthz", {}),
    ],
)
def test_on_a_consumers_port_only_the_bearer_token_opens_a_path(
    path: bytes, headers: dict[bytes, list[bytes]]
) -> None:
    routes = RouteTable([ConsumerPort], WITH_TOKEN, {"consumer": "voice"})
    port_guard = Guard(WITH_TOKEN, True, routes)
    request = make_request(b"GET", path, headers=headers)

    assert refusal(port_guard, request).status == 401
    bearer = make_request(b"GET", path, headers={b"authorization": [b"Bearer " + TOKEN]})
    check(port_guard, bearer)
