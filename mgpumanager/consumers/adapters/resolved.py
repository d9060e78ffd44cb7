"""
Each consumer's adapter, resolved once when the daemon starts and at each
reload, rather than looked up by name wherever one is needed (finding a
plugin adapter scans Twisted's plugins).
"""

from __future__ import annotations

from types import ModuleType

from mgpumanager.config.document import Config, ConsumerConfig
from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.consumers.adapters.base import IConsumerAdapter


class Adapters:
    """
    The adapters the configuration names, by name.

    :param config: the configuration the daemon starts with.
    :param plugins: the package searched for plugin adapters
        (``twisted.plugins`` by default).
    :raises UnknownAdapter: for a name no one provides (a loaded configuration
        was checked for that already).
    """

    def __init__(self, config: Config, plugins: ModuleType | None = None) -> None:
        self._plugins = plugins
        self._by_name: dict[str, IConsumerAdapter] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """
        Resolve the adapters a reloaded configuration names.  Those it no
        longer names stay known: a removed consumer's running job may still
        need its adapter to finish.
        """
        names = {consumer.adapter for consumer in config.consumers.values()}
        resolved = {name: adapter_named(name, self._plugins) for name in sorted(names)}
        self._by_name = {**self._by_name, **resolved}

    def of(self, consumer: ConsumerConfig) -> IConsumerAdapter:
        """The adapter of ``consumer``."""
        adapter = self._by_name.get(consumer.adapter)
        if adapter is None:
            # A consumer of no configuration this daemon took (built by hand):
            # resolved now, and once.
            adapter = self._by_name[consumer.adapter] = adapter_named(
                consumer.adapter, self._plugins
            )
        return adapter
