"""
Load ``consumers.yaml`` into immutable values, or refuse it with one clear line.

Validation happens once, before anything listens: a daemon that starts with half a
configuration schedules the GPU wrongly in ways that only show up as an OOM hours
later, so every mistake an operator can make in the file is an error here, named by
file and key path (``consumers.comfyui.paths.image.path: required``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import yaml

from mgpumanager.config.agent import AgentConfig
from mgpumanager.config.cards import (
    CardConfig,
    GpuConfig,
    card_size,
    one_card,
    parse_cards,
    unknown_card,
)
from mgpumanager.config.consumers import (
    ADAPTER_ONLY_KEYS,
    DEFAULT_ADAPTER,
    ENDPOINT_KINDS,
    CompletionConfig,
    ConsumerConfig,
    Timeouts,
    parse_consumer,
)
from mgpumanager.config.reader import (
    DEFAULT_LISTEN,
    FILE_KEY,
    LISTEN_BACKLOG,
    ConfigError,
    Convert,
    Listen,
    Reader,
    Route,
    default_of,
    file_keys,
    kind_of,
)
from mgpumanager.config.scheduling import SchedulingConfig, SchedulingConfigError
from mgpumanager.config.sections import audio_prefix, auth, command, queue_depth

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
    "load_config",
    "parse_config",
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


def load_config(path: str | Path) -> Config:
    """
    Read and validate a configuration file.

    :raises ConfigError: for a file that cannot be read, is not YAML, or does
        not describe a usable daemon.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, "", f"cannot read: {e}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ConfigError(source, "", f"not valid YAML: {problem}") from None
    return parse_config(document, source)


def parse_config(document: object, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document; see :func:`load_config`."""
    read = Reader(source)
    if not isinstance(document, dict):
        raise read.fail("", f"the top level must be a mapping, not {kind_of(document)}")
    top = read.mapping(document, "", file_keys(Config))
    gpu = read.optional(top, "gpu", "", _gpu_section(read), GpuConfig())
    none: tuple[CardConfig, ...] = ()
    gpus = read.optional(top, "gpus", "", partial(parse_cards, read, gpu=gpu), none)
    indexes = tuple(card.index for card in gpus or one_card(gpu))
    consumers_table = read.section(top, "consumers", "", None)
    if not consumers_table:
        raise read.fail("consumers", "at least one consumer is required")
    consumers = {
        name: parse_consumer(read, name, value, consumers_table, indexes)
        for name, value in consumers_table.items()
    }

    def consumer_name(value: object, key_path: str) -> str:
        return read.consumer(value, key_path, consumers)

    def routing(value: object, key_path: str) -> Mapping[str, str]:
        table = read.mapping(value, key_path, ENDPOINT_KINDS)
        return MappingProxyType({
            kind: consumer_name(name, f"{key_path}.{kind}")
            for kind, name in table.items()
            if name is not None
        })

    def models(value: object, key_path: str) -> Mapping[str, str]:
        table = read.mapping(value, key_path, None)
        for model in table:
            if not model.strip():
                raise read.fail(key_path, "model ids must be non-empty strings")
        return MappingProxyType({
            model: consumer_name(name, f"{key_path}.{model}") for model, name in table.items()
        })

    config = Config(
        source=source,
        gpu=gpu,
        gpus=gpus,
        consumers=MappingProxyType(dict(sorted(consumers.items()))),
        **read.values(
            top,
            "",
            Config,
            {
                "consumers": None,
                "listen": read.listen,
                "gpu": None,
                "gpus": None,
                "probes": read.nested(ProbeConfig),
                "lifecycle": read.nested(LifecycleConfig, {"systemctl": partial(command, read)}),
                "routing": routing,
                "audio_proxy": consumer_name,
                "audio_path_prefix": partial(audio_prefix, read),
                "limits": partial(_limits, read),
                "queue": read.nested(QueueConfig, {"max_depth": partial(queue_depth, read)}),
                "allowed_origins": lambda v, p: frozenset(read.names(v, p)),
                "auth": partial(auth, read),
                "scheduling": partial(_scheduling, read),
                "agent": read.nested(AgentConfig, {"listen": read.listen}),
                "openai": read.nested(
                    OpenAIConfig, {**dict.fromkeys(OPENAI_ROLES, consumer_name), "models": models}
                ),
            },
        ),
    )
    _check_ports(read, config, consumers_table)
    return config


def _scheduling(read: Reader, value: object, key_path: str) -> SchedulingConfig:
    try:
        return SchedulingConfig.from_mapping(value)
    except SchedulingConfigError as e:
        raise read.fail(f"{key_path}.{e.key}" if e.key != key_path else key_path,
                        e.problem) from None


def _gpu_section(read: Reader) -> Convert:
    return read.nested(GpuConfig, {"total_mib": partial(card_size, read)})


def _limits(read: Reader, value: object, key_path: str) -> int:
    table = read.mapping(value, key_path, ("max_body_mib",))
    default: int = default_of(Config, "max_body_mib")
    limit = read.optional(table, "max_body_mib", key_path, read.size_mib, default)
    if limit < 1:
        raise read.fail(f"{key_path}.max_body_mib", "must be at least 1")
    return limit


def _check_ports(read: Reader, config: Config, order: Mapping[str, Any]) -> None:
    """Every port the daemon opens is its own: a second listener there would fail."""
    taken = {config.listen.port: "listen"}
    agent = config.agent.listen
    if agent is not None and agent.port in taken:
        raise read.fail("agent.listen", f"port {agent.port} is already taken by listen")
    if agent is not None:
        taken[agent.port] = "agent.listen"
    for name in order:
        listen = config.consumers[name].listen
        if listen is None:
            continue
        key_path = f"consumers.{name}.listen"
        if listen.port in taken:
            owner = taken[listen.port]
            raise read.fail(key_path, f"port {listen.port} is already taken by {owner}")
        taken[listen.port] = key_path
