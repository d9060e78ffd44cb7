"""
The validated configuration as immutable values: :class:`Config`, the whole of
``consumers.yaml``, and the small sections that have no module of their own.

Kept apart from :mod:`mgpumanager.config.parsing`, which builds them from the
file: nearly all of the daemon reads a :class:`Config` and never parses one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs

from mgpumanager.config.agent import AgentConfig
from mgpumanager.config.cards import CardConfig, GpuConfig, one_card, unknown_card
from mgpumanager.config.consumers import (
    ADAPTER_ONLY_KEYS,
    DEFAULT_ADAPTER,
    ENDPOINT_KINDS,
    CompletionConfig,
    ConsumerConfig,
    Timeouts,
)
from mgpumanager.config.reader import (
    DEFAULT_LISTEN,
    FILE_KEY,
    LISTEN_BACKLOG,
    ConfigError,
    Listen,
    Route,
)
from mgpumanager.config.scheduling import SchedulingConfig

__all__ = [
    "ADAPTER_ONLY_KEYS",
    "DEFAULT_ADAPTER",
    "DEFAULT_AUDIO_PREFIX",
    "DEFAULT_LISTEN",
    "ENDPOINT_KINDS",
    "LISTEN_BACKLOG",
    "CardConfig",
    "CompletionConfig",
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "GpuConfig",
    "LifecycleConfig",
    "Listen",
    "OpenAIConfig",
    "ProbeConfig",
    "QueueConfig",
    "Route",
    "Timeouts",
]

DEFAULT_AUDIO_PREFIX = "/api/audio/"
#: The OpenAI-compatible route families, each served by one named consumer.
OPENAI_ROLES = ("chat", "speech", "transcriptions", "images")


@attrs.frozen
class ProbeConfig:
    """How often consumers' health routes are called, and for how long at most."""

    interval_seconds: float = 5.0
    timeout_seconds: float = 3.0


@attrs.frozen
class LifecycleConfig:
    """
    How consumers are unloaded and loaded when the scheduler makes room.

    ``systemctl`` is the command prefix used for consumers managed by a systemd
    unit, so a deployment can say ``[sudo, -n, systemctl]``.
    """

    unload_timeout_seconds: float = 30.0
    load_timeout_seconds: float = 120.0
    verify_interval_seconds: float = 0.25
    verify_timeout_seconds: float = 10.0
    settle_seconds: float = 1.0
    systemctl: tuple[str, ...] = ("systemctl",)


@attrs.frozen
class QueueConfig:
    """Admission control: how many jobs may wait, and for how long."""

    max_depth: int = 512
    max_wait_seconds: float = 600.0


@attrs.frozen
class OpenAIConfig:
    """
    Which consumer serves each family of OpenAI-compatible routes, and which
    serves a given ``model`` first (a request naming it goes there).
    """

    chat: str | None = None
    speech: str | None = None
    transcriptions: str | None = None
    images: str | None = None
    models: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))


@attrs.frozen(kw_only=True)
class Config:
    """
    The whole validated configuration.  Its fields are the file's top-level keys,
    in the file's order, except where ``FILE_KEY`` says otherwise.
    """

    source: str = attrs.field(metadata={FILE_KEY: None})
    listen: Listen = DEFAULT_LISTEN
    #: Every card's defaults (``gpus`` entries inherit them).
    gpu: GpuConfig = attrs.field(factory=GpuConfig)
    #: The cards the file lists under ``gpus`` (none: card 0 alone, see :attr:`cards`).
    gpus: tuple[CardConfig, ...] = ()
    probes: ProbeConfig = ProbeConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    routing: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))
    audio_proxy: str | None = None
    audio_path_prefix: str = DEFAULT_AUDIO_PREFIX
    consumers: Mapping[str, ConsumerConfig]
    shutdown_grace_seconds: float = 30.0
    max_body_mib: int = attrs.field(default=512, metadata={FILE_KEY: "limits"})
    queue: QueueConfig = QueueConfig()
    allowed_origins: frozenset[str] = frozenset()
    #: The bearer token every route but /healthz requires, when set.
    auth_token: bytes | None = attrs.field(default=None, repr=False, metadata={FILE_KEY: "auth"})
    openai: OpenAIConfig = OpenAIConfig()
    scheduling: SchedulingConfig = attrs.field(factory=SchedulingConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)

    def __attrs_post_init__(self) -> None:
        # A config built by hand (tests, tools) must not name a card it does not manage.
        managed = self.card_indexes
        for consumer in self.consumers.values():
            for card in consumer.cards:
                if card not in managed:
                    raise ValueError(f"consumer {consumer.name!r} {unknown_card(card, managed)}")

    @property
    def cards(self) -> tuple[CardConfig, ...]:
        """
        The managed cards, in the file's order; without ``gpus``, card 0 alone
        with the settings of ``gpu`` (derived, so that a copy with another
        ``gpu`` has them).
        """
        return self.gpus or one_card(self.gpu)

    @property
    def card_indexes(self) -> tuple[int, ...]:
        """The numbers of the managed cards, in the file's order."""
        return tuple(card.index for card in self.cards)

    def card(self, index: int) -> CardConfig:
        """
        The managed card numbered ``index``.

        :raises KeyError: for a card the daemon does not manage.
        """
        for card in self.cards:
            if card.index == index:
                return card
        raise KeyError(index)

    def body_limit_for(self, kind: str | None) -> int:
        """The request-body limit in bytes for a job of ``kind`` (None: not a job)."""
        target = self.route_for(kind) if kind is not None else None
        return self.body_limit_of(target[0] if target is not None else None)

    def body_limit_of(self, consumer: ConsumerConfig | None) -> int:
        """The request-body limit in bytes of requests to ``consumer`` (None: the global one)."""
        limit = consumer.max_body_mib if consumer is not None else None
        return (limit or self.max_body_mib) * 1024 * 1024

    def may_coexist(self, first: str, second: str) -> bool:
        """Coexistence is symmetric: either side listing the other is enough."""
        return (
            second in self.consumers[first].can_coexist_with
            or first in self.consumers[second].can_coexist_with
        )

    def route_for(self, kind: str) -> tuple[ConsumerConfig, Route] | None:
        """The consumer and route serving an endpoint kind, if configured."""
        name = self.routing.get(kind)
        if name is None:
            return None
        consumer = self.consumers[name]
        route = consumer.paths.get(kind)
        if route is None:
            return None
        return consumer, route
