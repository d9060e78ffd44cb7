"""
Tests for :mod:`mgpumanager.web.site` through a real twisted.web ``HTTPChannel`` over
a ``StringTransport``: the body limit is enforced before a body is read (from
``Content-Length``, or as a chunked body arrives), per request path, with a raw
JSON 413 and a closed connection, and no "100 Continue" invitation; a
``Transfer-Encoding`` other than plain ``chunked`` is a 400; nothing refused ever
reaches a resource; and form uploads are never parsed into ``request.args``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request

from mgpumanager.web.site import ManagerSite

MiB = 2**20


@attrs.define
class Call:
    method: bytes
    path: bytes
    body: bytes
    args: dict[bytes, list[bytes]]


class Recorder(Resource):
    """A leaf resource that records each request it is given and answers "ok"."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        assert request.method is not None and request.path is not None
        self.calls.append(Call(request.method, request.path, body, dict(request.args)))
        return b"ok"


@attrs.define
class Server:
    recorder: Recorder
    transport: StringTransport
    channel: Any
    limits_asked: list[bytes]

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def output(self) -> bytes:
        value: bytes = self.transport.value()
        return value


def serve(limit: int | Callable[[bytes], int] = 1 * MiB) -> Server:
    """A ``ManagerSite`` over a recording resource, connected to a fresh transport."""
    asked: list[bytes] = []

    def body_limit_for(method: bytes, path: bytes) -> int:
        asked.append(path)
        return limit(path) if callable(limit) else limit

    recorder = Recorder()
    site = ManagerSite(recorder, body_limit_for)
    site.reactor = Clock()  # the channel's idle timeout, never the global reactor
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return Server(recorder, transport, channel, asked)


def request_head(
    path: bytes = b"/v1/stt",
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: bytes = b"POST",
) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: localhost:8770"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunked(*pieces: bytes) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return encoded + b"0\r\n\r\n"


