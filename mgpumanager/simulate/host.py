"""
A whole simulated GPU host: five inference servers on loopback sharing its card (or cards).

The default profile is a 16 GiB card on which the servers fit in some combinations
and not in others, which is exactly what the daemon exists to manage:

==========  ========  =================================================
server      MiB       memory habit
==========  ========  =================================================
card        16384     total
mvoice      3000      explicit load/unload; loaded at start
whisper     1500      systemd unit; loaded at start
comfyui     9000      lazy: loads on the first prompt, frees on /api/free
ollama      6000      loads on demand, unloads itself after keep-alive
speech      800       OpenAI-style TTS over HTTP/1.0; lazy, admin unload
==========  ========  =================================================

(Ollama's small embedding model, 600 MiB, is a runner of its own when used.)

* ollama + comfyui + mvoice = 18000 > 16384: a mixed workload sent directly OOMs.
* ollama + comfyui = 15000 fits; ollama + mvoice + whisper = 10500 fits.

So a scheduler must take mvoice and whisper off the card before ComfyUI loads, and
ComfyUI off before mvoice loads again.  Ollama, like the real one, never runs out
of memory itself: it puts on the GPU what fits and offloads the rest to the CPU.

With several cards (``cards_mib``) each server sits on the cards ``placement`` gives
it, by default ComfyUI on the last card and the others on card 0, and holds its
model's size on each of its cards.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from typing import Any, cast

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

from mgpumanager.simulate.card import SimulatedCard
from mgpumanager.simulate.cards import CardBank, CardMemory
from mgpumanager.simulate.consumers import SimComfy, SimOllama, SimSpeech, SimVoice, SimWhisper
from mgpumanager.simulate.control import ControlApi
from mgpumanager.simulate.guests import GuestBook
from mgpumanager.simulate.ollama_models import DEFAULT_EMBED_MODEL, runner_owner
from mgpumanager.simulate.profile import PIDS, PROFILE_FIELDS, HostConfig, ServerProfile
from mgpumanager.simulate.recording import ActivityMeter
from mgpumanager.simulate.server import QuietSite, SimServer, default_clock

__all__ = [
    "PIDS",
    "PROFILE_FIELDS",
    "HostConfig",
    "ServerProfile",
    "SimulatedHost",
    "consumer_pids",
]

log = Logger()

def consumer_pids() -> dict[str, frozenset[int]]:
    """
    The fake process ids of each server, as a reader of the card file sees them:
    Ollama's second model runs in a runner process of its own.
    """
    card = SimulatedCard(1)
    for owner, pid in PIDS.items():
        card.register(owner, pid)
    runner = card.pid_of(runner_owner("ollama", DEFAULT_EMBED_MODEL, first=False))
    pids = {name: frozenset({pid}) for name, pid in PIDS.items()}
    return {**pids, "ollama": pids["ollama"] | {runner}}


class SimulatedHost:
    """
    Builds the servers around the cards (:class:`CardBank`) and serves them.

    :param config: sizes, timings, ports.
    :param clock: the time source of the servers (the global reactor by default).

    Attributes: ``cards`` (in NVML order), ``card`` (the first), ``voice``, ``ollama``,
    ``comfy``, ``whisper``, ``servers`` (by consumer name: ``mvoice``, ``ollama``,
    ``comfyui``, ``whisper``, ``speech``), ``ports`` (actual ports once started),
    ``guests`` (a :class:`GuestBook`), ``control_url`` (the control API's, once
    started, when ``config.control`` opens it) and ``gpu_jobs``, an
    :class:`ActivityMeter` shared by all the servers: its ``max_active`` says
    whether the GPU ever ran two jobs at once.
    """

    def __init__(
        self, config: HostConfig | None = None, clock: IReactorTime | None = None
    ) -> None:
        self.config = config if config is not None else HostConfig()
        cfg = self.config
        self.clock = clock if clock is not None else default_clock()
        self.bank = CardBank(cfg.card_sizes, cfg.state_path, cfg.card_uuids)
        self.cards = self.bank.cards
        self.card = self.cards[0]
        for owner, pid in PIDS.items():
            self.bank.register(owner, pid)
        self.guests = GuestBook(self.cards, self.bank.pids)
        self.control_url: str | None = None
        self.gpu_jobs = ActivityMeter()
        self._own_audio_dir = cfg.audio_dir is None
        self.audio_dir = cfg.audio_dir or tempfile.mkdtemp(prefix="mgpu-sim-audio-")
        self.voice = SimVoice(
            self._memory("mvoice"), audio_dir=self.audio_dir, **self._options(cfg.voice)
        )
        self.ollama = SimOllama(
            self._memory("ollama"),
            keep_alive_seconds=cfg.keep_alive_seconds,
            num_lines=cfg.ollama_lines,
            interval=cfg.ollama_interval,
            **self._options(cfg.ollama),
        )
        self.comfy = SimComfy(
            self._memory("comfyui"),
            answer_when_done=cfg.comfy_answers_when_done,
            **self._options(cfg.comfy),
        )
        self.speech = SimSpeech(self._memory("speech"), **self._options(cfg.speech))
        self.whisper = SimWhisper(
            self._memory("whisper"), preload=cfg.whisper.preload, **self._options(cfg.whisper)
        )
        self.servers: dict[str, SimServer] = {
            "mvoice": self.voice,
            "ollama": self.ollama,
            "comfyui": self.comfy,
            "whisper": self.whisper,
            "speech": self.speech,
        }
        self._profiles: dict[str, ServerProfile] = {
            name: getattr(cfg, field) for name, field in PROFILE_FIELDS.items()
        }
        self.ports: dict[str, int] = {}
        self._listening: list[IListeningPort] = []
        self._connections: list[_Connections] = []

    def _memory(self, name: str) -> CardMemory:
        return self.bank.memory_for(self.config.cards_of(name))

    @property
    def oom_count(self) -> int:
        """Allocations refused, on every card."""
        return self.bank.oom_count

    def _options(self, profile: ServerProfile) -> dict[str, Any]:
        return {
            "model_mib": profile.model_mib,
            "load_seconds": profile.load_seconds,
            "work_seconds": profile.work_seconds,
            "unload_seconds": profile.unload_seconds,
            "clock": self.clock,
            "gpu_meter": self.gpu_jobs,
        }

    def start(self, reactor: IReactorTCP | None = None) -> Deferred[None]:
        """
        Listen on loopback and load what the profile preloads.

        :return: fires once every server listens and the preloaded models are on
            the card, so a caller sees the steady state a real host boots into.
        """
        return Deferred.fromCoroutine(self._start(reactor))

    async def _start(self, reactor: IReactorTCP | None) -> None:
        tcp = reactor if reactor is not None else cast(IReactorTCP, default_clock())
        cfg = self.config
        try:
            for name, server in self.servers.items():
                connections = _Connections(server.site())
                endpoint = TCP4ServerEndpoint(
                    tcp, self._profiles[name].port, interface=self.config.interface
                )
                port = await endpoint.listen(connections)
                self._listening.append(port)
                self._connections.append(connections)
                self.ports[name] = port.getHost().port
            await self.whisper.start()
            for name, server in self.servers.items():
                if self._profiles[name].preload and name != "whisper":
                    await server.model.load()
            if cfg.control is not None:
                # Last: a guest sent as soon as it answers finds the host's steady state.
                await self._open_control(tcp, *cfg.control)
        except BaseException:
            await self.stop()
            raise
        log.info("simulated host up: {urls}", urls=self.urls())

    async def _open_control(self, tcp: IReactorTCP, interface: str, port: int) -> None:
        control = ControlApi(self.cards, self.guests)
        connections = _Connections(QuietSite(control.app.resource()))
        listening = await TCP4ServerEndpoint(tcp, port, interface=interface).listen(connections)
        self._listening.append(listening)
        self._connections.append(connections)
        self.control_url = f"http://{interface}:{listening.getHost().port}"
        log.info("simulated host's control API at {url}", url=self.control_url)

    def stop(self) -> Deferred[None]:
        """
        Drop open connections, stop listening and free the card, like killing the
        processes; removes the audio directory if the host made it.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for connections in self._connections:
            connections.drop_all()
        self._connections = []
        listening, self._listening = self._listening, []
        # Aborted connections are lost on the next reactor turn, before the ports
        # close; by then Klein has cancelled their jobs, so closing the servers
        # below fails no request that still has a client to answer.
        await gatherResults([maybeDeferred(port.stopListening) for port in listening])
        for server in self.servers.values():
            server.close()
        self.guests.leave_all()
        self.control_url = None
        if self._own_audio_dir:
            shutil.rmtree(self.audio_dir, ignore_errors=True)

    def urls(self) -> dict[str, str]:
        """Base URL of every listening server, by consumer name."""
        return {
            name: f"http://{self.config.interface}:{port}" for name, port in self.ports.items()
        }

    def daemon_config(self, listen: str = "127.0.0.1:8770") -> dict[str, Any]:
        """
        A ``consumers.yaml`` document for a daemon in front of this host (call after
        :meth:`start`, which assigns the ports).

        Whisper's unit is driven through ``python -m mgpumanager.simulate.systemctl``,
        which reaches the simulated unit over HTTP instead of systemd.
        """
        urls = self.urls()
        cfg = self.config
        document = self._one_card_config(urls, listen)
        if len(cfg.card_sizes) > 1:
            document["gpu"].pop("total_mib")
            document = {
                "listen": listen,
                "gpu": document.pop("gpu"),
                "gpus": [{"index": i, "total_mib": mib} for i, mib in enumerate(cfg.card_sizes)],
                **document,
            }
            for name, consumer in document["consumers"].items():
                consumer["gpus"] = list(cfg.cards_of(name))
        return document

    def _one_card_config(self, urls: dict[str, str], listen: str) -> dict[str, Any]:
        cfg = self.config
        return {
            "listen": listen,
            "gpu": {"total_mib": cfg.total_mib, "reserved_mib": 0, "poll_interval_seconds": 0.2},
            "probes": {"interval_seconds": 0.5, "timeout_seconds": 2},
            "lifecycle": {
                "systemctl": [
                    sys.executable,
                    "-m",
                    "mgpumanager.simulate.systemctl",
                    "--url",
                    urls["whisper"],
                ]
            },
            "routing": {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"},
            "audio_proxy": "mvoice",
            "consumers": {
                "mvoice": {
                    "url": urls["mvoice"],
                    "health": {"path": "/api/health"},
                    "paths": {
                        "tts": {"path": "/api/synthesize"},
                        "stt": {"path": "/api/transcribe"},
                    },
                    "vram_resident_mib": cfg.voice.model_mib,
                    "load": {"method": "POST", "path": "/api/admin/load"},
                    "unload": {"method": "POST", "path": "/api/admin/unload"},
                    "can_coexist_with": ["ollama"],
                    "priority": 2,
                },
                "ollama": {
                    "url": urls["ollama"],
                    "adapter": "ollama",
                    "can_coexist_with": ["mvoice", "whisper"],
                },
                "comfyui": {
                    "url": urls["comfyui"],
                    "adapter": "comfyui",
                    "vram_resident_mib": cfg.comfy.model_mib,
                    "completion": {"poll_seconds": 0.05},
                },
                "whisper": {
                    "url": urls["whisper"],
                    "health": {"path": "/health"},
                    "paths": {"stt": {"path": "/inference"}},
                    "vram_resident_mib": cfg.whisper.model_mib,
                    "systemd_unit": self.whisper.unit,
                },
                "speech": {
                    "url": urls["speech"],
                    "health": {"path": "/health"},
                    "paths": {"tts": {"path": "/v1/audio/speech"}},
                    "vram_resident_mib": cfg.speech.model_mib,
                    "load": {"method": "POST", "path": "/admin/load"},
                    "unload": {"method": "POST", "path": "/admin/unload"},
                },
            },
        }


class _Connections(WrappingFactory):
    """
    Keeps the site's open connections so :meth:`SimulatedHost.stop` can drop them: a
    stopped host must look like a dead process to a client holding a pooled
    keep-alive connection, not like a server that still answers.
    """

    noisy = False

    def drop_all(self) -> None:
        for wrapper in list(self.protocols):
            if wrapper.transport is not None:
                wrapper.transport.abortConnection()  # type: ignore[attr-defined]
