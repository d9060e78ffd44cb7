"""
The simulated host a replay runs against: three servers on one simulated
card, sized like the models of the study (an image model of 13 GiB that loads
in 15 s, an 8 GiB LLM in 4 s, a 3 GiB voice model for speech and transcription
in 2 s), every duration divided by the time scale.

With several cards the image model sits alone on the last one and the others
share card 0: the common two-card set-up, and the one that tells what a
second card buys a mixed trace (no image ever waits for a voice or a chat).

Each server loads only when told to and does, per job, the ``work_seconds``
its request body names, so the trace's service times arrive as sent.  The
card counts refused allocations: a replay that ends with any is a scheduler
that let two models collide.
"""

from __future__ import annotations

from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.web.server import Request

from mgpumanager.simulate.cards import CardBank, CardMemory
from mgpumanager.simulate.host import PIDS
from mgpumanager.simulate.server import SimServer, number_field


@attrs.frozen
class StudyModel:
    """One server: its consumer name, job kinds, size and (unscaled) timings."""

    name: str
    kinds: tuple[str, ...]
    mib: int
    load_seconds: float
    unload_seconds: float = 1.0


#: Sizes chosen so that swaps are real: any two fit on a 24 GiB card, all
#: three (24576 MiB, plus the daemon's cushion) do not; on a 16 GiB card the
#: image model fits beside neither, the LLM and the voice model together.
MODELS = (
    StudyModel("comfyui", ("image",), 13312, 15.0, 2.0),
    StudyModel("ollama", ("llm",), 8192, 4.0),
    StudyModel("mvoice", ("tts", "stt"), 3072, 2.0),
)
CARD_MIB = 24576
#: The ``card16`` shape: an LLM and the image model cannot share it.
SMALL_CARD_MIB = 16384


class StudyServer(SimServer):
    """Health, explicit load and unload, and one work route."""

    app = Klein()

    def __init__(self, card: CardMemory, model: StudyModel, scale: float,
                 **options: Any) -> None:
        super().__init__(card, name=model.name, model_mib=model.mib,
                         load_seconds=model.load_seconds / scale,
                         unload_seconds=model.unload_seconds / scale, **options)
        self.study = model
        self.loads = 0
        self.unloads = 0

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return self.json(request, self.health_fields())

    @app.route("/load", methods=["POST"])
    async def load(self, request: Request) -> bytes:
        if not self.model.loaded:
            self.loads += 1
        return await self.load_answer(request)

    @app.route("/unload", methods=["POST"])
    def unload(self, request: Request) -> bytes:
        if self.model.loaded:
            self.unloads += 1
        return self.unload_answer(request)

    @app.route("/run", methods=["POST"])
    async def work_route(self, request: Request) -> bytes:
        async def job() -> bytes:
            seconds = number_field(self.json_body(request), "work_seconds", 0.0)
            if not self.model.loaded:
                # A server used without a load loads on demand, as a cold start.
                self.loads += 1
                await self.model.load()
            await self.work(seconds)
            return self.json(request, {"done": True})

        return await self.run_job(request, job)


class StudyHost:
    """
    The servers, listening on loopback ports of their own.

    :param total_mib: the card's size on a one-card host.
    :param cards_mib: each card's size on a host with several (then
        ``total_mib`` is unused): the image model on the last card, the
        others on card 0.
    """

    def __init__(self, total_mib: int, scale: float, state_path: str | None, clock: Any,
                 cards_mib: tuple[int, ...] = ()) -> None:
        self.scale = scale
        self.bank = CardBank(cards_mib or (total_mib,), state_path)
        self.card = self.bank.cards[0]
        for model in MODELS:
            self.bank.register(model.name, PIDS[model.name])
        self.servers = [
            StudyServer(self.bank.memory_for(self.cards_of(model)), model, scale, clock=clock)
            for model in MODELS
        ]
        self.ports: dict[str, int] = {}
        self._listening: list[IListeningPort] = []

    def cards_of(self, model: StudyModel) -> tuple[int, ...]:
        """The cards ``model``'s server sits on."""
        last = len(self.bank.cards) - 1
        return (last,) if "image" in model.kinds else (0,)

    @property
    def oom_count(self) -> int:
        """Allocations refused, on every card."""
        return self.bank.oom_count

    async def start(self, reactor: Any) -> None:
        for server in self.servers:
            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                server.site())
            self._listening.append(port)
            self.ports[server.name] = port.getHost().port

    def stop(self) -> Deferred[Any]:
        for server in self.servers:
            server.close()
        return gatherResults([maybeDeferred(port.stopListening) for port in self._listening])

    def consumers(self) -> dict[str, Any]:
        """The ``consumers`` section of a daemon config in front of this host."""
        several = len(self.bank.cards) > 1
        return {
            server.name: {
                **({"gpus": list(self.cards_of(server.study))} if several else {}),
                "url": f"http://127.0.0.1:{self.ports[server.name]}",
                "health": {"path": "/health"},
                "paths": {kind: {"path": "/run"} for kind in server.study.kinds},
                "vram_resident_mib": server.study.mib,
                "load": {"method": "POST", "path": "/load"},
                "unload": {"method": "POST", "path": "/unload"},
            }
            for server in self.servers
        }

    def swap_seconds(self) -> tuple[int, float, float]:
        """Unloads, and seconds spent unloading and loading, in trace seconds."""
        unloads = sum(server.unloads for server in self.servers)
        unloading = sum(s.unloads * s.study.unload_seconds for s in self.servers)
        loading = sum(s.loads * s.study.load_seconds for s in self.servers)
        return unloads, unloading, loading
