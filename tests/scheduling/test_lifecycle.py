"""
Tests for :mod:`mgpumanager.scheduling.lifecycle`: making room for a job and loading its
consumer, driven with a ``Clock`` against a scripted card (a stand-in for
``pynvml`` whose memory follows the unloads), scripted load/unload routes, a
scripted ``systemctl`` and scripted health probes.  An unload only counts once
the memory is back; a failed unload or load fails the job naming the consumer,
and nothing is ever loaded on top of memory that did not come back.  Each
decision is kept with its reasons and timings; ``GET /v1/plan/<kind>`` says what
a job would do without doing any of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import attrs
import pynvml
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from mgpumanager.common.errors import ApiError
from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.commands import CommandResult, CommandTimedOut
from mgpumanager.scheduling.lifecycle import DECISIONS_KEPT
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.simulate.card_state import DEFAULT_CARD_NAME, CardState, ProcessUsage
from mgpumanager.simulate.nvml import (
    DeviceHandle,
    MemoryInfo,
    ProcessInfo,
    SimulatedNvml,
    SimulatedNvmlError,
)
from mgpumanager.state.gpu import GpuReading, GpuSample
from mgpumanager.state.registry import ConsumerState, Registry
from mgpumanager.web.status import lifecycle_status
from tests.builders import consumer as _consumer
from tests.support import EPOCH, assert_no_result, failure_result_of, success_result_of
from tests.world import Fakes, build, clock_at

#: 2026-05-15T10:00:00Z, so decision times read like real ones.
BASE = "http://127.0.0.1:8770"
SYSTEMCTL = ["sudo", "-n", "systemctl"]


def _config(
    consumers: dict[str, Any], gpu: dict[str, Any] | None = None, **lifecycle: Any
) -> Config:
    return parse_config(
        {
            "gpu": gpu if gpu is not None else {"total_mib": 16384, "reserved_mib": 1024},
            "routing": {
                kind: name
                for kind, name in (("tts", "voice"), ("stt", "whisper"), ("image", "image"))
                if name in consumers
            },
            "lifecycle": {"systemctl": " ".join(SYSTEMCTL), **lifecycle},
            "consumers": consumers,
        }
    )


CONSUMERS: dict[str, Any] = {
    "voice": _consumer(
        9001,
        "tts",
        vram_resident_mib=3000,
        load={"path": "/admin/load"},
        unload={"path": "/admin/unload"},
        can_coexist_with=["llm"],
    ),
    "llm": _consumer(9002, "llm", vram_managed=True),
    "image": _consumer(
        9003,
        "image",
        vram_resident_mib=13000,
        unload={"path": "/api/free", "body": '{"unload_models":true}'},
    ),
    "whisper": _consumer(9004, "stt", vram_resident_mib=1500, systemd_unit="whisper.service"),
    "embed": _consumer(9005, vram_resident_mib=500),
    "ocr": _consumer(9006, load={"path": "/load"}, unload={"path": "/unload"}),
}
CONFIG = _config(CONSUMERS)
PIDS = {"voice": 101, "llm": 102, "image": 103, "whisper": 104, "embed": 105, "ocr": 106}

#: Six small unloadable consumers around one big target on an 8 GiB card.
SMALL = _config(
    {
        "big": _consumer(9100, vram_resident_mib=7000, load={"path": "/load"}),
        **{
            f"s{i}": _consumer(
                9100 + i, vram_resident_mib=1000, load={"path": "/load"}, unload={"path": "/u"}
            )
            for i in range(1, 7)
        },
    },
    gpu={"total_mib": 8192, "reserved_mib": 0},
)


#: Coexistence both ways: image lists whisper, voice lists image; only "other" blocks.
COEXIST = _config(
    {
        "image": _consumer(
            9003,
            "image",
            vram_resident_mib=13000,
            load={"path": "/load"},
            unload={"path": "/free"},
            can_coexist_with=["whisper"],
        ),
        "whisper": _consumer(9004, "stt", vram_resident_mib=1500, systemd_unit="w.service"),
        "voice": _consumer(
            9001,
            "tts",
            vram_resident_mib=3000,
            load={"path": "/load"},
            unload={"path": "/free"},
            can_coexist_with=["image"],
        ),
        "other": _consumer(
            9007, vram_resident_mib=2000, load={"path": "/load"}, unload={"path": "/free"}
        ),
    },
    gpu={"total_mib": 18432},
)


class Card(SimulatedNvml):
    """
    :mod:`mgpumanager.simulate.nvml` over a scripted card: memory held by each
    consumer's process plus memory nobody we know holds.  ``available = False``
    is a host without NVML; ``per_process = False`` a driver that does not
    report processes.
    """

    def __init__(self, total_mib: int) -> None:
        super().__init__([self])  # the card it reads is this one: see snapshot()
        self.total_mib = total_mib
        self.held: dict[str, int] = {}
        self.other_mib = 0
        self.available = True
        self.per_process = True
        self.reads = 0

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.other_mib - sum(self.held.values())

    def snapshot(self) -> CardState:
        return CardState(
            name=DEFAULT_CARD_NAME,
            total_mib=self.total_mib,
            used_mib=self.total_mib - self.free_mib,
            processes=tuple(
                ProcessUsage(PIDS.get(name, 999), name, mib) for name, mib in self.held.items()
            ),
        )

    def nvmlInit(self) -> None:
        if not self.available:
            raise SimulatedNvmlError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        super().nvmlInit()

    def nvmlDeviceGetMemoryInfo(self, handle: DeviceHandle, version: Any = None) -> MemoryInfo:
        self.reads += 1
        return super().nvmlDeviceGetMemoryInfo(handle, version)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: DeviceHandle) -> list[ProcessInfo]:
        if not self.per_process:
            raise SimulatedNvmlError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return super().nvmlDeviceGetComputeRunningProcesses(handle)


class Response:
    def __init__(self, code: int, body: bytes = b"") -> None:
        self.code = code
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        """Deliver the whole body at once, as a finished HTTP response would."""
        protocol.makeConnection(None)
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


@attrs.frozen
class Call:
    method: str
    url: str
    data: bytes | None
    headers: Any
    allow_redirects: bool


HOLD = "hold"


class FakeClient:
    """
    Answers lifecycle routes by URL: a status (200 unless told), ``(status,
    body)``, an exception, or ``HOLD`` (the test answers with :meth:`answer`).
    A 2xx answer to an unload or load route changes the card.
    """

    def __init__(self, world: World) -> None:
        self._world = world
        self.calls: list[Call] = []
        self.answers: dict[str, Any] = {}
        self.held: list[tuple[str, Deferred[Response]]] = []
        self.cancelled: list[str] = []

    def request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: Any = None,
        allow_redirects: bool = False,
        unbuffered: bool = False,
    ) -> Deferred[Response]:
        self.calls.append(Call(method, url, data, headers, allow_redirects))
        answer = self.answers.get(url, 200)
        if answer == HOLD:
            d: Deferred[Response] = Deferred(lambda _: self.cancelled.append(url))
            self.held.append((url, d))
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(self._respond(url, answer))

    def answer(self, code: int = 200) -> None:
        url, d = self.held.pop(0)
        d.callback(self._respond(url, code))

    def _respond(self, url: str, answer: int | tuple[int, bytes]) -> Response:
        code, body = answer if isinstance(answer, tuple) else (answer, b"")
        if 200 <= code < 300:
            self._world.route_effect(url)
        return Response(code, body)

    def urls(self) -> list[str]:
        return [call.url.removeprefix("http://127.0.0.1:") for call in self.calls]


class FakeCommands:
    """
    ``run_command``: records argv; answers per action (an exit code, ``(code,
    output)``, an exception, or ``HOLD``: never, until cancelled).
    """

    def __init__(self, world: World) -> None:
        self._world = world
        self.calls: list[tuple[list[str], float]] = []
        self.results: dict[str, Any] = {}
        self.cancelled: list[str] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> Deferred[CommandResult]:
        self.calls.append((list(argv), timeout))
        action, unit = argv[-2], argv[-1]
        answer = self.results.get(action, 0)
        if answer == HOLD:
            return Deferred(lambda _: self.cancelled.append(action))
        if isinstance(answer, Exception):
            return fail(answer)
        code, output = answer if isinstance(answer, tuple) else (answer, "")
        if code == 0:
            self._world.unit_effect(action, unit)
        return succeed(CommandResult(argv=tuple(argv), code=code, output=output))


class FakeHealth:
    """Health probes: healthy from a given clock time on (default: always)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.healthy_from: dict[str, float] = {}
        self.calls: list[tuple[str, float]] = []

    def __call__(self, name: str) -> Deferred[bool]:
        now = self._clock.seconds()
        self.calls.append((name, now))
        return succeed(now >= self.healthy_from.get(name, 0.0))


