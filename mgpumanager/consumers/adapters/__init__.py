"""
Consumer adapters: what the daemon must know of one kind of server.

Real servers do not all do one GPU job per HTTP exchange.  ComfyUI answers
``POST /prompt`` at once and generates for minutes afterwards; Ollama keeps a
model on the card for minutes after its answer and frees it on
``keep_alive: 0``.  An adapter teaches the daemon one server's semantics and
supplies its defaults; the core asks the adapter and never tests a server's
name.  ``generic`` is a plain HTTP server whose GPU work ends with its answer.

Adapters are found by name: the ones shipped here, and any object providing
:class:`IConsumerAdapter` (and Twisted's ``IPlugin``) that a third party
installs as a Twisted plugin: a module-level object in a module of a
``twisted/plugins/`` directory on the path, the same discovery ``twistd`` uses
for services.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType, ModuleType

import attrs
from twisted.plugin import getPlugins

from mgpumanager.config.document import Config, ConfigError, ConsumerConfig
from mgpumanager.config.parsing import load_config
from mgpumanager.consumers.adapters.base import AdapterDefaults, IConsumerAdapter
from mgpumanager.consumers.adapters.comfyui import ComfyAdapter
from mgpumanager.consumers.adapters.generic import GenericAdapter
from mgpumanager.consumers.adapters.ollama import OllamaAdapter

__all__ = [
    "AdapterDefaults",
    "IConsumerAdapter",
    "UnknownAdapter",
    "adapter_named",
    "known",
    "load_resolved_config",
    "with_adapter_defaults",
]

_BUILT_IN: dict[str, IConsumerAdapter] = {
    adapter.name: adapter for adapter in (GenericAdapter(), ComfyAdapter(), OllamaAdapter())
}


class UnknownAdapter(LookupError):
    """No shipped adapter and no installed plugin has this name."""


def _plugins(package: ModuleType | None) -> Iterator[IConsumerAdapter]:
    yield from getPlugins(IConsumerAdapter, package)


def known(plugins: ModuleType | None = None) -> Mapping[str, IConsumerAdapter]:
    """
    Every adapter by name: the shipped ones, then plugins (which cannot
    replace them).

    :param plugins: the package searched for plugins; ``twisted.plugins``
        (every ``twisted/plugins/`` directory on the path) by default.
    """
    found = dict(_BUILT_IN)
    for plugin in _plugins(plugins):
        found.setdefault(plugin.name, plugin)
    return found


def adapter_named(name: str, plugins: ModuleType | None = None) -> IConsumerAdapter:
    """
    The adapter called ``name``.

    :raises UnknownAdapter: naming the adapters that exist.
    """
    adapter = _BUILT_IN.get(name)
    if adapter is not None:
        return adapter
    everyone = known(plugins)
    if name in everyone:
        return everyone[name]
    raise UnknownAdapter(f"unknown adapter {name!r}; known: {', '.join(sorted(everyone))}")


def with_adapter_defaults(config: Config) -> Config:
    """
    ``config`` with each consumer's adapter defaults filled in where the file
    is silent (the file always wins), so that nothing after start-up needs to
    know which routes were written and which were implied.

    :raises ConfigError: for an adapter no one provides, or a consumer left
        without a health route.
    """
    consumers = {
        name: _with_defaults(config.source, consumer)
        for name, consumer in config.consumers.items()
    }
    return attrs.evolve(config, consumers=MappingProxyType(consumers))


def _with_defaults(source: str, consumer: ConsumerConfig) -> ConsumerConfig:
    key_path = f"consumers.{consumer.name}"
    try:
        defaults = adapter_named(consumer.adapter).defaults()
    except UnknownAdapter as e:
        raise ConfigError(source, f"{key_path}.adapter", str(e)) from None
    health = consumer.health or defaults.health
    if health is None:
        raise ConfigError(
            source, f"{key_path}.health", f"required (adapter {consumer.adapter} has no default)"
        )
    return attrs.evolve(
        consumer,
        health=health,
        paths=MappingProxyType({**defaults.paths, **consumer.paths}),
        load=consumer.load or defaults.load,
        unload=consumer.unload or defaults.unload,
    )


def load_resolved_config(path: str) -> Config:
    """
    Read, validate and complete a configuration file: what the daemon runs
    on, what ``mgpumanager check`` checks, and what a reload re-reads.

    :raises ConfigError: with the file, the key path and the problem.
    """
    return with_adapter_defaults(load_config(path))
