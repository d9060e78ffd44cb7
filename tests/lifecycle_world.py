"""
The scaffolding of the lifecycle's tests (:mod:`mgpumanager.scheduling.lifecycle`):
the built daemon driven with a ``Clock`` against a scripted card (simulate's
NVML, whose memory follows the unloads), scripted load/unload routes, a
scripted ``systemctl`` and scripted health probes, and the configurations the
tests run with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pynvml
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from mgpumanager.common.errors import ApiError
from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.commands import CommandResult
from mgpumanager.simulate.card_state import DEFAULT_CARD_NAME, CardState, ProcessUsage
from mgpumanager.simulate.nvml import (
    DeviceHandle,
    MemoryInfo,
    ProcessInfo,
    SimulatedNvml,
    SimulatedNvmlError,
)
from mgpumanager.state.gpu import GpuReading
from mgpumanager.state.registry import ConsumerState, Registry
from tests.builders import consumer as _consumer
from tests.support import EPOCH, failure_result_of
from tests.world import Fakes, build, clock_at

SYSTEMCTL = ["sudo", "-n", "systemctl"]


def config_of(
    consumers: dict[str, Any], gpu: dict[str, Any] | None = None, **lifecycle: Any
) -> Config:
    """``consumers`` on one card, routed by kind, with ``lifecycle`` settings."""
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
CONFIG = config_of(CONSUMERS)
PIDS = {"voice": 101, "llm": 102, "image": 103, "whisper": 104, "embed": 105, "ocr": 106}

#: Six small unloadable consumers around one big target on an 8 GiB card.
SMALL = config_of(
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
COEXIST = config_of(
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
        preparing = self.lifecycle.prepare(name)
        return succeed(None) if preparing is None else preparing

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


def snapshot(registry: Registry) -> list[ConsumerState]:
    """A copy of what the registry knows of each consumer now."""
    return [attrs.evolve(state) for state in registry]