class World:
    """
    The built daemon (:mod:`tests.world`) over the fakes: the card, the lifecycle
    routes, ``systemctl`` and the health checks.  The card starts holding what
    each resident consumer declares, llm 1000 MiB (it manages its own), and
    ``other_mib``.  ocr (no declared size) starts unloaded unless told otherwise.
    """

    def __init__(
        self,
        config: Config = CONFIG,
        loaded: dict[str, bool] | None = None,
        other_mib: int = 0,
        run_blocking: Callable[[Callable[[], GpuReading]], Deferred[GpuReading]] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock_at(EPOCH)
        self.card = Card(config.gpu.total_mib or 16384)
        self.client = FakeClient(self)
        self.commands = FakeCommands(self)
        self.health = FakeHealth(self.clock)
        built = build(
            config,
            Fakes(
                nvml=self.card,
                nvml_reads=run_blocking or (lambda f: maybeDeferred(f)),
                client=self.client,
                commands=self.commands,
                pids={name: frozenset({pid}) for name, pid in PIDS.items()},
                health_check=self.health,
            ),
            self.clock,
        )
        self.built = built
        self.registry = built.registry
        self.sampler = built.sampler
        self.lifecycle = built.lifecycle
        initially = {"ocr": False} if "ocr" in config.consumers else {}
        for name, value in {**initially, **(loaded or {})}.items():
            self.registry[name].believed_loaded = value
        self.card.other_mib = other_mib
        for state in self.registry:
            if state.resident:
                size = 1000 if state.config.vram_managed else state.config.vram_resident_mib
                if size:
                    self.card.held[state.name] = size
        #: What an unload does to the card, per consumer (default: frees it at once).
        self.on_unload: dict[str, Callable[[], None]] = {}

    # -- effects of lifecycle calls on the card

    def route_effect(self, url: str) -> None:
        for name, consumer in self.config.consumers.items():
            if consumer.unload is not None and url == consumer.url + consumer.unload.path:
                self.unloaded(name)
            if consumer.load is not None and url == consumer.url + consumer.load.path:
                self.card.held[name] = consumer.vram_resident_mib

    def unit_effect(self, action: str, unit: str) -> None:
        for name, consumer in self.config.consumers.items():
            if consumer.systemd_unit == unit:
                if action == "stop":
                    self.unloaded(name)
                else:
                    self.card.held[name] = consumer.vram_resident_mib

    def unloaded(self, name: str) -> None:
        effect = self.on_unload.get(name)
        if effect is not None:
            effect()
        else:
            self.card.held.pop(name, None)

    def release_after(self, name: str, seconds: float) -> None:
        """The unload answers at once; its memory comes back ``seconds`` later."""

        def later() -> None:
            self.clock.callLater(seconds, self.card.held.pop, name, None)

        self.on_unload[name] = later

    # -- driving

    def prepare(self, name: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self.lifecycle.prepare(name))

    def advance(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def run(self, name: str, limit: float = 300.0) -> Deferred[None]:
        """Prepare ``name``, advancing the clock until it is done (or ``limit``)."""
        d = self.prepare(name)
        waited = 0.0
        while not d.called and waited < limit:
            self.clock.advance(0.25)
            waited += 0.25
        return d

    def resident(self) -> set[str]:
        return {state.name for state in self.registry if state.resident}


def refusal(d: Deferred[Any]) -> ApiError:
    return failure_result_of(d, ApiError).value  # type: ignore[no-any-return]


def voice_world(**kwargs: Any) -> World:
    """
    voice unloaded; image (13000, the LRU) and whisper (1500) resident with llm (1000)
    and embed (500): 384 MiB free, voice needs 3256.
    """
    world = World(loaded={"voice": False, "image": True}, **kwargs)
    world.registry["image"].last_used = EPOCH - 100
    world.registry["whisper"].last_used = EPOCH - 10
    return world


def _snapshot(registry: Registry) -> list[ConsumerState]:
    return [attrs.evolve(state) for state in registry]


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


# -- making room, verified by NVML ---------------------------------------------


def test_evicts_least_recently_used_first_until_the_target_fits() -> None:
    # 16384 - voice 3000 - llm 1000 - whisper 1500 - embed 500 - 1000 other = 9384 free;
    # image needs 13000 + 256.  voice goes first (older), then whisper: 13884 free.
    world = World(other_mib=1000)
    world.registry["voice"].last_used = EPOCH - 50
    world.registry["whisper"].last_used = EPOCH - 10

    success_result_of(world.prepare("image"))

    assert world.client.urls() == ["9001/admin/unload"]
    assert world.commands.calls == [([*SYSTEMCTL, "stop", "whisper.service"], 30.0)]
    assert world.resident() == {"llm", "embed", "image"}
    assert world.lifecycle.evictions == 2
    assert world.lifecycle.loads == 1  # image cold-starts: no route, no unit
    assert (world.registry["voice"].unload_count, world.registry["whisper"].unload_count) == (
        1,
        1,
    )
    assert world.registry["image"].load_count == 1
    decisions = list(world.lifecycle.decisions)
    assert [d.victim for d in decisions] == ["voice", "whisper"]
    assert [d.outcome for d in decisions] == ["unloaded", "unloaded"]
    assert [d.fit.available_mib for d in decisions] == [9384, 12384]
    assert [d.recovered_mib for d in decisions] == [3000, 1500]
    assert all(d.fit.basis == "nvml" and d.fit.needed_mib == 13256 for d in decisions)


def test_never_used_counts_as_oldest_and_equal_use_is_broken_by_name() -> None:
    world = World(SMALL, other_mib=1500, loaded={f"s{i}": True for i in range(1, 7)})
    # big: 7000 + 256 needed; 8192 - 6000 - 1500 = 692 free.
    world.registry["big"].believed_loaded = False
    world.card.held.pop("big")
    world.registry["s1"].last_used = EPOCH - 5
    world.registry["s2"].last_used = EPOCH - 5
    world.registry["s3"].last_used = None
    world.registry["s4"].last_used = EPOCH - 60
    world.registry["s5"].last_used = EPOCH - 1
    world.registry["s6"].last_used = EPOCH - 5

    success_result_of(world.prepare("big"))

    # At most five evictions: s5 (the most recent) stays.
    assert [d.victim for d in world.lifecycle.decisions] == ["s3", "s4", "s1", "s2", "s6", None]


@pytest.mark.parametrize(
    ("hold_for", "release_after", "unload_ms", "recovery_ms"),
    [(0.0, 0.0, 0, 0), (0.5, 0.0, 500, 0), (0.0, 1.0, 0, 1000), (0.75, 2.5, 750, 2500)],
)
def test_a_decision_keeps_the_unload_and_recovery_timings(
    hold_for: float, release_after: float, unload_ms: int, recovery_ms: int
) -> None:
    world = voice_world()
    unload = "http://127.0.0.1:9003/api/free"
    if hold_for:
        world.client.answers[unload] = HOLD
    if release_after:
        world.release_after("image", release_after)

    d = world.prepare("voice")
    world.advance(hold_for)
    if hold_for:
        assert_no_result(d)
        world.client.answers.pop(unload)
        world.client.answer(200)
    if release_after:
        world.advance(release_after - 0.25)
        assert_no_result(d)
        assert world.client.urls() == ["9003/api/free"]  # nothing loaded meanwhile
        world.advance(0.25)
    success_result_of(d)

    (decision,) = world.lifecycle.decisions
    assert (decision.unload_ms, decision.recovery_ms) == (unload_ms, recovery_ms)
    assert decision.recovered_mib == 13000
    assert decision.time == EPOCH
    assert world.client.urls() == ["9003/api/free", "9001/admin/load"]


def test_the_unload_route_gets_its_method_body_and_content_type() -> None:
    world = voice_world()

    success_result_of(world.prepare("voice"))

    unload, load = world.client.calls
    assert (unload.method, unload.data) == ("POST", b'{"unload_models":true}')
    assert unload.headers == {"Content-Type": ["application/json"]}
    assert unload.allow_redirects is False
    assert (load.method, load.url, load.data, load.headers) == (
        "POST",
        "http://127.0.0.1:9001/admin/load",
        None,
        None,
    )
    assert world.resident() >= {"voice", "whisper"}
    assert "image" not in world.resident()


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(("back_mib", "verified"), [(9750, True), (9749, False)])
def test_three_quarters_of_the_declared_memory_back_verifies_the_unload(
    back_mib: int, verified: bool
) -> None:
    world = voice_world()
    world.card.per_process = False  # only free memory to go by

    def partly() -> None:
        world.card.held.pop("image")
        world.card.other_mib += 13000 - back_mib

    world.on_unload["image"] = partly

    d = world.run("voice", limit=20)

    if verified:
        success_result_of(d)
        assert world.lifecycle.decisions[0].recovered_mib == back_mib
    else:
        assert refusal(d).kind.code == "unload_failed"


def test_the_victims_own_processes_letting_go_verifies_the_unload() -> None:
    # Someone else grabs the memory at once, so free memory never rises; but NVML
    # shows the victim's process holding nothing any more.
    world = voice_world()

    def taken_over() -> None:
        world.card.other_mib += world.card.held.pop("image")

    world.on_unload["image"] = taken_over

    success_result_of(world.prepare("voice"))

    first = world.lifecycle.decisions[0]
    assert (first.victim, first.outcome, first.recovered_mib) == ("image", "unloaded", 0)
    assert first.recovery_ms == 0
    # The memory really is still taken, so making room goes on with whisper.
    assert world.lifecycle.decisions[1].victim == "whisper"
    assert "voice" in world.resident()


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(("left_mib", "verified"), [(649, True), (650, False)])
def test_less_than_five_percent_left_in_its_processes_counts_as_unloaded(
    left_mib: int, verified: bool
) -> None:
    world = voice_world()

    def mostly() -> None:
        world.card.held["image"] = left_mib
        world.card.other_mib += 13000 - left_mib

    world.on_unload["image"] = mostly

    d = world.run("voice", limit=20)

    if verified:
        success_result_of(d)
    else:
        assert refusal(d).consumer == "image"


@pytest.mark.logged_errors_expected
def test_per_process_memory_is_no_evidence_when_nvml_does_not_report_processes() -> None:
    world = voice_world()
    world.card.per_process = False

    def taken_over() -> None:
        world.card.other_mib += world.card.held.pop("image")

    world.on_unload["image"] = taken_over

    assert refusal(world.run("voice", limit=20)).kind.code == "unload_failed"


@pytest.mark.logged_errors_expected
def test_memory_that_never_comes_back_fails_the_job_and_loads_nothing(
    fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    world = voice_world()
    world.on_unload["image"] = lambda: None  # the route says 200; the card disagrees

    d = world.prepare("voice")
    world.advance(9.75)
    assert_no_result(d)
    world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.status, error.kind.retryable) == ("unload_failed", 503, True)
    assert error.consumer == "image"
    assert "image" in error.message
    assert "did not come back within 10 s" in error.message
    assert world.client.urls() == ["9003/api/free"]  # no load call
    assert "voice" not in world.resident()
    assert world.lifecycle.failed_unloads == 1
    assert world.lifecycle.loads == 0
    (decision,) = world.lifecycle.decisions
    assert decision.outcome == error.message
    assert decision.recovery_ms == 10000
    assert decision.victim == "image"
    assert fail_on_logged_errors, "the failed unload is logged as an error"


@pytest.mark.logged_errors_expected
def test_a_retry_after_memory_never_came_back_does_not_load_on_top_of_it() -> None:
    # No per-process figures (so nothing measures the victim as still loaded).
    world = voice_world()
    world.card.per_process = False
    world.on_unload["image"] = lambda: None

    assert refusal(world.run("voice", limit=20)).consumer == "image"
    retry = world.run("voice", limit=20)

    # Today: whisper is evicted, "nothing can be evicted; proceeding", and voice is
    # loaded with 1884 MiB free for its 3000.
    assert "9001/admin/load" not in world.client.urls()
    assert refusal(retry).kind.code == "unload_failed"


@pytest.mark.logged_errors_expected
def test_the_card_is_polled_every_verify_interval_up_to_the_verify_timeout() -> None:
    world = World(
        _config(CONSUMERS, verify_interval_seconds=0.5, verify_timeout_seconds=2),
        loaded={"voice": False, "image": True},
    )
    world.on_unload["image"] = lambda: None
    reads: list[tuple[float, int]] = []

    d = world.prepare("voice")
    for _ in range(8):
        reads.append((world.clock.seconds() - EPOCH, world.card.reads))
        world.clock.advance(0.25)

    # One read for the fit, then one at 0, 0.5, 1, 1.5 and 2 s after the unload.
    assert [n for _, n in reads] == [2, 2, 3, 3, 4, 4, 5, 5]
    assert world.card.reads == 6
    assert "within 2 s" in refusal(d).message


def test_coexisting_residents_stay_whichever_side_lists_the_other() -> None:
    # 18432 - whisper 1500 - voice 3000 - other 2000 = 11932 free; image needs 13256.
    world = World(COEXIST, loaded={"image": False, "other": True, "voice": True})
    world.card.held.pop("image", None)

    success_result_of(world.prepare("image"))

    (decision,) = world.lifecycle.decisions
    assert decision.victim == "other"
    reasons = {c.name: c.reason for c in decision.candidates}
    assert reasons["whisper"] == "may coexist with image"  # image lists whisper
    assert reasons["voice"] == "may coexist with image"  # voice lists image
    assert world.resident() == {"image", "whisper", "voice"}
    assert world.client.urls() == ["9007/free", "9003/load"]


def test_a_failed_nvml_read_while_waiting_does_not_end_the_wait() -> None:
    world = voice_world()

    def driver_hiccup() -> None:
        world.card.available = False

        def back() -> None:
            world.card.available = True
            world.card.held.pop("image")

        world.clock.callLater(0.5, back)

    world.on_unload["image"] = driver_hiccup

    d = world.prepare("voice")
    world.advance(0.25)
    assert_no_result(d)
    world.advance(0.25)

    success_result_of(d)
    assert world.lifecycle.decisions[0].recovery_ms == 500


# -- failed unloads --------------------------------------------------------------


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((500, b"CUDA error:\n  out of memory"), "POST /api/free answered HTTP 500 CUDA error: "
         "out of memory"),
        (ConnectionRefusedError(), "POST /api/free: connection refused"),
    ],
)
def test_a_failed_unload_route_fails_the_job_naming_the_victim(answer: Any, said: str) -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = answer

    error = refusal(world.prepare("voice"))

    assert (error.kind.code, error.status, error.consumer) == ("unload_failed", 503, "image")
    assert error.message == f"unloading image failed: {said}"
    assert world.client.urls() == ["9003/api/free"]
    assert world.resident() >= {"image", "whisper"}
    assert "voice" not in world.resident()
    assert (world.lifecycle.evictions, world.lifecycle.failed_unloads) == (0, 1)
    assert world.registry["image"].unload_count == 0
    assert world.lifecycle.decisions[0].outcome == error.message


