"""
Tests for :mod:`mgpumanager.consumers.probes`: a consumer's health answer decides whether it
is refused fast, its own ``loaded``/``gpu_resident_mib`` report corrects our
bookkeeping unless it is stale, and a consumer that never answers is bounded by the
timeout without delaying anyone else's probe or stopping the loop.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mgpumanager.config.parsing import parse_config
from mgpumanager.web.status import consumer_status
from tests.support import assert_no_result, success_result_of
from tests.world import Fakes, build, clock_at

INTERVAL = 5.0
TIMEOUT = 3.0

CONFIG = parse_config(
    {
        "probes": {"interval_seconds": INTERVAL, "timeout_seconds": TIMEOUT},
        "consumers": {
            "voice": {"url": "http://127.0.0.1:9001", "health": {"path": "/voice/health"}},
            # unload without load: believed not resident until it says otherwise.
            "image": {
                "url": "http://127.0.0.1:9002",
                "health": {"path": "/image/health"},
                "unload": {"path": "/free"},
                "vram_resident_mib": 13000,
            },
        },
    }
)

HANG = object()


class HealthRoutes(Resource):
    """
    Answers ``/<consumer>/health`` as told: ``(status, body)``, or ``HANG`` to hold
    the request open until the test finishes it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Any] = {}
        self.hits: dict[str, int] = {}
        self.held: dict[str, list[Request]] = {}

    def render(self, request: Request) -> bytes | int:
        name = request.path.decode().split("/")[1]
        self.hits[name] = self.hits.get(name, 0) + 1
        answer = self.answers.get(name, (200, b"ok"))
        if answer is HANG:
            self.held.setdefault(name, []).append(request)
            return NOT_DONE_YET
        status, body = answer
        request.setResponseCode(status)
        return body if isinstance(body, bytes) else json.dumps(body).encode()

    def release(self, name: str, body: object) -> None:
        for request in self.held.pop(name):
            request.write(json.dumps(body).encode())
            request.finish()


