"""
End to end: a real ``twistd -n mgpumanager`` in front of scripted consumers,
all on loopback, driven by a real HTTP client.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer, ResponseFailed
from twisted.web.http_headers import Headers

from tests.stack import ScriptedStack, start_stack
from tests.support import sleep, until_idle

Stack = ScriptedStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    built = start_stack(
        tmp_path_factory.mktemp("e2e"),
        config={"gpu": {"total_mib": 24576, "poll_interval_seconds": 0.5}},
        consumers={"llm": {"vram_managed": True}},
    )
    yield built
    assert built.stop() == 0, built.daemon.log()


async def status(stack: Stack) -> dict[str, Any]:
    response = await treq.get(stack.url("/v1/status"))
    assert response.code == 200
    document: dict[str, Any] = await response.json()
    return document


async def wait_until_idle(stack: Stack, within: float = 5.0) -> dict[str, Any]:
    return await until_idle(lambda: status(stack), within)




@pytest_twisted.ensureDeferred
async def test_routes_each_kind_with_query_body_and_headers_intact(stack: Stack) -> None:
    cases = [("tts", "voice", "/api/tts"), ("stt", "voice", "/api/stt"),
             ("llm", "llm", "/api/generate"), ("image", "image", "/prompt")]
    for kind, upstream, path in cases:
        body = json.dumps({"kind": kind, "text": "héllo"}).encode()
        response = await treq.post(
            stack.url(f"/v1/{kind}?a=1&b=%20x&a=2"),
            data=body,
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "X-Request-Id": "abc",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "private",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic c2VjcmV0",
            },
        )
        assert response.code == 200
        echo = await response.json()
        assert echo["upstream"] == upstream
        assert echo["method"] == "POST"
        assert echo["path"] == path
        assert echo["query"] == "a=1&b=%20x&a=2"
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        seen = stack.upstreams[upstream].seen[-1]
        assert seen.header("content-type") == ["application/json"]
        assert seen.header("accept") == ["application/json"]
        assert seen.header("x-request-id") == ["abc"]
        assert seen.header("host") == [f"127.0.0.1:{stack.ports[upstream]}"]
        assert seen.header("content-length") == [str(len(body))]
        for hop in ("connection", "x-hop", "keep-alive", "te", "proxy-authorization",
                    "transfer-encoding"):
            assert seen.header(hop) == [], hop
        # treq asks for gzip by default; the proxy must not add one when the client did not
        assert len(seen.header("accept-encoding")) <= 1


@pytest_twisted.ensureDeferred
async def test_upstream_errors_pass_through_unchanged(stack: Stack) -> None:
    for code in (404, 418, 503):
        direct = await treq.post(
            f"http://127.0.0.1:{stack.ports['image']}/prompt?do=status&code={code}"
        )
        proxied = await treq.post(stack.url(f"/v1/image?do=status&code={code}"))
        assert proxied.code == direct.code == code
        assert proxied.phrase == direct.phrase == b"Custom Phrase"
        assert await proxied.content() == await direct.content()
        for name in (b"content-type", b"set-cookie", b"x-upstream"):
            assert proxied.headers.getRawHeaders(name) == direct.headers.getRawHeaders(name)
        assert proxied.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]


@pytest_twisted.ensureDeferred
async def test_redirects_are_relayed_not_followed(stack: Stack) -> None:
    before = len(stack.upstreams["voice"].seen)
    response = await treq.post(stack.url("/v1/tts?do=redirect"), allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders(b"location") == [b"http://127.0.0.1:1/elsewhere"]
    assert await response.content() == b"moved"
    assert len(stack.upstreams["voice"].seen) == before + 1


@pytest_twisted.ensureDeferred
async def test_compressed_answers_pass_as_sent(stack: Stack) -> None:
    agent = Agent(reactor)  # no decoding on the test side either
    url = stack.url("/v1/llm?do=gzip").encode()
    response = await agent.request(b"POST", url, Headers({b"accept-encoding": [b"gzip"]}))
    body = await treq.content(response)
    assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert response.length == len(body)  # Twisted's client keeps Content-Length here
    assert body[:2] == b"\x1f\x8b"
    # And without Accept-Encoding from the client, none is invented upstream.
    response = await agent.request(b"POST", url, Headers())
    await treq.content(response)
    assert stack.upstreams["llm"].seen[-1].header("accept-encoding") == []


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_response_headers_are_dropped(stack: Stack) -> None:
    response = await treq.post(stack.url("/v1/tts?do=hop"))
    assert await response.content() == b"ok"
    assert response.headers.getRawHeaders(b"x-end-to-end") == [b"kept"]
    for hop in (b"x-private", b"keep-alive", b"proxy-authenticate"):
        assert response.headers.getRawHeaders(hop) is None, hop


@pytest_twisted.ensureDeferred
async def test_concurrent_jobs_never_overlap_at_the_consumers(stack: Stack) -> None:
    await wait_until_idle(stack)
    stack.tracker.max_active = 0
    stack.tracker.intervals.clear()
    kinds = ["tts", "llm", "image", "stt", "tts", "image", "llm", "image", "tts", "llm"]
    responses = await gatherResults(
        [treq.post(stack.url(f"/v1/{kind}?ms=60"), data=b"x") for kind in kinds]
    )
    assert [r.code for r in responses] == [200] * 10
    await gatherResults([r.content() for r in responses])
    assert stack.tracker.max_active == 1
    intervals = sorted(stack.tracker.intervals, key=lambda i: i[1])
    assert len(intervals) == 10
    assert {name for name, _, _ in intervals} == {"voice", "llm", "image"}
    for (_, _, first_end), (_, second_start, _) in itertools.pairwise(intervals):
        assert second_start >= first_end
    document = await wait_until_idle(stack)
    assert document["scheduler"]["last_run_ms"] >= 60


class LineCollector(Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.arrivals: list[tuple[float, bytes]] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.arrivals.append((time.monotonic(), line))

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_ndjson_stream_arrives_line_by_line(stack: Stack) -> None:
    started = time.monotonic()
    response = await treq.post(stack.url("/v1/llm?do=stream&lines=10&interval=0.2"),
                               unbuffered=True)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/x-ndjson"]
    collector = LineCollector()
    response.deliverBody(collector)
    await collector.done
    assert len(collector.arrivals) == 11
    first, last = collector.arrivals[0][0], collector.arrivals[-1][0]
    # The upstream needs ~2 s for all lines; the first must not wait for the last.
    assert first - started < 1.0
    assert last - first > 1.5
    gaps = [b[0] - a[0] for a, b in zip(collector.arrivals, collector.arrivals[1:], strict=False)]
    assert sum(1 for gap in gaps if gap > 0.1) >= 8


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream_and_frees_the_lock(stack: Stack) -> None:
    await wait_until_idle(stack)
    llm = stack.upstreams["llm"]
    disconnects_before = llm.disconnects
    response = await treq.post(stack.url("/v1/llm?do=stream&lines=200&interval=0.05"),
                               unbuffered=True)
    collector = LineCollector()
    response.deliverBody(collector)
    while len(collector.arrivals) < 3:
        await sleep(0.02)
    lines_when_dropped = llm.lines_sent
    gone_at = time.monotonic()
    collector.transport.stopProducing()  # drop the client connection
    while llm.disconnects == disconnects_before:
        assert time.monotonic() - gone_at < 1.0, "consumer never saw the disconnect"
        await sleep(0.02)
    document = await wait_until_idle(stack, within=1.0)
    assert time.monotonic() - gone_at < 1.0
    assert document["scheduler"]["in_flight"] == 0
    assert llm.lines_sent < lines_when_dropped + 40
    follow_up = await treq.post(stack.url("/v1/tts"), data=b"next")
    assert follow_up.code == 200


@pytest.mark.parametrize("chunked", ["0", "1"])
@pytest_twisted.ensureDeferred
async def test_upstream_dying_mid_body_never_looks_complete(stack: Stack, chunked: str) -> None:
    response = await treq.post(stack.url(f"/v1/image?do=die&chunked={chunked}"))
    assert response.code == 200
    with pytest.raises(ResponseFailed):
        await response.content()
    await wait_until_idle(stack, within=2.0)
    follow_up = await treq.post(stack.url("/v1/image"), data=b"next")
    assert follow_up.code == 200


@pytest_twisted.ensureDeferred
async def test_status_answers_while_twenty_jobs_queue(stack: Stack) -> None:
    await wait_until_idle(stack)
    slow = treq.post(stack.url("/v1/image?ms=2500"), data=b"slow")
    slow_answered: list[object] = []
    slow.addBoth(lambda result: slow_answered.append(result) or result)
    await sleep(0.1)
    queued = [treq.post(stack.url(f"/v1/tts?ms=5&n={i}"), data=b"q") for i in range(20)]
    for _ in range(100):
        document = await status(stack)
        if document["scheduler"]["queue_depth"] == 20:
            break
        await sleep(0.02)
    scheduler = document["scheduler"]
    assert scheduler["queue_depth"] == 20
    assert scheduler["in_flight"] == 1
    assert scheduler["oldest_queued"] is not None
    assert not slow_answered, "status must answer while the slow job still holds the GPU"
    health = await treq.get(stack.url("/healthz"))
    assert await health.json() == {"status": "ok"}
    results = await gatherResults([slow, *queued])
    assert [r.code for r in results] == [200] * 21
    await gatherResults([r.content() for r in results])
    document = await wait_until_idle(stack)
    assert document["scheduler"]["oldest_queued"] is None


@pytest_twisted.ensureDeferred
async def test_audio_prefix_refuses_traversal_and_relays_plain_names(stack: Stack) -> None:
    voice = stack.upstreams["voice"]
    agent = Agent(reactor)
    hostile = [b"..%2Fsecret", b"%2e%2e", b"..", b".", b"", b"a%2Fb", b"a%5Cb", b"a%00b",
               b"a%0Ab", b"a%252Fb", b"a\\b", b"%2E", b"sub/..%2F..%2Fadmin"]
    before = len(voice.seen)
    for name in hostile:
        response = await agent.request(b"GET", stack.url("/api/audio/").encode() + name)
        body = await treq.content(response)
        assert response.code in (400, 404), name
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"], name
        assert json.loads(body)["error"] in ("bad_request", "not_found"), name
    assert len(voice.seen) == before, [s.path for s in voice.seen[before:]]
    response = await agent.request(b"GET", stack.url("/api/audio/clip%201.wav?v=2").encode())
    await treq.content(response)
    assert voice.seen[-1].method == "GET"
    assert voice.seen[-1].path == "/api/audio/clip%201.wav"
    assert voice.seen[-1].query == "v=2"


@pytest_twisted.ensureDeferred
async def test_daemon_errors_are_json_envelopes(stack: Stack) -> None:
    cases = [
        (treq.get(stack.url("/v1/tts")), 405, "method_not_allowed"),
        (treq.post(stack.url("/v1/status")), 405, "method_not_allowed"),
        (treq.get(stack.url("/nope")), 404, "not_found"),
        (treq.post(stack.url("/api/audio/x.wav")), 405, "method_not_allowed"),
    ]
    for pending, code, error in cases:
        response = await pending
        assert response.code == code
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        envelope = await response.json()
        assert envelope["error"] == error
        assert envelope["retryable"] is False
        assert "Traceback" not in envelope["message"]


@pytest_twisted.ensureDeferred
async def test_large_upload_streams_without_buffering_in_memory(stack: Stack) -> None:
    size = 64 * 1024 * 1024
    with tempfile.TemporaryFile() as upload:
        digest = hashlib.sha256()
        block = os.urandom(1024 * 1024)
        for _ in range(64):
            upload.write(block)
            digest.update(block)
        upload.seek(0)
        await wait_until_idle(stack)
        before = stack.daemon.memory_kib()
        response = await treq.post(stack.url("/v1/stt"), data=FileBodyProducer(upload))
        echo = await response.json()
    after = stack.daemon.memory_kib()
    assert echo["body_length"] == size
    assert echo["body_sha256"] == digest.hexdigest()
    growth_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    assert growth_mib < 24, f"daemon peak memory grew {growth_mib:.1f} MiB for a 64 MiB upload"


@pytest_twisted.ensureDeferred
async def test_status_document_shape(stack: Stack) -> None:
    document = await status(stack)
    assert document["listen"] == f"127.0.0.1:{stack.daemon.port}"
    assert document["routing"] == {"tts": "voice", "stt": "voice", "llm": "llm",
                                   "image": "image"}
    assert [c["name"] for c in document["consumers"]] == ["image", "llm", "voice"]
    gpu = document["gpu"]
    assert gpu["total_mib"] == 24576
    assert gpu["err"]  # no NVML on a test machine: said, not hidden
    assert document["time"].endswith("Z")
    voice = next(c for c in document["consumers"] if c["name"] == "voice")
    assert voice["total_requests"] > 0
    assert voice["last_used"].endswith("Z")
    assert set(document["scheduler"]) >= {"queue_depth", "in_flight", "total_jobs",
                                          "last_wait_ms", "last_run_ms", "oldest_queued",
                                          "evictions"}