@pytest.mark.logged_errors_expected
def test_an_unload_route_that_hangs_fails_after_the_unload_timeout() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = HOLD

    d = world.prepare("voice")
    world.advance(29.75)
    assert_no_result(d)
    world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.consumer) == ("unload_failed", "image")
    assert "timed out after 30 s" in error.message
    assert world.client.cancelled == ["http://127.0.0.1:9003/api/free"]
    assert world.client.urls() == ["9003/api/free"]
    assert "image" in world.resident()


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(
    ("result", "said"),
    [
        (
            (5, "Failed to stop whisper.service: Access denied\n"),
            "`sudo -n systemctl stop whisper.service` exited with 5: "
            "Failed to stop whisper.service: Access denied",
        ),
        (
            CommandTimedOut("`sudo -n systemctl stop whisper.service` took longer than 30 s"),
            "took longer than 30 s",
        ),
    ],
)
def test_a_failed_systemctl_stop_fails_the_job_naming_the_unit_consumer(
    result: Any, said: str
) -> None:
    # image is not on the card; whisper is the only victim.  884 MiB free.
    world = World(loaded={"voice": False}, other_mib=10500)
    world.commands.results["stop"] = result

    error = refusal(world.prepare("voice"))

    assert (error.kind.code, error.consumer) == ("unload_failed", "whisper")
    assert said in error.message
    assert world.commands.calls == [([*SYSTEMCTL, "stop", "whisper.service"], 30.0)]
    assert world.client.calls == []
    assert "whisper" in world.resident()


