"""A plain HTTP inference server: its GPU work ends with its answer."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mgpumanager.common.answers import JsonObject
from mgpumanager.common.paths import under
from mgpumanager.config.document import ConsumerConfig
from mgpumanager.consumers.adapters.base import (
    AdapterDefaults,
    IConsumerAdapter,
    Observation,
    WorkEndsWithTheAnswer,
)
from mgpumanager.consumers.adapters.polling import configured_unload, unload_as_configured
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.state.registry import ConsumerState

#: The kind of a GPU job that matches none of the consumer's endpoint kinds.
OTHER_KIND = "other"


@implementer(IPlugin, IConsumerAdapter)
class GenericAdapter(WorkEndsWithTheAnswer):
    """
    Part 1's behaviour.  Through the passthrough, a request is a GPU job when
    it matches one of ``gpu_routes`` (every ``POST`` when there are none).
    """

    name = "generic"

    def defaults(self) -> AdapterDefaults:
        return AdapterDefaults()

    def wants_body(self, method: str, path: str) -> bool:
        return False

    def gpu_kind(
        self,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        body: JsonObject | None,
    ) -> str | None:
        routes = consumer.gpu_routes
        if routes:
            if not any(r.method == method and under(path, r.path) for r in routes):
                return None
        elif method != "POST":
            return None
        return kind_of_path(consumer, path)

    async def observe(
        self,
        control: ConsumerControl,
        consumer: ConsumerConfig,
        health: JsonObject | None,
        timeout: float,
    ) -> Observation | None:
        # Its health answer's ``loaded``/``gpu_resident_mib`` say it all.
        return None

    def can_unload(self, consumer: ConsumerConfig) -> bool:
        return consumer.unloadable

    def unload_by(self, consumer: ConsumerConfig) -> str | None:
        return configured_unload(consumer)

    async def unload(
        self, control: ConsumerControl, state: ConsumerState, clock: IReactorTime, timeout: float
    ) -> None:
        await unload_as_configured(control, state.config, timeout)


def kind_of_path(consumer: ConsumerConfig, path: str) -> str:
    """
    The endpoint kind whose route ``path`` is (or is under); else the
    consumer's only kind; else ``other``.
    """
    for kind, route in consumer.paths.items():
        if under(path, route.path):
            return kind
    if len(consumer.paths) == 1:
        return next(iter(consumer.paths))
    return OTHER_KIND
