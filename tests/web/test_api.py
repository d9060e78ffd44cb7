"""
Tests for :mod:`mgpumanager.web.api` through ``StubTreq``: the fixed routes, the status
document, the refusals a client can act on (each one the JSON envelope, never an
HTML page or a traceback), and the audio file names that must never reach a
consumer.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request

from mgpumanager.common.errors import ApiError
from mgpumanager.config.document import ConsumerConfig
from mgpumanager.config.parsing import parse_config
from mgpumanager.state.gpu import GpuReading, GpuSample
from mgpumanager.web.api import audio_name
from tests.support import EPOCH, success_result_of
from tests.world import Fakes, build, clock_at

BASE = "http://127.0.0.1:8770"

CONFIG = parse_config(
    {
        "gpu": {"total_mib": 24576, "reserved_mib": 1024},
        # image is not routed; stt goes to a consumer without paths.stt.
        "routing": {"tts": "voice", "stt": "voice", "llm": "llm"},
        "audio_proxy": "voice",
        "consumers": {
            "voice": {
                "url": "http://127.0.0.1:9001",
                "health": {"path": "/api/health"},
                "paths": {"tts": {"path": "/api/synthesize"}},
                "vram_resident_mib": 3000,
                "can_coexist_with": ["llm"],
                "priority": 2,
            },
            "llm": {
                "url": "http://127.0.0.1:9002",
                "health": {"path": "/api/version"},
                "paths": {"llm": {"path": "/api/generate"}},
                "vram_managed": True,
            },
            "comfy": {
                "url": "http://127.0.0.1:9003",
                "health": {"path": "/system_stats"},
                "paths": {"image": {"path": "/prompt"}},
                "vram_resident_mib": 13000,
                "unload": {"path": "/api/free"},
            },
        },
    }
)


class FakeProxy:
    """
    Records each relay and answers it: at once with a short body, or, when
    ``hold`` is set, when the test fires the returned Deferred.
    """

    #: No job outlives its answer here.
    completions = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, bytes]] = []
        self.hold = False
        self.held: list[Deferred[None]] = []
        self.raises: Exception | None = None

    def relay(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str
    ) -> Deferred[None]:
        self.calls.append((consumer.name, method, path, request.uri))
        if self.raises is not None:
            raise self.raises
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/plain")
        request.write(f"{consumer.name} answered".encode())
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)


class World:
    def __init__(self) -> None:
        self.proxy = FakeProxy()
        built = build(CONFIG, Fakes(proxy=self.proxy), clock_at(EPOCH))
        self.clock = built.clock
        self.registry = built.registry
        self.scheduler = built.scheduler
        self.sampler = built.sampler
        self.app = built.app
        self.stub: Any = StubTreq(built.routes.resource)

    def send(self, method: str, path: str, body: bytes = b"") -> Any:
        d = self.stub.request(method, BASE + path, data=body or None)
        self.stub.flush()
        return success_result_of(d)

    def body(self, response: Any) -> bytes:
        d = self.stub.content(response)
        self.stub.flush()
        return success_result_of(d)  # type: ignore[no-any-return]

    def json(self, response: Any) -> Any:
        return json.loads(self.body(response))


@pytest.fixture
def world() -> World:
    return World()


def _content_type(response: Any) -> bytes:
    return response.headers.getRawHeaders(b"content-type", [b""])[0]  # type: ignore[no-any-return]


def test_healthz_says_ok(world: World) -> None:
    response = world.send("GET", "/healthz")
    assert response.code == 200
    assert _content_type(response) == b"application/json"
    assert world.json(response) == {"status": "ok"}


def test_the_index_points_at_the_status_page(world: World) -> None:
    response = world.send("GET", "/")
    assert response.code == 200
    assert _content_type(response).startswith(b"text/plain")
    text = world.body(response).decode()
    assert "/v1/status" in text
    assert "/v1/tts" in text


def test_status_has_the_documented_shape(world: World) -> None:
    world.sampler.latest = GpuSample(
        time=EPOCH - 1,
        reading=GpuReading(name="RTX", total_mib=24564, used_mib=8963, free_mib=15601),
    )
    world.registry["voice"].healthy = True
    world.registry["voice"].last_probe = EPOCH - 2

    response = world.send("GET", "/v1/status")

    assert response.code == 200
    assert _content_type(response) == b"application/json"
    status = world.json(response)
    assert status["listen"] == "127.0.0.1:8770"
    assert status["time"] == "2026-05-15T10:00:00.000Z"
    gpu = status["gpu"]
    assert gpu["total_mib"] == 24576
    assert (gpu["used_mib"], gpu["free_mib"], gpu["reserved_mib"]) == (8963, 15601, 1024)
    assert gpu["last_sample"] == "2026-05-15T09:59:59.000Z"
    assert "err" not in gpu
    assert status["routing"] == {"tts": "voice", "stt": "voice", "llm": "llm"}
    assert [c["name"] for c in status["consumers"]] == ["comfy", "llm", "voice"]
    consumer_keys = {
        "name", "url", "healthy", "loaded", "gpu_resident_mib", "vram_budget_mib", "active",
        "total_requests", "last_used", "last_probe", "last_error", "priority",
        "can_coexist_with",
    }
    for consumer in status["consumers"]:
        assert consumer_keys <= consumer.keys()
    voice = status["consumers"][2]
    assert voice["url"] == "http://127.0.0.1:9001"
    assert (voice["healthy"], voice["loaded"], voice["gpu_resident_mib"]) == (True, True, 3000)
    assert voice["last_probe"] == "2026-05-15T09:59:58.000Z"
    assert voice["last_used"] is None
    assert (voice["priority"], voice["can_coexist_with"]) == (2, ["llm"])
    comfy = status["consumers"][0]
    assert (comfy["healthy"], comfy["loaded"], comfy["vram_budget_mib"]) == (None, False, 13000)
    scheduler_keys = {
        "queue_depth", "in_flight", "total_jobs", "last_wait_ms", "last_run_ms",
        "oldest_queued", "evictions",
    }
    assert scheduler_keys <= status["scheduler"].keys()
    assert status["scheduler"]["oldest_queued"] is None
    assert "Year 0001" not in json.dumps(status) and "0001-" not in json.dumps(status)


def test_status_shows_a_failed_gpu_sample(world: World) -> None:
    world.sampler.latest = GpuSample(time=EPOCH, err="NVML Shared Library Not Found")

    gpu = world.json(world.send("GET", "/v1/status"))["gpu"]

    assert gpu["err"] == "NVML Shared Library Not Found"
    assert gpu["total_mib"] == 24576
    assert gpu["free_mib"] is None


def test_a_gpu_job_is_proxied_through_the_scheduler(world: World) -> None:
    response = world.send("POST", "/v1/tts?voice=en", b'{"text": "hi"}')

    assert response.code == 200
    assert world.body(response) == b"voice answered"
    assert world.proxy.calls == [("voice", "POST", "/api/synthesize", b"/v1/tts?voice=en")]
    assert world.scheduler.total_jobs == 1
    assert world.registry["voice"].total_requests == 1


def test_gpu_jobs_wait_for_each_other(world: World) -> None:
    world.proxy.hold = True
    first = world.stub.post(BASE + "/v1/tts", data=b"a")
    second = world.stub.post(BASE + "/v1/llm", data=b"b")
    world.stub.flush()
    assert [call[0] for call in world.proxy.calls] == ["voice"]

    world.proxy.held[0].callback(None)
    world.stub.flush()
    assert success_result_of(first).code == 200
    assert [call[0] for call in world.proxy.calls] == ["voice", "llm"]
    world.proxy.held[1].callback(None)
    world.stub.flush()
    assert success_result_of(second).code == 200


def test_an_unrouted_kind_is_not_implemented(world: World) -> None:
    response = world.send("POST", "/v1/image", b"{}")

    assert response.code == 501
    assert world.json(response) == {
        "error": "no_consumer",
        "message": "no consumer is routed for image",
        "retryable": False,
    }
    assert world.proxy.calls == []


def test_a_routed_consumer_without_the_path_is_not_implemented(world: World) -> None:
    response = world.send("POST", "/v1/stt", b"audio")

    assert response.code == 501
    envelope = world.json(response)
    assert envelope["error"] == "no_consumer"
    assert envelope["consumer"] == "voice"
    assert envelope["retryable"] is False
    assert world.proxy.calls == []


def test_a_consumer_whose_last_probe_failed_is_refused_fast(world: World) -> None:
    state = world.registry["voice"]
    state.healthy = False
    state.last_error = "connection refused"

    response = world.send("POST", "/v1/tts", b"{}")

    assert response.code == 503
    envelope = world.json(response)
    assert envelope["error"] == "consumer_unreachable"
    assert envelope["consumer"] == "voice"
    assert envelope["retryable"] is True
    assert "connection refused" in envelope["message"]
    assert world.proxy.calls == []
    assert world.scheduler.total_jobs == 0


def test_a_job_after_shutdown_began_is_refused_retryably(world: World) -> None:
    world.scheduler.close()

    response = world.send("POST", "/v1/llm", b"{}")

    assert response.code == 503
    envelope = world.json(response)
    assert (envelope["error"], envelope["retryable"]) == ("shutting_down", True)


def test_an_unknown_path_is_a_json_404(world: World) -> None:
    response = world.send("GET", "/v2/nothing")
    assert response.code == 404
    assert world.json(response)["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/tts", "POST"),
        ("PUT", "/v1/llm", "POST"),
        ("POST", "/v1/status", "GET"),
        ("DELETE", "/healthz", "GET"),
        ("POST", "/api/audio/clip.wav", "GET"),
    ],
)
def test_a_wrong_method_is_a_json_405_with_allow(
    world: World, method: str, path: str, allowed: str
) -> None:
    response = world.send(method, path)

    assert response.code == 405
    assert world.json(response)["error"] == "method_not_allowed"
    allow = response.headers.getRawHeaders(b"allow", [b""])[0].decode()
    assert allowed in [m.strip() for m in allow.split(",")]
    assert world.proxy.calls == []


def _provoke(world: World, case: str) -> Any:
    if case == "404":
        return world.send("GET", "/nope")
    if case == "405":
        return world.send("PUT", "/v1/status")
    if case == "501":
        return world.send("POST", "/v1/image")
    if case == "503":
        world.registry["voice"].healthy = False
        return world.send("POST", "/v1/tts")
    if case == "400":
        return world.send("GET", "/api/audio/..%2Fsecret")
    world.proxy.raises = ZeroDivisionError("division by zero")
    return world.send("POST", "/v1/tts")


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize("case", ["404", "405", "501", "503", "400", "500"])
def test_every_daemon_error_is_the_json_envelope(world: World, case: str) -> None:
    response = _provoke(world, case)

    assert response.code == int(case)
    assert _content_type(response) == b"application/json"
    raw = world.body(response)
    assert b"Traceback" not in raw
    assert b"<html" not in raw.lower()
    envelope = json.loads(raw)
    assert {"error", "message", "retryable"} <= envelope.keys()


@pytest.mark.logged_errors_expected
def test_an_unexpected_proxy_exception_is_an_internal_error(
    world: World, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    world.proxy.raises = ZeroDivisionError("division by zero")

    response = world.send("POST", "/v1/tts", b"{}")

    assert response.code == 500
    envelope = world.json(response)
    assert envelope["error"] == "internal_error"
    assert "division" not in envelope["message"]
    assert fail_on_logged_errors, "the unexpected error is logged for the operator"
    assert world.scheduler.in_flight == 0
    assert world.scheduler.failed_jobs == 1


def test_an_audio_file_is_proxied_to_the_audio_consumer(world: World) -> None:
    response = world.send("GET", "/api/audio/clip%201.wav?download=1")

    assert response.code == 200
    assert world.proxy.calls == [
        ("voice", "GET", "/api/audio/clip%201.wav", b"/api/audio/clip%201.wav?download=1")
    ]
    # Audio is not a GPU job.
    assert world.scheduler.total_jobs == 0


@pytest.mark.parametrize(
    "name", ["a%2Fb", "a%5Cb", "%2E%2E", "a%252Fb", "a%00b", "a%0Db", "a%C2%85b"]
)
def test_a_bad_audio_name_is_a_bad_request_that_never_reaches_the_consumer(
    world: World, name: str
) -> None:
    response = world.send("GET", "/api/audio/" + name)

    assert response.code == 400
    assert world.json(response)["error"] == "bad_request"
    assert world.proxy.calls == []


def test_a_newline_in_an_audio_name_never_reaches_the_consumer(world: World) -> None:
    response = world.send("GET", "/api/audio/a%0Ab")

    assert 400 <= response.code < 500
    assert _content_type(response) == b"application/json"
    assert world.proxy.calls == []


def test_a_newline_in_an_audio_name_is_a_bad_request(world: World) -> None:
    response = world.send("GET", "/api/audio/a%0Ab")

    assert response.code == 400
    assert world.json(response)["error"] == "bad_request"


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize("path", ["/api/audio/a%FFb", "/%FF"])
def test_a_non_utf8_path_gets_the_json_envelope(world: World, path: str) -> None:
    response = world.send("GET", path)

    assert response.code == 400
    assert _content_type(response) == b"application/json"
    assert world.json(response)["error"] == "bad_request"
    assert world.proxy.calls == []


@pytest.mark.parametrize(
    ("encoded", "name"),
    [(b"clip%201.wav", "clip 1.wav"), (b"clip 1.wav", "clip 1.wav"), (b"%C3%A9t%C3%A9", "été")],
)
def test_audio_name_accepts_plain_file_names(encoded: bytes, name: str) -> None:
    assert audio_name(encoded) == name


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b".",
        b"..",
        b"%2e%2E",
        b"a/b",
        b"a%2Fb",
        b"a\\b",
        b"a%5cb",
        b"a%b",
        b"a%25b",
        b"a%252Fb",
        b"a\x00b",
        b"a%00b",
        b"a\nb",
        b"a%0Db",
        b"a%7Fb",
        b"a%C2%85b",
        b"a%FFb",
    ],
)
def test_audio_name_refuses_anything_that_could_name_another_path(encoded: bytes) -> None:
    with pytest.raises(ApiError) as info:
        audio_name(encoded)
    assert info.value.kind.code == "bad_request"
    assert info.value.status == 400


def test_audio_name_decodes_exactly_once() -> None:
    with pytest.raises(ApiError) as info:
        audio_name(b"a%252Fb")
    assert "'%'" in info.value.message