def test_a_job_cancelled_during_an_unload_route_is_cancelled_not_failed() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = HOLD

    d = world.prepare("voice")
    assert [c.getTime() for c in world.clock.getDelayedCalls()].count(EPOCH + 30) == 1
    d.cancel()

    failure_result_of(d, CancelledError)
    assert world.client.cancelled == ["http://127.0.0.1:9003/api/free"]
    assert world.lifecycle.failed_unloads == 0
    assert world.client.urls() == ["9003/api/free"]
    # The unload's 30 s time limit went with it.
    assert [c for c in world.clock.getDelayedCalls() if c.getTime() == EPOCH + 30] == []


def test_a_job_cancelled_during_systemctl_is_cancelled_not_failed() -> None:
    world = World(loaded={"voice": False}, other_mib=10500)
    world.commands.results["stop"] = HOLD

    d = world.prepare("voice")
    d.cancel()

    failure_result_of(d, CancelledError)
    assert world.commands.cancelled == ["stop"]
    assert world.lifecycle.failed_unloads == 0
    assert "whisper" in world.resident()


def test_a_systemd_victim_is_stopped_and_verified() -> None:
    world = World(loaded={"voice": False}, other_mib=10500)

    success_result_of(world.prepare("voice"))

    assert world.commands.calls == [([*SYSTEMCTL, "stop", "whisper.service"], 30.0)]
    assert world.client.urls() == ["9001/admin/load"]
    assert world.lifecycle.decisions[0].recovered_mib == 1500
    assert "whisper" not in world.resident()
    assert world.registry["whisper"].restartable


