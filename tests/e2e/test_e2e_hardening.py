"""
The daemon under faults and hostile input, end to end: body limits, upstream
timeouts, admission control, POSTs never sent twice, and who may come in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseFailed

from tests.rawhttp import body_of, closed_after_headers, exchange, status_of
from tests.stack import ScriptedStack, start_stack
from tests.support import sleep
from tests.upstream import ScriptedUpstream

TOKEN = "s3cret-token-for-tests-0123456789"
MIB = 1024 * 1024


Stack = ScriptedStack


def auth(stack: Stack, **headers: str) -> dict[str, str]:
    return {**stack.headers, **headers}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("hardening")
    (workdir / "token").write_text(TOKEN + "\n")
    built = start_stack(
        workdir,
        config={
            "limits": {"max_body_mib": 1},
            "queue": {"max_depth": 3, "max_wait_seconds": 1.5},
            "allowed_origins": ["http://localhost:3000"],
            "auth": {"token_file": "token"},
        },
        consumers={
            "voice": {"max_body_mib": 2},
            "llm": {"timeouts": {"idle_seconds": 0.5}},
            "image": {"timeouts": {"response_seconds": 0.5}},
        },
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    yield built
    assert built.stop() == 0, built.daemon.log()




async def idle(stack: Stack, within: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        response = await treq.get(stack.url("/v1/status"), headers=auth(stack))
        document: dict[str, Any] = await response.json()
        scheduler = document["scheduler"]
        if scheduler["in_flight"] == 0 and scheduler["queue_depth"] == 0:
            return document
        assert time.monotonic() < deadline, scheduler
        await sleep(0.02)


def jobs_seen(upstream: ScriptedUpstream) -> int:
    """Requests other than health probes that reached the consumer."""
    return sum(1 for seen in upstream.seen if seen.path != "/health")


def head(path: str, *lines: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


# Body limits

@pytest_twisted.ensureDeferred
async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    stack: Stack,
) -> None:
    before = jobs_seen(stack.upstreams["image"])
    answer, closed = await deferToThread(
        closed_after_headers, stack.daemon.port,
        head("/v1/image", f"Content-Length: {MIB + 1}", "Content-Type: image/png"),
    )
    assert status_of(answer) == 413
    assert b"application/json" in answer
    envelope = json.loads(body_of(answer))
    assert envelope["error"] == "body_too_large"
    assert envelope["retryable"] is False
    assert closed
    assert jobs_seen(stack.upstreams["image"]) == before


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_growing_past_the_limit_is_cut_off(stack: Stack) -> None:
    before = jobs_seen(stack.upstreams["image"])
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    answer = await deferToThread(
        exchange, stack.daemon.port, head("/v1/image", "Transfer-Encoding: chunked") + body
    )
    assert status_of(answer) == 413
    assert json.loads(body_of(answer))["error"] == "body_too_large"
    assert jobs_seen(stack.upstreams["image"]) == before


@pytest_twisted.ensureDeferred
async def test_a_consumer_may_take_more_than_the_global_limit(stack: Stack) -> None:
    payload = b"a" * (MIB + MIB // 2)
    ok = await treq.post(stack.url("/v1/stt"), data=payload, headers=auth(stack))
    assert (await ok.json())["body_length"] == len(payload)
    refused = await treq.post(stack.url("/v1/image"), data=payload, headers=auth(stack))
    assert refused.code == 413


# Upstream timeouts

@pytest_twisted.ensureDeferred
async def test_no_response_in_time_is_a_504_and_frees_the_gpu(stack: Stack) -> None:
    image = stack.upstreams["image"]
    disconnects = image.disconnects
    started = time.monotonic()
    response = await treq.post(stack.url("/v1/image?ms=3000"), headers=auth(stack))
    assert response.code == 504
    envelope = await response.json()
    assert envelope["error"] == "upstream_timeout"
    assert envelope["consumer"] == "image"
    assert envelope["retryable"] is True
    assert time.monotonic() - started < 2.5
    await idle(stack, within=1.0)
    while image.disconnects == disconnects:
        assert time.monotonic() - started < 2.5, "the upstream request was never cancelled"
        await sleep(0.02)
    follow_up = await treq.post(stack.url("/v1/tts"), headers=auth(stack))
    assert follow_up.code == 200


@pytest_twisted.ensureDeferred
async def test_a_stream_that_goes_silent_is_cut_without_looking_complete(stack: Stack) -> None:
    response = await treq.post(
        stack.url("/v1/llm?do=stream&lines=3&interval=3"), headers=auth(stack)
    )
    assert response.code == 200
    with pytest.raises(ResponseFailed):
        await response.content()
    await idle(stack, within=1.0)


# Admission control

@pytest_twisted.ensureDeferred
async def test_a_full_queue_refuses_with_retry_after(stack: Stack) -> None:
    await idle(stack)
    slow = treq.post(stack.url("/v1/tts?ms=1000"), headers=auth(stack))
    await sleep(0.1)
    queued = [treq.post(stack.url(f"/v1/tts?n={i}"), headers=auth(stack)) for i in range(3)]
    await sleep(0.2)
    refused = await treq.post(stack.url("/v1/tts?n=late"), headers=auth(stack))
    assert refused.code == 503
    assert (await refused.json())["error"] == "queue_full"
    assert int(refused.headers.getRawHeaders(b"retry-after")[0]) >= 1
    answers = await gatherResults([slow, *queued])
    assert [a.code for a in answers] == [200] * 4
    await gatherResults([a.content() for a in answers])
    document = await idle(stack)
    assert document["scheduler"]["refused_queue_full"] >= 1


@pytest_twisted.ensureDeferred
async def test_waiting_too_long_gives_up_with_queue_timeout(stack: Stack) -> None:
    await idle(stack)
    slow = treq.post(stack.url("/v1/tts?ms=2500"), headers=auth(stack))
    await sleep(0.1)
    started = time.monotonic()
    waiting = await treq.post(stack.url("/v1/llm"), headers=auth(stack))
    assert waiting.code == 503
    envelope = await waiting.json()
    assert envelope["error"] == "queue_timeout"
    assert envelope["retryable"] is True
    assert 1.2 < time.monotonic() - started < 2.4
    assert (await slow).code == 200
    document = await idle(stack)
    assert document["scheduler"]["queue_timeouts"] >= 1


# Retries

@pytest_twisted.ensureDeferred
async def test_a_post_is_never_sent_twice(stack: Stack) -> None:
    image = stack.upstreams["image"]
    before = [s for s in image.seen if s.query == "do=close"]
    response = await treq.post(stack.url("/v1/image?do=close"), data=b"once",
                               headers=auth(stack))
    assert response.code == 502
    assert (await response.json())["error"] == "consumer_unreachable"
    after = [s for s in image.seen if s.query == "do=close"]
    assert len(after) == len(before) + 1


# Exposure

@pytest_twisted.ensureDeferred
async def test_foreign_host_names_are_refused_on_loopback(stack: Stack) -> None:
    for host in ("evil.example", "192.168.1.10:8770", "localhost.evil.example"):
        response = await treq.get(stack.url("/v1/status"),
                                  headers=auth(stack, Host=host))
        assert response.code == 403, host
        assert (await response.json())["error"] == "forbidden"
    for host in ("localhost", f"127.0.0.1:{stack.daemon.port}", "[::1]:8770"):
        response = await treq.get(stack.url("/v1/status"), headers=auth(stack, Host=host))
        assert response.code == 200, host
        await response.content()


@pytest_twisted.ensureDeferred
async def test_a_request_without_host_is_a_bad_request(stack: Stack) -> None:
    answer = await deferToThread(
        exchange, stack.daemon.port,
        f"GET /v1/status HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert status_of(answer) == 400
    assert json.loads(body_of(answer))["error"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_cross_origin_posts_are_refused(stack: Stack) -> None:
    before = jobs_seen(stack.upstreams["voice"])
    refused = await treq.post(stack.url("/v1/tts"),
                              headers=auth(stack, Origin="http://evil.example"))
    assert refused.code == 403
    assert jobs_seen(stack.upstreams["voice"]) == before
    allowed = await treq.post(stack.url("/v1/tts"),
                              headers=auth(stack, Origin="http://localhost:3000"))
    assert allowed.code == 200
    await allowed.content()


@pytest_twisted.ensureDeferred
async def test_the_bearer_token_guards_everything_but_healthz(stack: Stack) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = await treq.post(stack.url("/v1/tts"), headers=headers)
        assert response.code == 401
        assert response.headers.getRawHeaders(b"www-authenticate")
        assert (await response.json())["error"] == "unauthorized"
        status = await treq.get(stack.url("/v1/status"), headers=headers)
        assert status.code == 401
        await status.content()
    health = await treq.get(stack.url("/healthz"))
    assert health.code == 200
    await health.content()
    response = await treq.post(stack.url("/v1/tts"), headers=auth(stack))
    assert response.code == 200
    await response.content()
    seen = stack.upstreams["voice"].seen[-1]
    assert seen.header("authorization") == []
    assert TOKEN not in stack.daemon.log()


@pytest_twisted.ensureDeferred
async def test_forwarding_headers_are_set_by_the_daemon(stack: Stack) -> None:
    response = await treq.post(
        stack.url("/v1/tts"),
        headers=auth(stack, **{"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil",
                              "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6"}),
    )
    await response.content()
    seen = stack.upstreams["voice"].seen[-1]
    assert seen.header("x-forwarded-for") == ["127.0.0.1"]
    assert seen.header("x-forwarded-proto") == ["http"]
    assert seen.header("x-forwarded-host") == [f"127.0.0.1:{stack.daemon.port}"]
    assert seen.header("forwarded") == [
        f'for=127.0.0.1;proto=http;host="127.0.0.1:{stack.daemon.port}"'
    ]


@pytest_twisted.ensureDeferred
async def test_a_refused_client_cannot_upload_first(stack: Stack) -> None:
    """The guard answers from the request head: no body is stored for a refusal."""
    head = (b"POST /v1/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 900000\r\nContent-Type: image/png\r\n\r\n")
    answer, closed = await deferToThread(closed_after_headers, stack.daemon.port, head)
    assert status_of(answer) == 401
    assert b"WWW-Authenticate: Bearer" in answer
    assert json.loads(body_of(answer))["error"] == "unauthorized"
    assert closed
