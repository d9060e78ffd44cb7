"""
Tests for :mod:`mgpumanager.relay.headers`: hop-by-hop headers (and every header a
``Connection`` header names) never cross the proxy, Host and framing are left to the
upstream client, and end-to-end headers cross with every value in order.
"""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from mgpumanager.relay.headers import host_header, relay_response_headers, upstream_headers

HOP_BY_HOP = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"Proxy-Authorization",
    b"Proxy-Authenticate",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
]


def _names(headers: Headers) -> set[bytes]:
    return {name.lower() for name, _ in headers.getAllRawHeaders()}


@pytest.mark.parametrize(
    "name", [*HOP_BY_HOP, b"Host", b"Content-Length", b"Expect", b"proxy-authorization"]
)
def test_hop_by_hop_host_and_framing_headers_are_not_sent_upstream(name: bytes) -> None:
    inbound = Headers({name: [b"something"], b"Content-Type": [b"application/json"]})

    outbound = upstream_headers(inbound)

    assert _names(outbound) == {b"content-type"}


def test_headers_named_by_connection_are_not_sent_upstream() -> None:
    inbound = Headers(
        {
            b"Connection": [b"keep-alive, X-Session ,x-trace", b"X-Other"],
            b"X-Session": [b"secret"],
            b"X-Trace": [b"1"],
            b"X-Other": [b"2"],
            b"X-Kept": [b"3"],
        }
    )

    assert _names(upstream_headers(inbound)) == {b"x-kept"}


def test_end_to_end_headers_go_upstream_with_every_value_in_order() -> None:
    inbound = Headers(
        {
            b"Content-Type": [b"audio/wav"],
            b"Accept": [b"application/json", b"text/plain"],
            b"Accept-Encoding": [b"gzip"],
            b"Authorization": [b"Bearer abc"],
            b"X-Request-Id": [b"r1"],
        }
    )
    inbound.addRawHeader(b"X-Tag", b"first")
    inbound.addRawHeader(b"X-Tag", b"second")
    inbound.addRawHeader(b"X-Tag", b"third")

    outbound = upstream_headers(inbound)

    assert outbound.getRawHeaders(b"x-tag") == [b"first", b"second", b"third"]
    assert outbound.getRawHeaders(b"accept") == [b"application/json", b"text/plain"]
    assert outbound.getRawHeaders(b"content-type") == [b"audio/wav"]
    assert outbound.getRawHeaders(b"accept-encoding") == [b"gzip"]
    assert outbound.getRawHeaders(b"authorization") == [b"Bearer abc"]
    assert outbound.getRawHeaders(b"x-request-id") == [b"r1"]
    # The inbound message is left alone.
    assert inbound.getRawHeaders(b"x-tag") == [b"first", b"second", b"third"]


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_hop_by_hop_response_headers_are_not_relayed(name: bytes) -> None:
    upstream = Headers({name: [b"whatever"], b"Content-Type": [b"application/x-ndjson"]})
    outbound = Headers()

    relay_response_headers(upstream, outbound)

    assert _names(outbound) == {b"content-type"}


def test_response_relay_keeps_length_encoding_and_repeated_values() -> None:
    upstream = Headers(
        {
            b"Content-Length": [b"1234"],
            b"Content-Encoding": [b"gzip"],
            b"Content-Type": [b"audio/wav"],
            b"Set-Cookie": [b"a=1", b"b=2"],
            b"Keep-Alive": [b"timeout=5"],
        }
    )
    outbound = Headers({b"Server": [b"mgpumanager"]})

    relay_response_headers(upstream, outbound)

    assert outbound.getRawHeaders(b"content-length") == [b"1234"]
    assert outbound.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert outbound.getRawHeaders(b"content-type") == [b"audio/wav"]
    assert outbound.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
    assert outbound.getRawHeaders(b"server") == [b"mgpumanager"]
    assert not outbound.hasHeader(b"keep-alive")


def test_response_relay_drops_what_the_separate_connection_header_names() -> None:
    # Twisted's client keeps the response's Connection header apart from
    # response.headers; the proxy hands it over as ``connection``.
    upstream = Headers(
        {b"X-Hop": [b"1"], b"X-Also-Hop": [b"2"], b"X-Kept": [b"3"]}
    )
    outbound = Headers()

    relay_response_headers(upstream, outbound, [b"X-Hop, close", b"x-also-hop"])

    assert _names(outbound) == {b"x-kept"}


def test_the_daemons_token_cookie_never_goes_upstream() -> None:
    inbound = Headers(
        {
            b"cookie": [b"theme=dark; mgpumanager_token=s3cret; lang=en",
                        b"mgpumanager_token=s3cret"],
            b"accept": [b"*/*"],
        }
    )

    outbound = upstream_headers(inbound)

    assert outbound.getRawHeaders(b"cookie") == [b"theme=dark; lang=en"]
    only_ours = upstream_headers(Headers({b"cookie": [b"mgpumanager_token=s3cret"]}))
    assert not only_ours.hasHeader(b"cookie")


@pytest.mark.parametrize(("url", "host"), [
    ("http://127.0.0.1:11434", b"127.0.0.1:11434"),
    ("http://gpu-box", b"gpu-box"),
    ("http://gpu-box:80", b"gpu-box"),
    ("https://gpu-box:443", b"gpu-box"),
    ("https://gpu-box:8443", b"gpu-box:8443"),
    ("http://[::1]:8188", b"[::1]:8188"),
])
def test_the_consumer_host_is_written_as_rfc_9110_spells_it(url: str, host: bytes) -> None:
    assert host_header(url) == host