# -- loads -----------------------------------------------------------------------------


def test_a_target_with_a_load_route_is_loaded_and_marked_resident() -> None:
    world = World(loaded={"voice": False})

    success_result_of(world.prepare("voice"))

    assert world.client.urls() == ["9001/admin/load"]
    assert list(world.lifecycle.decisions) == []
    state = world.registry["voice"]
    assert state.resident and state.load_count == 1
    assert state.lifecycle_changed_at == EPOCH
    assert world.lifecycle.loads == 1


@pytest.mark.logged_errors_expected
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((500, b"no such model"), "POST /admin/load answered HTTP 500 no such model"),
        (ConnectionRefusedError(), "POST /admin/load: connection refused"),
        (HOLD, "POST /admin/load timed out after 120 s"),
    ],
)
def test_a_failed_load_route_fails_the_job_naming_the_target(answer: Any, said: str) -> None:
    world = World(loaded={"voice": False})
    world.client.answers["http://127.0.0.1:9001/admin/load"] = answer

    d = world.prepare("voice")
    if answer == HOLD:
        world.advance(119.75)
        assert_no_result(d)
        world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.status, error.kind.retryable) == ("load_failed", 503, True)
    assert error.consumer == "voice"
    assert error.message == f"loading voice failed: {said}"
    # The load may still be going on: count it as loaded, never load on top of it.
    assert "voice" in world.resident()
    assert (world.lifecycle.loads, world.lifecycle.failed_loads) == (0, 1)


