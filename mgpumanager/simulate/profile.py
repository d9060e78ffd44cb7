"""
What a simulated host is made of: its cards, and each server's size, timings, port
and cards.  :mod:`mgpumanager.simulate.host` builds the host from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

#: Fake process ids, stable so that a reader of the card file can tell them apart.
PIDS = {"mvoice": 4101, "ollama": 4102, "comfyui": 4103, "whisper": 4104, "speech": 4105}


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
    #: Each card's MiB when the host has several; empty: one card of ``total_mib``.
    cards_mib: tuple[int, ...] = ()
    #: The cards each server sits on, by consumer name (see :meth:`cards_of`).
    placement: Mapping[str, tuple[int, ...]] = attrs.field(
        factory=lambda: MappingProxyType({})
    )
    #: The uuid of each card whose uuid a configuration names, by NVML index.
    card_uuids: Mapping[int, str] = attrs.field(factory=lambda: MappingProxyType({}))
    voice: ServerProfile = ServerProfile(
        3000, load_seconds=1.0, work_seconds=0.5, unload_seconds=0.3, preload=True
    )
    ollama: ServerProfile = ServerProfile(6000, load_seconds=1.0, work_seconds=0.2)
    comfy: ServerProfile = ServerProfile(9000, load_seconds=2.0, work_seconds=2.0)
    whisper: ServerProfile = ServerProfile(
        1500, load_seconds=0.5, work_seconds=0.3, unload_seconds=0.3, preload=True
    )
    speech: ServerProfile = ServerProfile(800, load_seconds=0.5, work_seconds=0.3)
    #: ComfyUI answers ``POST /prompt`` once the image is made rather than at once
    #: (the real one answers at once; this is for clients that want the old shape).
    comfy_answers_when_done: bool = False
    keep_alive_seconds: float = 300.0
    ollama_lines: int = 20
    ollama_interval: float = 0.05
    state_path: str | None = None
    audio_dir: str | None = None
    interface: str = "127.0.0.1"
    #: Where the control API (:mod:`mgpumanager.simulate.control`) listens, as
    #: ``(host, port)``; ``None``: it is not opened.
    control: tuple[str, int] | None = None

    @classmethod
    def fast(cls, **changes: Any) -> HostConfig:
        """The default sizes with timings of a few milliseconds, for test suites."""
        quick = {"load_seconds": 0.01, "work_seconds": 0.02, "unload_seconds": 0.01}
        base = cls()
        profiles = {
            name: attrs.evolve(getattr(base, name), **quick)
            for name in ("voice", "ollama", "comfy", "whisper", "speech")
        }
        return attrs.evolve(base, **{**profiles, "ollama_interval": 0.01, **changes})

    def scaled(self, scale: float) -> HostConfig:
        """
        Every duration divided by ``scale``, so that a replay runs hours of
        traffic in minutes; the sizes stay as they are.
        """
        if scale <= 0:
            raise ValueError(f"time scale must be above 0, not {scale}")
        timings = ("load_seconds", "work_seconds", "unload_seconds")
        profiles = {
            name: attrs.evolve(
                getattr(self, name),
                **{key: getattr(getattr(self, name), key) / scale for key in timings},
            )
            for name in PROFILE_FIELDS.values()
        }
        return attrs.evolve(
            self,
            **profiles,
            keep_alive_seconds=self.keep_alive_seconds / scale,
            ollama_interval=self.ollama_interval / scale,
        )

    @property
    def card_sizes(self) -> tuple[int, ...]:
        """Every card's MiB, in NVML order."""
        return self.cards_mib or (self.total_mib,)

    def cards_of(self, name: str) -> tuple[int, ...]:
        """
        The cards the server ``name`` sits on: as placed, else card 0, except
        ComfyUI on the last card of a host with several (image work on a card of
        its own, the common two-card set-up).
        """
        if name in self.placement:
            return self.placement[name]
        last = len(self.card_sizes) - 1
        return (last,) if name == "comfyui" else (0,)

    def with_base_port(self, base_port: int) -> HostConfig:
        """Ports ``base_port`` and up for mvoice, ollama, comfyui, whisper, speech."""
        return self.with_ports({name: base_port + i for i, name in enumerate(PIDS)})

    def with_ports(self, ports: dict[str, int]) -> HostConfig:
        """The servers named in ``ports`` (by consumer name) on those ports."""
        changes = {
            field: attrs.evolve(getattr(self, field), port=ports[name])
            for name, field in PROFILE_FIELDS.items()
            if name in ports
        }
        return attrs.evolve(self, **changes)


#: The :class:`HostConfig` field holding each server's profile, by consumer name.
PROFILE_FIELDS = {
    "mvoice": "voice",
    "ollama": "ollama",
    "comfyui": "comfy",
    "whisper": "whisper",
    "speech": "speech",
}
