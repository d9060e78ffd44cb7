"""The interface every consumer adapter provides, and the values it trades in."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Protocol

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface

from mgpumanager.common.answers import Answer, JsonObject
from mgpumanager.config.document import ConsumerConfig, Route
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.state.registry import ConsumerState, ModelResidency

__all__ = [
    "AdapterDefaults",
    "FollowedWork",
    "IConsumerAdapter",
    "ModelResidency",
    "Observation",
]

#: How much of a relayed answer the proxy keeps for :meth:`IConsumerAdapter.follow`
#: (the status and body, as the client got them, in a :class:`~mgpumanager.common.answers.Answer`).
ANSWER_COPY_BYTES = 64 * 1024
#: What one completion poll may take.
POLL_TIMEOUT_SECONDS = 10.0


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


@attrs.frozen
class Observation:
    """
    What a server says about its own residency, read at each health probe.

    :ivar resident: whether its models are on the card, when it can tell.
    :ivar measured_mib: the VRAM it reports holding, when it reports it.
    :ivar models: the models it holds, for servers that hold several.
    """

    resident: bool | None = None
    measured_mib: int | None = None
    models: tuple[ModelResidency, ...] | None = None
    #: Its own queue holds work, whoever sent it.
    busy: bool | None = None


class FollowedWork(Protocol):
    """
    Work an answer started on the server beyond itself, followed to its end
    while the job keeps the GPU (see :meth:`IConsumerAdapter.follow`).
    """

    @property
    def work_id(self) -> str:
        """The server's name for the work (a ComfyUI prompt id)."""

    def until_done(self) -> Awaitable[str]:
        """
        Fires with how the work ended: ``"done"``, ``"gone"``,
        ``"probe failed"`` or ``"timeout"``.
        """


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
        consumer: ConsumerConfig, method: str, path: str, body: JsonObject | None
    ) -> str | None:
        """
        The kind of GPU job a request sent straight to this server is, or
        None when it is not a GPU job and passes without waiting for the GPU.

        :param path: the normalised request path (see :mod:`mgpumanager.common.paths`).
        :param body: the request's JSON object when :meth:`wants_body` asked
            for it and it was small enough and valid; else None.
        """

    def observe(
        control: ConsumerControl,
        consumer: ConsumerConfig,
        health: JsonObject | None,
        timeout: float,
    ) -> Awaitable[Observation | None]:
        """
        The server's own account of its residency, or ``None`` when it gives
        none beyond its health answer.  Called after every successful health
        probe.

        :param health: the health answer, when it was a JSON object.
        :param timeout: what each call it makes may take.
        :raises ControlFailed: the server could not be asked.
        """

    def can_unload(consumer: ConsumerConfig) -> bool:
        """Whether the daemon has any way to take this server off the card."""

    def unload_by(consumer: ConsumerConfig) -> str | None:
        """
        What :meth:`unload` does to this server, in a few words, as
        ``mgpumanager check`` prints it; None when :meth:`can_unload` is false.
        """

    def unload(
        control: ConsumerControl, state: ConsumerState, clock: IReactorTime, timeout: float
    ) -> Awaitable[None]:
        """
        Take the server's models off the card; fires once the server says
        they are gone (the lifecycle then watches the card itself).

        :param timeout: what one unload call may take.
        :raises ControlFailed: the server refused, failed or stayed busy.
        """

    def completes_later(method: str, path: str) -> bool:
        """
        Whether a GPU job sent as ``method path`` goes on after its HTTP
        answer, so that :meth:`follow` must see it to its end.

        :param path: the normalised request path.
        """

    def follow(
        control: ConsumerControl,
        state: ConsumerState,
        answer: Answer,
        clock: IReactorTime,
    ) -> FollowedWork | None:
        """
        The work an answer started beyond itself, which the job keeps the GPU
        for until it ends; ``None`` when the answer started nothing (an error,
        no id): the job ends with it.
        """

    def settle(
        control: ConsumerControl, state: ConsumerState, clock: IReactorTime
    ) -> Awaitable[None]:
        """
        An exchange that may have started work beyond itself broke before
        its answer said which (the client left mid-answer): fires once the
        server is idle again, or has stopped answering, so that the GPU is
        not handed on under work nobody follows.
        """


class WorkEndsWithTheAnswer:
    """
    For servers whose GPU work is over when their answer is: nothing to
    follow after the exchange (every adapter but ComfyUI's).
    """

    def completes_later(self, method: str, path: str) -> bool:
        return False

    def follow(
        self,
        control: ConsumerControl,
        state: ConsumerState,
        answer: Answer,
        clock: IReactorTime,
    ) -> None:
        return None

    async def settle(
        self, control: ConsumerControl, state: ConsumerState, clock: IReactorTime
    ) -> None:
        return None