class Client:
    """StubTreq, except that some consumers refuse the connection."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.refusing: set[str] = set()

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        if any(f":{port}/" in url for port in self.refusing):
            return fail(ConnectionRefusedError())
        return self.stub.request(method, url, **kwargs)  # type: ignore[no-any-return]


class World:
    def __init__(self) -> None:
        self.routes = HealthRoutes()
        self.stub: Any = StubTreq(self.routes)
        self.client = Client(self.stub)
        built = build(CONFIG, Fakes(client=self.client), clock_at(1000))
        self.clock = built.clock
        self.registry = built.registry
        self.prober = built.prober

    def probe(self, name: str) -> bool | None:
        """Probe one consumer to the end; what the registry now says of it."""
        self.prober.probe(name)
        self.stub.flush()
        return self.registry[name].healthy

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()


@pytest.fixture
def world() -> World:
    return World()


def test_a_2xx_answer_marks_the_consumer_healthy(world: World) -> None:
    world.routes.answers["voice"] = (204, b"")
    state = world.registry["voice"]
    assert state.healthy is None

    assert world.probe("voice") is True

    assert state.healthy is True
    assert state.last_error == ""
    assert state.last_probe == 1000
    assert world.routes.hits == {"voice": 1}


def test_an_error_status_marks_it_unhealthy_with_the_reason(world: World) -> None:
    world.routes.answers["voice"] = (503, b"warming up")

    assert world.probe("voice") is False

    state = world.registry["voice"]
    assert state.healthy is False
    assert "503" in state.last_error
    assert state.last_probe == 1000


def test_a_refused_connection_marks_it_unhealthy(world: World) -> None:
    world.client.refusing.add("9001")

    assert world.probe("voice") is False

    state = world.registry["voice"]
    assert state.healthy is False
    assert state.last_error == "connection refused"


def test_a_later_success_clears_the_failure(world: World) -> None:
    world.routes.answers["voice"] = (500, b"")
    world.probe("voice")
    world.routes.answers["voice"] = (200, b"")

    assert world.probe("voice") is True
    assert world.registry["voice"].healthy is True
    assert world.registry["voice"].last_error == ""


def test_the_consumers_report_overrides_bookkeeping(world: World) -> None:
    voice = world.registry["voice"]
    image = world.registry["image"]
    assert (voice.resident, image.resident) == (True, False)
    world.routes.answers["voice"] = (200, {"loaded": False, "gpu_resident_mib": 0})
    world.routes.answers["image"] = (200, {"loaded": True, "gpu_resident_mib": 9000})

    world.probe("voice")
    world.probe("image")

    assert voice.resident is False
    assert voice.gpu_resident_mib == 0
    assert image.resident is True
    assert image.gpu_resident_mib == 9000
    assert consumer_status(image)["loaded"] is True


@pytest.mark.parametrize(
    "report",
    [
        {"loaded": "yes", "gpu_resident_mib": "2048"},
        {"loaded": 1, "gpu_resident_mib": True},
        {"loaded": None, "gpu_resident_mib": 1.5},
        {"gpu_resident_mib": -5},
        ["loaded", True],
        "loaded",
    ],
    ids=["strings", "int-and-bool", "null-and-float", "negative", "list", "string"],
)
def test_report_values_of_the_wrong_type_are_ignored(world: World, report: object) -> None:
    world.routes.answers["image"] = (200, report)

    assert world.probe("image") is True

    state = world.registry["image"]
    assert state.reported_loaded is None
    assert state.reported_resident_mib is None
    assert state.resident is False


def test_a_non_json_answer_is_healthy_and_reports_nothing(world: World) -> None:
    world.routes.answers["image"] = (200, b"<html>up</html>")

    assert world.probe("image") is True
    assert world.registry["image"].reported_loaded is None


def test_a_probe_that_never_answers_times_out_without_delaying_the_others(
    world: World,
) -> None:
    world.routes.answers["voice"] = HANG

    world.prober.probe_all()
    world.stub.flush()

    voice, image = world.registry["voice"], world.registry["image"]
    assert image.healthy is True
    assert voice.healthy is None
    world.advance(TIMEOUT - 0.5)
    assert voice.healthy is None

    world.advance(0.5)
    assert voice.healthy is False
    assert voice.last_error
    assert voice.last_probe == 1000 + TIMEOUT
    assert image.healthy is True


def test_a_probe_that_never_answers_says_it_timed_out(world: World) -> None:
    world.routes.answers["voice"] = HANG

    world.prober.probe("voice")
    world.stub.flush()
    world.advance(TIMEOUT)

    assert world.registry["voice"].last_error == "health probe timed out after 3 s"


def test_probe_all_does_not_start_a_second_probe_of_a_consumer_still_in_flight(
    world: World,
) -> None:
    world.routes.answers["voice"] = HANG

    world.prober.probe_all()
    world.stub.flush()
    joined = world.prober.probe("voice")
    world.prober.probe_all()
    world.stub.flush()

    assert world.routes.hits == {"voice": 1, "image": 2}
    assert_no_result(joined)
    world.routes.release("voice", {})
    world.stub.flush()
    assert success_result_of(joined) is True


def test_a_report_from_a_probe_started_before_a_lifecycle_change_is_ignored(
    world: World,
) -> None:
    world.routes.answers["voice"] = HANG
    state = world.registry["voice"]
    world.prober.probe("voice")
    world.stub.flush()

    world.clock.advance(1)
    state.mark_loaded(False, world.clock.seconds())
    world.routes.release("voice", {"loaded": True, "gpu_resident_mib": 3000})
    world.stub.flush()

    assert state.healthy is True
    assert state.reported_loaded is None
    assert state.reported_resident_mib is None
    assert state.resident is False

    # A probe started after the change is believed.
    world.routes.answers["voice"] = (200, {"loaded": True})
    world.advance(1)
    world.probe("voice")
    assert state.resident is True


@pytest.mark.parametrize("refused", [False, True], ids=["answered", "refused"])
def test_probe_fires_with_the_outcome_even_when_the_answer_is_immediate(
    world: World, refused: bool
) -> None:
    if refused:
        world.client.refusing.add("9001")

    outcome = world.prober.probe("voice")
    world.stub.flush()

    assert success_result_of(outcome) is not refused


def test_the_loop_keeps_probing_after_failures(world: World) -> None:
    world.routes.answers["voice"] = (500, b"")
    world.client.refusing.add("9002")
    world.prober.start()
    world.stub.flush()
    try:
        for _ in range(4):
            world.advance(INTERVAL)

        assert world.routes.hits == {"voice": 5}
        assert world.registry["voice"].healthy is False
        assert world.registry["image"].healthy is False

        world.routes.answers["voice"] = (200, b"")
        world.client.refusing.clear()
        world.advance(INTERVAL)
        assert world.registry["voice"].healthy is True
        assert world.registry["image"].healthy is True
    finally:
        world.prober.stop()