def test_a_systemd_target_is_started_then_waited_for_until_healthy() -> None:
    world = World(loaded={"whisper": False})
    world.card.held.pop("whisper", None)
    world.health.healthy_from["whisper"] = EPOCH + 2

    d = world.prepare("whisper")
    world.advance(1.75)
    assert_no_result(d)
    assert "whisper" not in world.resident()
    world.advance(0.25)
    success_result_of(d)

    assert world.commands.calls == [([*SYSTEMCTL, "start", "whisper.service"], 120.0)]
    assert [name for name, _ in world.health.calls] == ["whisper"] * 9
    assert world.health.calls[-1][1] == EPOCH + 2
    assert "whisper" in world.resident()
    assert world.lifecycle.loads == 1


@pytest.mark.logged_errors_expected
def test_a_started_unit_that_never_turns_healthy_fails_after_the_load_timeout() -> None:
    world = World(loaded={"whisper": False})
    world.card.held.pop("whisper", None)
    world.health.healthy_from["whisper"] = EPOCH + 10_000

    d = world.prepare("whisper")
    world.advance(119.75)
    assert_no_result(d)
    world.advance(0.25)

    error = refusal(d)
    assert (error.kind.code, error.consumer) == ("load_failed", "whisper")
    assert "never answered its health route" in error.message
    # systemd may yet bring it up: it counts as loaded until unloaded again.
    assert "whisper" in world.resident()


@pytest.mark.logged_errors_expected
def test_a_unit_that_fails_to_start_fails_the_job_without_probing() -> None:
    world = World(loaded={"whisper": False})
    world.commands.results["start"] = (1, "Job for whisper.service failed.")

    error = refusal(world.prepare("whisper"))

    assert (error.kind.code, error.consumer) == ("load_failed", "whisper")
    assert "`sudo -n systemctl start whisper.service` exited with 1" in error.message
    assert world.health.calls == []
    assert world.lifecycle.failed_loads == 1


# -- without NVML ----------------------------------------------------------------


@pytest.mark.parametrize("settle", [1.0, 2.5])
def test_without_nvml_the_budget_decides_and_a_fixed_settle_replaces_verification(
    settle: float,
) -> None:
    # Budget 15360 - voice 3000 - whisper 1500 - embed 500 = 10360 < 13000; without voice
    # 13360 fits.
    world = World(_config(CONSUMERS, settle_seconds=settle))
    world.card.available = False
    world.registry["voice"].last_used = EPOCH - 50
    world.registry["whisper"].last_used = EPOCH - 10

    d = world.prepare("image")
    world.advance(settle - 0.25)
    assert_no_result(d)
    world.advance(0.25)
    success_result_of(d)

    (decision,) = world.lifecycle.decisions
    assert decision.victim == "voice"
    assert decision.fit.basis == "budget"
    assert (decision.fit.needed_mib, decision.fit.available_mib) == (13000, 10360)
    assert decision.outcome == "unloaded (settled, no NVML)"
    assert decision.recovery_ms == round(settle * 1000)
    assert decision.recovered_mib is None
    assert world.resident() == {"llm", "whisper", "embed", "image"}


def test_without_nvml_or_card_size_every_blocking_resident_is_evicted() -> None:
    world = World(_config(CONSUMERS, gpu={}))
    world.card.available = False

    d = world.run("image", limit=10)

    success_result_of(d)
    # embed has no way to be unloaded: the warning case, and the job proceeds.
    assert [d.victim for d in world.lifecycle.decisions] == ["voice", "whisper", None]
    assert world.lifecycle.decisions[-1].fit.available_mib is None
    assert world.resident() == {"llm", "embed", "image"}


# -- nothing evictable, the cap -----------------------------------------------------


def test_with_nothing_evictable_the_job_proceeds_and_the_decision_says_so(
    warnings_logged: list[str],
) -> None:
    world = World(loaded={"voice": False, "whisper": False}, other_mib=13000)

    success_result_of(world.prepare("voice"))

    (decision,) = world.lifecycle.decisions
    assert (decision.victim, decision.outcome) == (None, "nothing can be evicted; proceeding")
    assert decision.fit.fits is False
    assert {c.name: c.reason for c in decision.candidates} == {
        "embed": "no unload route or systemd unit",
        "image": "not resident",
        "llm": "manages its own VRAM",
        "ocr": "not resident",
        "whisper": "not resident",
    }
    assert world.client.urls() == ["9001/admin/load"]
    assert world.lifecycle.evictions == 0
    assert "voice" in world.resident()
    assert any("nothing can be evicted; proceeding" in line for line in warnings_logged)


def test_at_most_five_evictions_per_job_then_it_proceeds(warnings_logged: list[str]) -> None:
    world = World(SMALL, other_mib=1500, loaded={f"s{i}": True for i in range(1, 7)})
    world.registry["big"].believed_loaded = False
    world.card.held.pop("big")
    for i in range(1, 7):
        world.registry[f"s{i}"].last_used = EPOCH - 100 + i

    success_result_of(world.prepare("big"))

    decisions = list(world.lifecycle.decisions)
    assert [d.victim for d in decisions] == ["s1", "s2", "s3", "s4", "s5", None]
    assert decisions[-1].outcome == "still short after 5 evictions; proceeding"
    assert decisions[-1].fit.available_mib == 5692
    assert world.lifecycle.evictions == 5
    assert world.resident() == {"s6", "big"}
    assert world.client.urls() == [*(f"{9100 + i}/u" for i in range(1, 6)), "9100/load"]
    assert any("still short after 5 evictions" in line for line in warnings_logged)


# -- skips, residency, probe reports -----------------------------------------------------


@pytest.mark.parametrize("target", ["llm", "voice", "embed"])
def test_a_resident_or_self_managing_target_is_left_alone(target: str) -> None:
    world = World()
    before = _snapshot(world.registry)

    success_result_of(world.prepare(target))

    assert world.card.reads == 0
    assert world.client.calls == [] and world.commands.calls == []
    assert list(world.lifecycle.decisions) == []
    assert _snapshot(world.registry) == before


