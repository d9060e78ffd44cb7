"""
Ollama's model residency: each model is loaded on first use, by a runner process of
its own, and stays for its ``keep_alive`` after the last request that used it.

This is what ``/api/ps`` shows and what the daemon's ollama adapter reads: several
models may be resident at once, each with its own size on the card and expiry time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.model import GpuModel
from mgpumanager.simulate.server import Refusal

log = Logger()

_MIB = 1024 * 1024
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
#: The small embedding model every simulated Ollama has pulled beside its LLM.
DEFAULT_EMBED_MODEL = "sim-embed:latest"
#: How Ollama shows "never expires": a date centuries away.
_FOREVER = datetime(2318, 1, 1, tzinfo=UTC)


def parse_keep_alive(value: object, default: float | None) -> float | None:
    """
    Ollama's ``keep_alive``: seconds as a number, or a Go duration such as ``"5m"``
    or ``"1h30m"``; negative means forever (``None``), ``0`` unload at once.

    :raises Refusal: 400 for anything else.
    """
    if value is None:
        return default
    seconds: float
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise Refusal(400, f"invalid keep_alive {value!r}") from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise Refusal(400, f"invalid keep_alive {value!r}")
    return None if seconds < 0 else seconds


def rfc3339(seconds: float) -> str:
    """A time as Ollama's JSON writes it."""
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@attrs.frozen
class CatalogueModel:
    """A model Ollama has pulled: what ``/api/tags`` lists."""

    name: str
    mib: int
    family: str = "llama"
    parameter_size: str = "7B"
    embedding: bool = False

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode("utf-8")).hexdigest()

    @property
    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": "Q4_K_M",
        }

    def tag(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": "2026-01-01T00:00:00Z",
            "size": self.mib * _MIB,
            "digest": self.digest,
            "details": self.details,
        }


def runner_owner(server: str, model: str, first: bool) -> str:
    """The card owner of a model's runner: the server's own name for its first model."""
    return server if first else f"{server}:{model}"


class Runners:
    """
    The resident models of one Ollama server.

    :param catalogue: every model it can load, the first being its default.
    :param default_keep_alive: seconds, or ``None`` for forever.
    """

    def __init__(
        self,
        card: CardMemory,
        clock: IReactorTime,
        server: str,
        catalogue: list[CatalogueModel],
        default_keep_alive: float | None,
        load_seconds: float,
        unload_seconds: float,
    ) -> None:
        self.catalogue = {m.name: m for m in catalogue}
        self.default_keep_alive = default_keep_alive
        self.models = {
            m.name: GpuModel(
                card,
                runner_owner(server, m.name, i == 0),
                m.mib,
                clock,
                load_seconds,
                unload_seconds,
                offload_to_cpu=True,  # Ollama offloads layers rather than failing
            )
            for i, m in enumerate(catalogue)
        }
        self._clock = clock
        self._server = server
        self._active = dict.fromkeys(self.models, 0)
        self._expiry: dict[str, IDelayedCall] = {}
        self._expires_at: dict[str, float | None] = {}

    def find(self, name: str) -> CatalogueModel:
        """
        :raises Refusal: 404 as Ollama answers for a model it has not pulled.
        """
        model = self.catalogue.get(name) or self.catalogue.get(f"{name}:latest")
        if model is None:
            raise Refusal(404, f'model "{name}" not found, try pulling it first')
        return model

    @contextmanager
    def using(self, name: str, keep_alive: float | None) -> Iterator[GpuModel]:
        """Hold ``name`` for one request; its keep-alive starts when the last one ends."""
        self._cancel(name)
        self._active[name] += 1
        try:
            yield self.models[name]
        finally:
            self._active[name] -= 1
            if self._active[name] == 0 and self.models[name].loaded:
                self.keep(name, keep_alive)

    def keep(self, name: str, keep_alive: float | None) -> None:
        """Set ``name``'s expiry: ``None`` never, ``0`` unload now."""
        self._cancel(name)
        if keep_alive is None:
            self._expires_at[name] = None
        elif keep_alive == 0:
            self.unload(name)
        else:
            self._expires_at[name] = self._clock.seconds() + keep_alive
            self._expiry[name] = self._clock.callLater(keep_alive, self._expire, name)

    def unload(self, name: str) -> None:
        self._cancel(name)
        self._expires_at.pop(name, None)
        if self.models[name].loaded or self.models[name].loading:
            self.models[name].unload()

    def ps(self) -> list[dict[str, Any]]:
        """``/api/ps``'s ``models``: the loaded ones, most recently used first."""
        entries = []
        for name, model in self.models.items():
            if not model.loaded:
                continue
            entry = self.catalogue[name]
            expires = self._expires_at.get(name, self._clock.seconds())
            when = _FOREVER.isoformat() if expires is None else rfc3339(expires)
            entries.append(
                {
                    "name": name,
                    "model": name,
                    "size": entry.mib * _MIB,
                    "size_vram": (entry.mib - model.offloaded_mib) * _MIB,
                    "digest": entry.digest,
                    "details": entry.details,
                    "expires_at": when.replace("+00:00", "Z"),
                    "context_length": 4096,
                }
            )
        return entries

    def close(self) -> None:
        for name, model in self.models.items():
            self._cancel(name)
            model.close()

    def _cancel(self, name: str) -> None:
        call = self._expiry.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _expire(self, name: str) -> None:
        self._expiry.pop(name, None)
        log.info(
            "{server}: keep-alive of {model} expired, unloading", server=self._server, model=name
        )
        self.unload(name)
