"""
A whole simulated GPU host: four inference servers on loopback sharing one card.

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
==========  ========  =================================================

* ollama + comfyui + mvoice = 18000 > 16384: a mixed workload sent directly OOMs.
* ollama + comfyui = 15000 fits; ollama + mvoice + whisper = 10500 fits.

So a scheduler must take mvoice and whisper off the card before ComfyUI loads, and
ComfyUI off before mvoice loads again.  Ollama, like the real one, never runs out
of memory itself: it puts on the GPU what fits and offloads the rest to the CPU.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import http
from twisted.web.server import Site

from mgpumanager.simulate.card import SimulatedCard
from mgpumanager.simulate.consumers import SimComfy, SimOllama, SimVoice, SimWhisper
from mgpumanager.simulate.recording import ActivityMeter
from mgpumanager.simulate.server import SimServer, default_clock

log = Logger()

#: Fake process ids, stable so that a reader of the card file can tell them apart.
PIDS = {"mvoice": 4101, "ollama": 4102, "comfyui": 4103, "whisper": 4104}


@attrs.frozen
class ServerProfile:
    """One server's size, timings and port (0 = any free port)."""

    model_mib: int
    port: int = 0
    load_seconds: float = 0.0
    work_seconds: float = 0.05
    unload_seconds: float = 0.1
    preload: bool = False


@attrs.frozen
class HostConfig:
    """
    The simulated host.  The defaults are the documented 16 GiB profile with
    human-scale timings (seconds) for demos; :meth:`fast` shrinks them for tests.
    """

    total_mib: int = 16384
    voice: ServerProfile = ServerProfile(
        3000, load_seconds=1.0, work_seconds=0.5, unload_seconds=0.3, preload=True
    )
    ollama: ServerProfile = ServerProfile(6000, load_seconds=1.0, work_seconds=0.2)
    comfy: ServerProfile = ServerProfile(9000, load_seconds=2.0, work_seconds=2.0)
    whisper: ServerProfile = ServerProfile(
        1500, load_seconds=0.5, work_seconds=0.3, unload_seconds=0.3, preload=True
    )
    keep_alive_seconds: float = 300.0
    ollama_lines: int = 20
    ollama_interval: float = 0.05
    state_path: str | None = None
    audio_dir: str | None = None
    interface: str = "127.0.0.1"

    @classmethod
    def fast(cls, **changes: Any) -> HostConfig:
        """The default sizes with timings of a few milliseconds, for test suites."""
        quick = {"load_seconds": 0.01, "work_seconds": 0.02, "unload_seconds": 0.01}
        base = cls()
        profiles = {
            name: attrs.evolve(getattr(base, name), **quick)
            for name in ("voice", "ollama", "comfy", "whisper")
        }
        return attrs.evolve(base, **{**profiles, "ollama_interval": 0.01, **changes})

    def with_base_port(self, base_port: int) -> HostConfig:
        """Ports ``base_port`` .. ``base_port + 3`` for mvoice, ollama, comfyui, whisper."""
        return attrs.evolve(
            self,
            voice=attrs.evolve(self.voice, port=base_port),
            ollama=attrs.evolve(self.ollama, port=base_port + 1),
            comfy=attrs.evolve(self.comfy, port=base_port + 2),
            whisper=attrs.evolve(self.whisper, port=base_port + 3),
        )


class SimulatedHost:
    """
    Builds the four servers around one :class:`SimulatedCard` and serves them.

    :param config: sizes, timings, ports.
    :param clock: the time source of the servers (the global reactor by default).

    Attributes: ``card``, ``voice``, ``ollama``, ``comfy``, ``whisper``, ``servers``
    (by consumer name: ``mvoice``, ``ollama``, ``comfyui``, ``whisper``), ``ports``
    (actual ports once started) and ``gpu_jobs``, an :class:`ActivityMeter` shared by
    all four servers: its ``max_active`` says whether the GPU ever ran two jobs at once.
    """

    def __init__(
        self, config: HostConfig | None = None, clock: IReactorTime | None = None
    ) -> None:
        self.config = config if config is not None else HostConfig()
        cfg = self.config
        self.clock = clock if clock is not None else default_clock()
        self.card = SimulatedCard(cfg.total_mib, state_path=cfg.state_path)
        for owner, pid in PIDS.items():
            self.card.register(owner, pid)
        self.gpu_jobs = ActivityMeter()
        self._own_audio_dir = cfg.audio_dir is None
        self.audio_dir = cfg.audio_dir or tempfile.mkdtemp(prefix="mgpu-sim-audio-")
        self.voice = SimVoice(self.card, audio_dir=self.audio_dir, **self._options(cfg.voice))
        self.ollama = SimOllama(
            self.card,
            keep_alive_seconds=cfg.keep_alive_seconds,
            num_lines=cfg.ollama_lines,
            interval=cfg.ollama_interval,
            **self._options(cfg.ollama),
        )
        self.comfy = SimComfy(self.card, **self._options(cfg.comfy))
        self.whisper = SimWhisper(
            self.card, preload=cfg.whisper.preload, **self._options(cfg.whisper)
        )
        self.servers: dict[str, SimServer] = {
            "mvoice": self.voice,
            "ollama": self.ollama,
            "comfyui": self.comfy,
            "whisper": self.whisper,
        }
        self._profiles = {
            "mvoice": cfg.voice,
            "ollama": cfg.ollama,
            "comfyui": cfg.comfy,
            "whisper": cfg.whisper,
        }
        self.ports: dict[str, int] = {}
        self._listening: list[IListeningPort] = []
        self._connections: list[_Connections] = []

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
        try:
            for name, server in self.servers.items():
                connections = _Connections(_QuietSite(server.resource()))
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
        except BaseException:
            await self.stop()
            raise
        log.info("simulated host up: {urls}", urls=self.urls())

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
                    "health": {"path": "/api/version"},
                    "paths": {"llm": {"path": "/api/generate"}},
                    "vram_managed": True,
                    "can_coexist_with": ["mvoice", "whisper"],
                },
                "comfyui": {
                    "url": urls["comfyui"],
                    "health": {"path": "/system_stats"},
                    "paths": {"image": {"path": "/prompt"}},
                    "vram_resident_mib": cfg.comfy.model_mib,
                    "unload": {
                        "method": "POST",
                        "path": "/api/free",
                        "body": '{"unload_models":true,"free_memory":true}',
                    },
                },
                "whisper": {
                    "url": urls["whisper"],
                    "health": {"path": "/health"},
                    "paths": {"stt": {"path": "/inference"}},
                    "vram_resident_mib": cfg.whisper.model_mib,
                    "systemd_unit": self.whisper.unit,
                },
            },
        }


class _QuietSite(Site):
    """
    A site without an access log: four simulated servers logging every request
    would drown the daemon's own log in a demo.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


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
