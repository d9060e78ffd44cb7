"""
Malformed and ambiguous HTTP/1.x, sent as raw bytes to the real daemon.

The daemon is the last HTTP/1 parser in front of the consumers: it re-frames
every request it forwards.  So the defence against request smuggling and
header injection is simple to state and to test: a request whose framing or
syntax is in doubt gets a 400 (or the connection is closed without a word),
and nothing of it, above all no second request hidden in its body, reaches a
consumer.  Each case sends bytes no well-behaved client would, then checks
the answer and every request the scripted consumers recorded.

Observed with Twisted 26.10's HTTPChannel (the daemon's parser): nearly
every case is answered ``HTTP/1.1 400 Bad Request`` and the connection
closed.  An over-long request line is closed without an answer; a chunk size
beyond 64 bits is taken at its value, so the daemon waits for data and the
client hangs up.  Two cases are expected failures (strict): ``Transfer-Encoding:
identity`` is ignored (a smuggled request reaches the consumer), and obsolete
line folding is unfolded and forwarded rather than refused.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.rawhttp import exchange, status_of
from tests.stack import ScriptedStack, start_stack
from tests.upstream import Seen

HOST = b"Host: 127.0.0.1\r\n"

#: What a desynchronised parser would take for a second request.
SMUGGLED = (
    b"POST /v1/tts?do=smuggled HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\n\r\n"
)

#: A well-formed chunked body: "hello".
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


Stack = ScriptedStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    built = start_stack(
        tmp_path_factory.mktemp("raw-protocol"), config={"limits": {"max_body_mib": 1}}
    )
    yield built
    assert built.stop() == 0, built.daemon.log()


# Helpers


def mark(stack: Stack) -> dict[str, int]:
    """How many requests each consumer has received so far."""
    return {name: len(upstream.seen) for name, upstream in stack.upstreams.items()}


def forwarded(stack: Stack, since: dict[str, int]) -> list[Seen]:
    """The requests consumers received after ``since``, less health probes and barriers."""
    return [
        seen
        for name, upstream in stack.upstreams.items()
        for seen in upstream.seen[since[name]:]
        if seen.path != "/health" and not seen.query.startswith("barrier=")
    ]


def post(path: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A request head: ``POST path``, Host, then ``headers`` (each without CRLF)."""
    return (b"POST " + path + b" " + version + b"\r\n" + HOST
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n")


async def barrier(stack: Stack) -> None:
    """
    One valid job through the GPU lock, whose queue is first in, first out:
    once it is answered, any job the daemon had parsed before it (a smuggled
    one included) has reached its consumer too.
    """
    answer = await deferToThread(
        exchange, stack.daemon.port,
        post(b"/v1/tts?barrier=1", b"Content-Length: 0", b"Connection: close"),
    )
    assert status_of(answer) == 200, answer[:300]


def smuggled(seen: list[Seen]) -> list[Seen]:
    return [one for one in seen if "do=smuggled" in one.query]


async def refused(
    stack: Stack, data: bytes, allowed: tuple[int, ...] = (400,), wait: float = 2.0
) -> bytes:
    """
    Send ``data`` on a fresh connection; the answer must be one of ``allowed``
    or nothing at all (the connection closed), and no consumer may see a
    request because of it.
    """
    before = mark(stack)
    answer = await deferToThread(exchange, stack.daemon.port, data, wait)
    await barrier(stack)
    reached = forwarded(stack, before)
    assert smuggled(reached) == [], "a smuggled request reached a consumer"
    assert reached == [], "the hostile request reached a consumer"
    if answer:
        assert status_of(answer) in allowed, answer[:300]
        assert answer.count(b"HTTP/1.") == 1, answer[:300]
    return answer


def split_responses(stream: bytes) -> list[tuple[int, bytes]]:
    """Status and body of each response in a pipelined answer (Content-Length framed)."""
    responses = []
    while stream:
        head, separator, rest = stream.partition(b"\r\n\r\n")
        assert separator, stream[:300]
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        assert b"transfer-encoding" not in fields, head
        length = int(fields[b"content-length"])
        responses.append((int(lines[0].split(b" ")[1]), rest[:length]))
        stream = rest[length:]
    return responses


# Conflicting or repeated framing


@pytest_twisted.ensureDeferred
async def test_two_different_content_lengths(stack: Stack) -> None:
    """
    CL.CL smuggling: a front end that takes the first length and a back end
    that takes the last split the stream at different places.
    """
    await refused(stack, post(b"/v1/tts", b"Content-Length: 5", b"Content-Length: 40")
                  + b"hello" + SMUGGLED[:35])


@pytest_twisted.ensureDeferred
async def test_two_identical_content_lengths(stack: Stack) -> None:
    """
    Repeated identical Content-Length: RFC 9112 section 6.3 lets a recipient
    either reject it or collapse it to one value.  Twisted rejects any second
    framing header, equal or not (observed: 400).  Whatever it does, the
    consumer must never be sent two lengths.
    """
    before = mark(stack)
    data = post(b"/v1/tts?case=dup-cl", b"Content-Length: 5", b"Content-Length: 5") + b"hello"
    answer = await deferToThread(exchange, stack.daemon.port, data)
    await barrier(stack)
    reached = forwarded(stack, before)
    if answer and 200 <= status_of(answer) < 300:
        assert len(reached) == 1
        assert reached[0].header("content-length") == ["5"]
        assert reached[0].body_length == 5
    else:
        assert status_of(answer) in (0, 400), answer[:300]
        assert reached == []


@pytest_twisted.ensureDeferred
async def test_a_content_length_list(stack: Stack) -> None:
    """`Content-Length: 5, 5`: the list form of a repeated length, the same ambiguity."""
    await refused(stack, post(b"/v1/tts", b"Content-Length: 5, 5") + b"hello")


@pytest_twisted.ensureDeferred
async def test_content_length_then_chunked(stack: Stack) -> None:
    """
    CL.TE smuggling: the length covers a terminal chunk and a second request;
    a parser that honours Transfer-Encoding ends the body at ``0`` and takes
    ``POST /v1/tts?do=smuggled`` for the next request.
    """
    body = b"0\r\n\r\n" + SMUGGLED
    await refused(stack, post(b"/v1/tts", b"Content-Length: %d" % len(body),
                              b"Transfer-Encoding: chunked") + body)


@pytest_twisted.ensureDeferred
async def test_chunked_then_content_length(stack: Stack) -> None:
    """
    TE.CL smuggling: one chunk holds a whole request; a parser that honours
    the short Content-Length reads only the chunk-size line as the body and
    takes the chunk's data for the next request.
    """
    size_line = b"%x\r\n" % len(SMUGGLED)
    body = size_line + SMUGGLED + b"\r\n0\r\n\r\n"
    await refused(stack, post(b"/v1/tts", b"Transfer-Encoding: chunked",
                              b"Content-Length: %d" % len(size_line)) + body)


@pytest_twisted.ensureDeferred
async def test_chunked_twice(stack: Stack) -> None:
    """Two Transfer-Encoding headers: ``chunked`` applied twice, or one of them ignored."""
    await refused(stack, post(b"/v1/tts", b"Transfer-Encoding: chunked",
                              b"Transfer-Encoding: chunked") + CHUNKED_HELLO)


@pytest.mark.parametrize(
    "coding",
    [b"gzip, chunked", b"chunked, identity", b"chunked, chunked", b"xchunked", b"chunked\x0b"],
)
@pytest.mark.parametrize("with_length", [False, True], ids=["te-only", "te-and-cl"])
@pytest_twisted.ensureDeferred
async def test_obfuscated_transfer_encoding(
    stack: Stack, coding: bytes, with_length: bool
) -> None:
    """
    TE obfuscation: a coding list or a near miss of ``chunked`` that one
    parser reads as chunked and another ignores (falling back to the
    Content-Length, or to no body at all, then reading the rest as the next
    request).  RFC 9112 section 6.1: chunked not last is a 400; an unknown
    coding may be a 501.
    """
    body = b"0\r\n\r\n" + SMUGGLED
    headers = [b"Transfer-Encoding: " + coding]
    if with_length:
        headers.append(b"Content-Length: %d" % len(body))
    await refused(stack, post(b"/v1/tts", *headers) + body, allowed=(400, 501))


@pytest.mark.parametrize("with_length", [False, True], ids=["te-only", "te-and-cl"])
@pytest_twisted.ensureDeferred
async def test_identity_transfer_encoding(stack: Stack, with_length: bool) -> None:
    """
    TE.0 smuggling: ``identity`` is no longer a transfer coding (RFC 9112
    dropped it).  A front end that forwards the bytes after the head as this
    request's body is contradicted by a back end that ignores the header,
    takes the request as bodiless (or framed by its Content-Length) and
    parses the body as a second request, ``POST /v1/tts?do=smuggled``.
    """
    headers = [b"Transfer-Encoding: identity"]
    if with_length:
        headers.append(b"Content-Length: %d" % len(SMUGGLED))
    # A 200 keeps the connection open: a short wait; what reached a consumer decides.
    await refused(stack, post(b"/v1/tts", *headers) + SMUGGLED, wait=0.5)


# Content-Length syntax


@pytest.mark.parametrize("value", [b"+10", b"-1", b"0x10", b"1_0", b"10 10", b"1e1"])
@pytest_twisted.ensureDeferred
async def test_a_content_length_that_is_not_plain_digits(stack: Stack, value: bytes) -> None:
    """
    Length confusion: ``int()``-style parsing accepts signs, ``0x`` or ``_``
    where another parser stops or fails; only ``1*DIGIT`` is a length.
    """
    await refused(stack, post(b"/v1/tts", b"Content-Length: " + value) + b"0123456789" * 2)


# Chunked body syntax


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"5;ext\x01\r\nhello\r\n0\r\n\r\n", id="control-char-in-extension"),
        pytest.param(b"5;a\nb\r\nhello\r\n0\r\n\r\n", id="bare-lf-in-extension"),
        pytest.param(b"5;a\x00\r\nhello\r\n0\r\n\r\n", id="nul-in-extension"),
        pytest.param(b"5g\r\nhello\r\n0\r\n\r\n", id="non-hex-digit"),
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="no-hex-digit"),
        pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", id="leading-plus"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="leading-minus"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="0x-prefix"),
        pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty-size"),
        pytest.param(b"0" * 2000 + b"5\r\nhello\r\n0\r\n\r\n", id="oversized-size-line"),
        pytest.param(b"5;" + b"x" * 2000 + b"\r\nhello\r\n0\r\n\r\n",
                     id="oversized-extension"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED, id="data-longer-than-size"),
        pytest.param(b"5\nhello\n0\n\n" + SMUGGLED, id="bare-lf-line-ends"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_chunk(stack: Stack, body: bytes) -> None:
    """
    Chunk-size desync: a size line that one parser reads leniently (signs,
    prefixes, junk after the digits, bare LF, an extension hiding a line
    break) and another rejects or reads differently puts the two out of step
    on where the body ends.  The size line is also capped (Twisted: 1024 bytes).
    """
    await refused(stack, post(b"/v1/tts", b"Transfer-Encoding: chunked") + body)


@pytest_twisted.ensureDeferred
async def test_a_chunk_size_beyond_64_bits(stack: Stack) -> None:
    """
    Integer overflow: a parser that keeps chunk sizes in 64 bits reads
    ``10000000000000005`` as 5 and takes what follows ``hello`` as a second
    request.  The daemon reads it as the huge number it is and waits for data
    that never comes (observed: no answer; the client hangs up), so nothing
    reaches a consumer.
    """
    body = b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    answer = await refused(stack, post(b"/v1/tts", b"Transfer-Encoding: chunked") + body,
                           allowed=(400, 413), wait=0.5)
    assert status_of(answer) != 200


# Header syntax


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"X-Test: a\x00b", id="nul-in-value"),
        pytest.param(b"X-Te\x00st: a", id="nul-in-name"),
        pytest.param(b"X-Test: a\rTransfer-Encoding: chunked", id="bare-cr-in-value"),
        pytest.param(b"X-Test: a\nTransfer-Encoding: chunked", id="bare-lf-in-value"),
        pytest.param(b"X-Test : a", id="space-before-colon"),
        pytest.param(b"Transfer-Encoding : chunked", id="space-before-colon-te"),
        pytest.param(b"Content-Length\t: 5", id="tab-before-colon-cl"),
        pytest.param(b"X Test: a", id="space-in-name"),
        pytest.param(b": a", id="empty-name"),
        pytest.param(b"No-Colon-Here", id="no-colon"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_header(stack: Stack, header: bytes) -> None:
    """
    Header injection: NUL, a bare CR or LF, or whitespace in a name is read
    as a separator by some parsers and as data by others, which smuggles a
    framing header (``Transfer-Encoding : chunked``) past the parser that
    checks framing.  RFC 9112 section 5.1 requires a 400 for whitespace
    before the colon.
    """
    await refused(stack, post(b"/v1/tts", header, b"Content-Length: 5") + b"hello")


@pytest_twisted.ensureDeferred
async def test_obsolete_line_folding(stack: Stack) -> None:
    """
    obs-fold: a header continued on a line starting with whitespace.  A
    parser that does not unfold reads the continuation as a header of its
    own (here ``Transfer-Encoding: chunked``), another joins it to the
    previous value.  RFC 9112 section 5.2 allows either a 400 or unfolding
    into one value (Twisted unfolds); the fold must never reach a consumer
    as a line of its own.
    """
    before = mark(stack)
    data = post(b"/v1/tts", b"X-Test: a", b" Transfer-Encoding: chunked",
                b"Content-Length: 5") + b"hello"
    answer = await deferToThread(exchange, stack.daemon.port, data, 0.5)
    await barrier(stack)
    reached = forwarded(stack, before)
    for seen in reached:
        if seen.header("x-test") != ["a Transfer-Encoding: chunked"] or seen.header(
            "transfer-encoding"
        ):
            pytest.fail(f"the folded header reached the consumer as sent: {seen.headers}")
    if status_of(answer) == 200:
        assert len(reached) == 1  # unfolded and forwarded once, as one header
    else:
        assert status_of(answer) in (0, 400), answer[:300]
        assert reached == []


@pytest_twisted.ensureDeferred
async def test_folding_cannot_make_a_framing_header(stack: Stack) -> None:
    """
    obs-fold on a framing header: ``Transfer-Encoding:`` with its value on a
    continuation line.  Unfolded it is ``chunked`` next to a Content-Length,
    a conflict; read without unfolding it has no value at all.
    """
    await refused(stack, post(b"/v1/tts", b"Transfer-Encoding:", b" chunked",
                              b"Content-Length: 5") + b"hello")


# Request line


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"POST /v1/tts HTTP/1.2", id="http-1.2"),
        pytest.param(b"POST /v1/tts HTTP/2.0", id="http-2.0"),
        pytest.param(b"POST /v1/tts http/1.1", id="lowercase-http"),
        pytest.param(b"POST /v1/tts HTTP/1.1 extra", id="four-fields"),
        pytest.param(b"POST  /v1/tts HTTP/1.1", id="double-space"),
        pytest.param(b"POST\t/v1/tts\tHTTP/1.1", id="tabs"),
        pytest.param(b"POST /v1/t\x00ts HTTP/1.1", id="nul-in-target"),
        pytest.param(b"POST /v1/tts", id="http-0.9"),
        pytest.param(b"PO(ST /v1/tts HTTP/1.1", id="method-not-a-token"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_request_line(stack: Stack, line: bytes) -> None:
    """
    Version and request-line confusion: a version this parser does not speak
    (HTTP-name is case-sensitive; HTTP/2 has no request line) or fields split
    differently by a lenient parser.  505 would also be acceptable for a
    version; Twisted answers 400.
    """
    data = line + b"\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello"
    await refused(stack, data, allowed=(400, 505))


# Sizes


@pytest_twisted.ensureDeferred
async def test_an_over_long_header_block(stack: Stack) -> None:
    """
    Resource exhaustion, and parsers that cut a long header block and read
    the rest as body: 64 KiB of headers (Twisted's limit is 16 KiB, request
    line included).  Observed: 400, or a reset that loses it.
    """
    headers = [b"X-Filler-%d: %s" % (i, b"a" * 1000) for i in range(64)]
    await refused(stack, post(b"/v1/tts", *headers, b"Content-Length: 0"), allowed=(400, 431))


@pytest_twisted.ensureDeferred
async def test_an_over_long_request_line(stack: Stack) -> None:
    """
    Resource exhaustion on the request line: a 64 KiB target.  Observed: the
    line exceeds Twisted's 16 KiB line limit and the connection is closed
    without an answer.
    """
    data = post(b"/v1/tts?pad=" + b"a" * 65536, b"Content-Length: 0")
    await refused(stack, data, allowed=(400, 414))


# Pipelining


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order_and_sent_once(stack: Stack) -> None:
    """
    Pipelining done right: three requests in one write are three jobs, each
    forwarded exactly once, answered in the order they were sent (a response
    queue that reorders or duplicates answers is a desync of its own).
    """
    before = mark(stack)
    data = (
        post(b"/v1/tts?n=1", b"Content-Length: 3") + b"one"
        + post(b"/v1/llm?n=2", b"Transfer-Encoding: chunked") + b"3\r\ntwo\r\n0\r\n\r\n"
        + post(b"/v1/tts?n=3", b"Content-Length: 5", b"Connection: close") + b"three"
    )
    answer = await deferToThread(exchange, stack.daemon.port, data)
    responses = split_responses(answer)
    assert [status for status, _ in responses] == [200, 200, 200], answer[:600]
    echoed = [json.loads(body) for _, body in responses]
    assert [e["query"] for e in echoed] == ["n=1", "n=2", "n=3"]
    assert [e["body_length"] for e in echoed] == [3, 3, 5]
    reached = forwarded(stack, before)
    assert sorted(seen.query for seen in reached) == ["n=1", "n=2", "n=3"]
    assert all(seen.header("content-length") == [str(seen.body_length)] for seen in reached)


@pytest_twisted.ensureDeferred
async def test_a_bad_request_ends_a_pipeline(stack: Stack) -> None:
    """
    A malformed request in a pipeline: the ones before it are served, it gets
    a 400, and nothing after it is parsed (the parser cannot know where the
    bad request ended, so whatever follows might be its body).
    """
    before = mark(stack)
    data = (
        post(b"/v1/tts?n=1", b"Content-Length: 0")
        + post(b"/v1/tts?n=2", b"Content-Length: 3", b"Transfer-Encoding: chunked")
        + b"0\r\n\r\n" + SMUGGLED
    )
    answer = await deferToThread(exchange, stack.daemon.port, data)
    await barrier(stack)
    assert status_of(answer) == 200, answer[:300]
    second = answer.find(b"HTTP/1.1 ", 1)
    assert second == -1 or status_of(answer[second:]) == 400, answer[:600]
    assert [seen.query for seen in forwarded(stack, before)] == ["n=1"]


# A refusal the client is still sending a body into


def head_then_body(port: int, head: bytes, body: bytes, pause: float) -> tuple[bool, bytes]:
    """
    Send ``head``, wait ``pause`` seconds (the daemon answers meanwhile), then
    the body; return whether the body could be sent whole, and the answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=3.0) as sock:
        sock.sendall(head)
        time.sleep(pause)
        try:
            for start in range(0, len(body), 65536):
                sock.sendall(body[start:start + 65536])
            sent = True
        except OSError:
            sent = False
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
        return sent, received


@pytest_twisted.ensureDeferred
async def test_a_413_reaches_a_client_still_sending_the_body(stack: Stack) -> None:
    # The daemon answers from the head and reads no body, but a client (the
    # Twisted one, say) may go on sending it.  Had the daemon closed at once,
    # that client's next write would meet a reset connection and fail the
    # request before it read the answer; it drains the body instead.
    body = b"a" * (4 * 2**20)
    sent, answer = await deferToThread(
        head_then_body, stack.daemon.port,
        post(b"/v1/tts", b"Content-Length: %d" % len(body)), body, 0.3,
    )
    assert status_of(answer) == 413, answer[:300]
    assert b'"body_too_large"' in answer
    assert sent, "the daemon reset the connection while the client was still sending"