def test_a_target_without_a_declared_size_is_loaded_without_making_room() -> None:
    world = World(loaded={"ocr": False}, other_mib=9000)

    success_result_of(world.prepare("ocr"))

    assert world.card.reads == 0
    assert world.client.urls() == ["9006/load"]
    assert list(world.lifecycle.decisions) == []
    assert "ocr" in world.resident()


def test_a_self_managing_target_reported_unloaded_is_loaded_without_making_room() -> None:
    world = World(other_mib=9000)
    world.registry["llm"].reported_loaded = False

    success_result_of(world.prepare("llm"))

    assert world.card.reads == 0
    assert world.registry["llm"].resident
    assert world.registry["llm"].reported_loaded is None


def test_initial_residency_lazy_consumers_start_empty() -> None:
    registry = Registry(CONFIG)

    assert {state.name for state in registry if state.resident} == {
        "voice", "llm", "whisper", "embed", "ocr",
    }
    assert not registry["image"].resident


def test_a_probe_reporting_the_lazy_consumer_loaded_makes_it_a_victim() -> None:
    world = World(loaded={"voice": False})
    world.registry["image"].reported_loaded = True
    world.card.held["image"] = 13000  # 384 MiB free

    success_result_of(world.prepare("voice"))

    assert world.client.urls() == ["9003/api/free", "9001/admin/load"]
    image = world.registry["image"]
    assert (image.reported_loaded, image.resident) == (None, False)


def test_a_target_the_fresh_sample_shows_loaded_is_neither_made_room_for_nor_loaded() -> None:
    # Believed unloaded, but its process holds its full size on the card: once the
    # sample taken for the fit check is attributed, it counts as resident.
    world = World(loaded={"voice": False}, other_mib=10000)
    world.card.held["voice"] = 3000  # 384 MiB free: voice would not fit

    def attribute(sample: GpuSample) -> None:
        if sample.reading is not None:
            state = world.registry["voice"]
            state.measured_resident_mib = sample.reading.processes.get(PIDS["voice"], 0)
            state.measured_at = world.clock.seconds()

    world.sampler.subscribe(attribute)

    success_result_of(world.prepare("voice"))

    assert world.card.reads == 1
    assert world.client.calls == [] and world.commands.calls == []
    assert list(world.lifecycle.decisions) == []
    assert world.lifecycle.loads == 0
    assert world.registry["voice"].resident


def test_a_probe_reporting_the_target_unloaded_makes_it_load() -> None:
    world = World()
    world.registry["voice"].reported_loaded = False
    world.card.held.pop("voice")

    success_result_of(world.prepare("voice"))

    assert world.client.urls() == ["9001/admin/load"]
    assert world.registry["voice"].resident


def test_a_probe_reporting_a_resident_unloaded_takes_it_off_the_candidates() -> None:
    world = voice_world()
    world.registry["image"].reported_loaded = False  # yet the card still holds it

    success_result_of(world.prepare("voice"))

    # whisper goes; 1884 MiB is still short, and nothing else may go.
    assert [d.victim for d in world.lifecycle.decisions] == ["whisper", None]
    reasons = {c.name: c.reason for c in world.lifecycle.decisions[0].candidates}
    assert reasons["image"] == "not resident"
    assert world.client.urls() == ["9001/admin/load"]


# -- decisions, status ---------------------------------------------------------------


def test_decisions_show_in_status_with_every_candidate_and_reason() -> None:
    world = voice_world()

    success_result_of(world.prepare("voice"))

    status = lifecycle_status(world.lifecycle)
    assert {k: status[k] for k in ("evictions", "failed_unloads", "loads", "failed_loads")} == {
        "evictions": 1,
        "failed_unloads": 0,
        "loads": 1,
        "failed_loads": 0,
    }
    (decision,) = status["decisions"]
    assert decision == {
        "time": "2026-05-15T10:00:00.000Z",
        "target": "voice",
        "fits": False,
        "basis": "nvml",
        "needed_mib": 3256,
        "available_mib": 384,
        "why": decision["why"],
        "candidates": [
            {"name": "image", "eligible": True, "reason": "eligible",
             "last_used": "2026-05-15T09:58:20.000Z"},
            {"name": "whisper", "eligible": True, "reason": "eligible",
             "last_used": "2026-05-15T09:59:50.000Z"},
            {"name": "embed", "eligible": False, "reason": "no unload route or systemd unit",
             "last_used": None},
            {"name": "llm", "eligible": False, "reason": "manages its own VRAM",
             "last_used": None},
            {"name": "ocr", "eligible": False, "reason": "not resident", "last_used": None},
        ],
        "victim": "image",
        "outcome": "unloaded",
        "unload_ms": 0,
        "recovery_ms": 0,
        "recovered_mib": 13000,
        # Part 3: every decision names the card it made room on.
        "card": 0,
    }
    json.dumps(status)


def test_only_the_last_twenty_decisions_are_kept() -> None:
    world = World(loaded={"voice": False, "whisper": False}, other_mib=13000)

    for _ in range(25):
        world.registry["voice"].believed_loaded = False
        world.card.held.pop("voice", None)
        success_result_of(world.prepare("voice"))
        world.clock.advance(1)

    assert DECISIONS_KEPT == 20
    decisions = world.lifecycle.decisions
    assert len(decisions) == 20
    assert decisions[0].time == EPOCH + 5
    assert decisions[-1].time == EPOCH + 24
    assert world.lifecycle.loads == 25
    assert len(lifecycle_status(world.lifecycle)["decisions"]) == 20


# -- inside the GPU lock -------------------------------------------------------------


def recording_job(ran: list[str]) -> Callable[[str], Callable[[], Deferred[None]]]:
    """Job callables that note their label in ``ran`` when they start."""

    def job(label: str) -> Callable[[], Deferred[None]]:
        def run() -> Deferred[None]:
            ran.append(label)
            return succeed(None)

        return run

    return job