def raw_response(output: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The status line, the headers (lower-case names) and the body of one answer."""
    head, _, body = output.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_refused(server: Server, status: int, code: str) -> dict[str, Any]:
    """The raw JSON refusal; the connection is closing and no resource was called."""
    status_line, headers, body = raw_response(server.output)
    assert status_line.startswith(b"HTTP/1.1 %d " % status)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body)
    document: dict[str, Any] = json.loads(body)
    assert document["error"] == code
    assert document["retryable"] is False
    assert server.transport.disconnecting
    assert server.recorder.calls == []
    return document


# --- Content-Length --------------------------------------------------------------


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read() -> None:
    server = serve(1 * MiB)

    server.send(request_head(headers=[(b"Content-Length", b"%d" % (MiB + 1))]))

    document = assert_refused(server, 413, "body_too_large")
    assert "1 MiB" in document["message"]
    assert server.output.count(b"HTTP/1.1") == 1


def test_the_body_of_a_refused_request_is_dropped_and_never_reaches_the_resource() -> None:
    server = serve(10)

    server.send(request_head(headers=[(b"Content-Length", b"11")]) + b"hello world")
    # A request pipelined behind the refused one is not served either.
    server.send(request_head(b"/v1/tts", [(b"Content-Length", b"2")]) + b"hi")

    assert_refused(server, 413, "body_too_large")
    assert server.output.count(b"HTTP/1.1") == 1


def test_a_body_of_exactly_the_limit_is_accepted() -> None:
    server = serve(10)

    server.send(request_head(headers=[(b"Content-Length", b"10")]) + b"0123456789")

    assert server.output.startswith(b"HTTP/1.1 200 ")
    assert [call.body for call in server.recorder.calls] == [b"0123456789"]


def test_a_body_under_the_limit_reaches_the_resource_intact() -> None:
    body = bytes(range(256)) * 8
    server = serve(1 * MiB)

    server.send(request_head(b"/v1/stt?lang=en", [(b"Content-Length", b"%d" % len(body))]))
    server.send(body[:100])
    assert server.recorder.calls == []
    server.send(body[100:])

    assert server.output.startswith(b"HTTP/1.1 200 ")
    assert not server.transport.disconnecting
    [call] = server.recorder.calls
    assert (call.method, call.path, call.body) == (b"POST", b"/v1/stt", body)


def test_the_limit_is_chosen_for_the_request_path() -> None:
    def limit(path: bytes) -> int:
        return 4 if path.startswith(b"/v1/tts") else 100

    small = serve(limit)
    small.send(request_head(b"/v1/tts?voice=x", [(b"Content-Length", b"5")]) + b"hello")
    assert small.limits_asked == [b"/v1/tts?voice=x"]
    assert_refused(small, 413, "body_too_large")

    large = serve(limit)
    large.send(request_head(b"/v1/llm", [(b"Content-Length", b"5")]) + b"hello")
    assert large.limits_asked == [b"/v1/llm"]
    assert [call.body for call in large.recorder.calls] == [b"hello"]


def test_a_request_without_a_body_passes() -> None:
    server = serve(10)

    server.send(request_head(b"/v1/status", method=b"GET"))

    assert server.output.startswith(b"HTTP/1.1 200 ")
    assert [call.method for call in server.recorder.calls] == [b"GET"]


# --- chunked ---------------------------------------------------------------------


def test_a_chunked_body_crossing_the_limit_midway_is_refused() -> None:
    server = serve(10)

    server.send(request_head(headers=[(b"Transfer-Encoding", b"chunked")]))
    server.send(b"6\r\nhello \r\n")
    assert server.output == b""
    server.send(b"6\r\nworld!\r\n")
    assert_refused(server, 413, "body_too_large")
    server.send(b"4\r\nmore\r\n0\r\n\r\n")

    assert server.output.count(b"HTTP/1.1") == 1
    assert server.recorder.calls == []


def test_a_chunked_body_within_the_limit_reaches_the_resource() -> None:
    server = serve(10)

    server.send(request_head(headers=[(b"Transfer-Encoding", b"chunked")]))
    server.send(chunked(b"hello", b"world"))

    assert server.output.startswith(b"HTTP/1.1 200 ")
    assert [call.body for call in server.recorder.calls] == [b"helloworld"]


# --- Expect: 100-continue --------------------------------------------------------


def test_no_100_continue_is_sent_for_a_body_over_the_limit() -> None:
    server = serve(10)

    server.send(
        request_head(headers=[(b"Expect", b"100-continue"), (b"Content-Length", b"11")])
    )

    assert b"100 Continue" not in server.output
    assert_refused(server, 413, "body_too_large")


def test_100_continue_is_still_sent_for_a_body_within_the_limit() -> None:
    server = serve(10)

    server.send(
        request_head(headers=[(b"Expect", b"100-continue"), (b"Content-Length", b"5")])
    )
    assert server.output == b"HTTP/1.1 100 Continue\r\n\r\n"
    server.send(b"hello")

    assert [call.body for call in server.recorder.calls] == [b"hello"]


# --- Transfer-Encoding -----------------------------------------------------------

ODD_CODINGS = {
    "identity": [(b"Transfer-Encoding", b"identity"), (b"Content-Length", b"3")],
    "gzip": [(b"Transfer-Encoding", b"gzip")],
    "chunked-identity": [(b"Transfer-Encoding", b"chunked, identity")],
    "two-chunked": [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
    "identity-then-chunked": [
        (b"Transfer-Encoding", b"identity"),
        (b"Transfer-Encoding", b"chunked"),
    ],
}

#: Refused by twisted.web's own parser before ``LimitedRequest`` sees the
#: headers: the answer is a bare "400 Bad Request" with no JSON body.
REFUSED_BY_TWISTED = {"gzip", "chunked-identity", "two-chunked"}


@pytest.mark.parametrize("coding", list(ODD_CODINGS))
def test_an_odd_transfer_encoding_is_a_400_and_never_reaches_the_resource(coding: str) -> None:
    server = serve(1 * MiB)

    server.send(request_head(headers=ODD_CODINGS[coding]) + chunked(b"abc"))

    assert server.output.startswith(b"HTTP/1.1 400 ")
    assert server.output.count(b"HTTP/1.1") == 1
    assert server.transport.disconnecting
    assert server.recorder.calls == []


@pytest.mark.parametrize(
    # The others never reach us: twisted.web's parser answers a bare 400 itself
    # (checked above), as it does for any HTTP it cannot parse.
    "coding",
    [coding for coding in ODD_CODINGS if coding not in REFUSED_BY_TWISTED],
)
def test_an_odd_transfer_encoding_is_answered_with_the_json_envelope(coding: str) -> None:
    server = serve(1 * MiB)

    server.send(request_head(headers=ODD_CODINGS[coding]) + chunked(b"abc"))

    document = assert_refused(server, 400, "bad_request")
    assert "Transfer-Encoding" in document["message"]


# --- forms -----------------------------------------------------------------------


def test_a_multipart_upload_is_not_parsed_into_request_args() -> None:
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
        b"RIFF....\r\n"
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="language"\r\n\r\n'
        b"en\r\n"
        b"--XyZ--\r\n"
    )
    server = serve(1 * MiB)

    server.send(
        request_head(
            b"/v1/stt?task=transcribe",
            [
                (b"Content-Type", b"multipart/form-data; boundary=XyZ"),
                (b"Content-Length", b"%d" % len(body)),
            ],
        )
        + body
    )

    [call] = server.recorder.calls
    assert call.args == {b"task": [b"transcribe"]}
    assert call.body == body


def test_an_urlencoded_form_is_not_parsed_into_request_args() -> None:
    body = b"a=1&b=2"
    server = serve(1 * MiB)

    server.send(
        request_head(
            b"/v1/llm",
            [
                (b"Content-Type", b"application/x-www-form-urlencoded"),
                (b"Content-Length", b"%d" % len(body)),
            ],
        )
        + body
    )

    [call] = server.recorder.calls
    assert call.args == {}
    assert call.body == body


def test_each_answered_request_is_one_access_line_in_plain_text() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = serve(1 * MiB)
        server.send(request_head(b"/v1/llm?stream=%E2%9C%93", [(b"Content-Length", b"2")]) + b"{}")
    finally:
        globalLogPublisher.removeObserver(events.append)

    [access] = [event for event in events if event["log_namespace"] == "mgpumanager.access"]
    # StringTransport reports its peer as 192.168.1.1.
    assert formatEvent(access) == "192.168.1.1 POST /v1/llm?stream=%E2%9C%93 200 2"
    assert (access["method"], access["code"], access["length"]) == ("POST", 200, 2)
    assert access["log_level"] == LogLevel.info
    assert json.loads(eventAsJSON(access))["line"] == formatEvent(access)
