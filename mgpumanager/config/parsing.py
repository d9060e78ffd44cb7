"""
Load ``consumers.yaml`` into :class:`~mgpumanager.config.document.Config`, or
refuse it with one clear line.

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

import yaml

from mgpumanager.config.agent import AgentConfig
from mgpumanager.config.cards import CardConfig, GpuConfig, card_size, one_card, parse_cards
from mgpumanager.config.consumers import ENDPOINT_KINDS, parse_consumer
from mgpumanager.config.document import (
    OPENAI_ROLES,
    Config,
    LifecycleConfig,
    OpenAIConfig,
    ProbeConfig,
    QueueConfig,
)
from mgpumanager.config.reader import (
    ConfigError,
    Convert,
    Reader,
    default_of,
    file_keys,
    kind_of,
)
from mgpumanager.config.scheduling import SchedulingConfig, SchedulingConfigError
from mgpumanager.config.sections import audio_prefix, auth, command, queue_depth


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