def test_making_room_and_loading_happen_inside_the_gpu_lock() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = HOLD
    scheduler = GpuScheduler(
        world.clock, world.registry, world.lifecycle.prepare, queue=world.config.queue
    )
    ran: list[str] = []
    job = recording_job(ran)

    first = scheduler.submit("voice", job("voice"))
    second = scheduler.submit("whisper", job("whisper"))

    assert (scheduler.in_flight, scheduler.queue_depth) == (1, 1)
    assert ran == []
    world.client.answers.pop("http://127.0.0.1:9003/api/free")
    world.client.answer(200)

    success_result_of(first)
    success_result_of(second)
    assert ran == ["voice", "whisper"]
    assert world.client.urls() == ["9003/api/free", "9001/admin/load"]


@pytest.mark.logged_errors_expected
def test_a_failed_unload_fails_the_job_without_running_it_and_frees_the_lock() -> None:
    world = voice_world()
    world.client.answers["http://127.0.0.1:9003/api/free"] = 500
    scheduler = GpuScheduler(
        world.clock, world.registry, world.lifecycle.prepare, queue=world.config.queue
    )
    ran: list[str] = []
    job = recording_job(ran)

    first = scheduler.submit("voice", job("voice"))
    second = scheduler.submit("whisper", job("whisper"))

    assert refusal(first).kind.code == "unload_failed"
    success_result_of(second)
    assert ran == ["whisper"]
    assert scheduler.in_flight == 0


def test_making_room_does_not_wait_for_the_samplers_next_loop_tick() -> None:
    # As in the daemon: reads finish off the reactor (here: on the next clock turn),
    # and the sampler's own loop ticks every 2 s.
    clocks: list[Clock] = []

    def later(f: Callable[[], GpuReading]) -> Deferred[GpuReading]:
        return deferLater(clocks[0], 0, f)

    world = voice_world(run_blocking=later)
    clocks.append(world.clock)
    world.sampler.start()
    finished: list[float] = []

    d = world.prepare("voice")
    d.addCallback(lambda _: finished.append(world.clock.seconds() - EPOCH))
    world.advance(10)
    world.sampler.stop()

    success_result_of(d)
    # Each read takes one clock turn: done within the first steps, not after two
    # more 2 s loop ticks (4.0 s today).
    assert finished[0] <= 0.75


# -- GET /v1/plan/<kind> ---------------------------------------------------------------


class PlanApi:
    def __init__(self, world: World) -> None:
        self.world = world
        self.stub: Any = StubTreq(world.built.routes.resource)

    def get(self, path: str) -> tuple[int, Any]:
        d = self.stub.get(BASE + path)
        self.stub.flush()
        response = success_result_of(d)
        body = self.stub.content(response)
        self.stub.flush()
        return response.code, json.loads(success_result_of(body))


def test_the_plan_endpoint_answers_what_would_be_evicted_and_touches_nothing() -> None:
    world = World(other_mib=1000)
    world.registry["voice"].last_used = EPOCH - 50
    world.registry["whisper"].last_used = EPOCH - 10
    before = _snapshot(world.registry)

    code, plan = PlanApi(world).get("/v1/plan/image")

    assert code == 200
    assert plan["kind"] == "image"
    assert plan["target"] == "image"
    assert plan["would_evict"] == ["voice", "whisper"]
    assert plan["would_load"] is True
    assert [step["fit"]["available_mib"] for step in plan["steps"]] == [9384, 12384, 13884]
    assert world.client.calls == [] and world.commands.calls == []
    assert _snapshot(world.registry) == before
    assert list(world.lifecycle.decisions) == []

    # ... and a real job then does exactly that.
    success_result_of(world.prepare("image"))
    assert [d.victim for d in world.lifecycle.decisions] == plan["would_evict"]


def test_the_plan_for_a_resident_target_is_empty() -> None:
    code, plan = PlanApi(World()).get("/v1/plan/tts")

    assert code == 200
    assert (plan["target"], plan["would_evict"], plan["would_load"]) == ("voice", [], False)
    assert plan["skip_make_room"] == "target is already resident"


def test_the_plan_for_an_unrouted_kind_is_501() -> None:
    code, body = PlanApi(World()).get("/v1/plan/llm")

    assert code == 501
    assert (body["error"], body["retryable"]) == ("no_consumer", False)


def test_the_plan_for_an_unknown_kind_is_404() -> None:
    code, body = PlanApi(World()).get("/v1/plan/video")

    assert code == 404
    assert body["error"] == "not_found"


def test_status_shows_the_decisions() -> None:
    world = voice_world()
    success_result_of(world.prepare("voice"))

    code, status = PlanApi(world).get("/v1/status")

    assert code == 200
    scheduler = status["scheduler"]
    assert scheduler["evictions"] == 1
    assert [d["victim"] for d in scheduler["decisions"]] == ["image"]


def test_a_load_abandoned_by_its_client_counts_as_loaded() -> None:
    """The server keeps loading after our request is cut: the next job must unload it."""
    world = World(loaded={"voice": False})
    world.client.answers["http://127.0.0.1:9001/admin/load"] = HOLD

    d = world.prepare("voice")
    d.cancel()

    failure_result_of(d, CancelledError)
    assert "voice" in world.resident()


def test_an_unload_is_verified_against_what_the_victim_held_not_its_peak() -> None:
    # The image server once held 20 GiB; it holds its declared 13000 MiB now.
    world = voice_world()
    world.card.per_process = False  # only free memory to go by
    world.registry["image"].note_resident_mib(20000)
    assert world.registry["image"].size_mib == 20000

    d = world.run("voice", limit=20)

    success_result_of(d)
    assert world.lifecycle.decisions[0].outcome == "unloaded"
    assert world.lifecycle.decisions[0].recovered_mib == 13000
