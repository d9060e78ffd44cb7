"""The interface every consumer adapter provides, and the defaults it supplies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from zope.interface import Attribute, Interface

from mgpumanager.config import ConsumerConfig, Route


@attrs.frozen
class AdapterDefaults:
    """
    What a server of this kind answers on, when the operator does not say:
    explicit keys in the configuration always win.
    """

    health: Route | None = None
    paths: Mapping[str, Route] = attrs.field(factory=dict)
    load: Route | None = None
    unload: Route | None = None


class IConsumerAdapter(Interface):
    """One kind of inference server, as the scheduler must see it."""

    name = Attribute("The name operators give in ``consumers.<n>.adapter``.")

    def defaults() -> AdapterDefaults:
        """The routes this kind of server has unless the configuration says otherwise."""

    def wants_body(method: str, path: str) -> bool:
        """
        Whether :meth:`gpu_kind` needs the request's JSON body to decide
        (it is read only then, and only up to a bound).

        :param path: the normalised request path.
        """

    def gpu_kind(
        consumer: ConsumerConfig, method: str, path: str, body: Mapping[str, Any] | None
    ) -> str | None:
        """
        The kind of GPU job a request sent straight to this server is, or
        None when it is not a GPU job and passes without waiting for the GPU.

        :param path: the normalised request path (see :mod:`mgpumanager.paths`).
        :param body: the request's JSON object when :meth:`wants_body` asked
            for it and it was small enough and valid; else None.
        """
