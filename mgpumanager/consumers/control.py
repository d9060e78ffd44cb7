"""
Talking to a consumer's control surface: health routes, load and unload routes,
server-specific admin calls, and the ``systemctl`` of consumers run as units.

Every such call needs the same care: a time limit that says it was one, a capped
read of the answer (a misbehaving server must not make us buffer megabytes), and
a short, path-free reason when the connection fails.  :class:`ConsumerControl`
does that once, so the lifecycle, the health prober and per-server adapters only
decide what an answer means.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocol, IReactorTime

from mgpumanager.common.answers import Answer, JsonObject
from mgpumanager.common.deadline import within
from mgpumanager.config.document import Config, ConsumerConfig, Route
from mgpumanager.consumers.bodies import read_body
from mgpumanager.consumers.commands import CommandResult
from mgpumanager.relay.failures import classify_call_failure

#: The most of an answer read unless a caller says otherwise (for error messages).
MAX_ANSWER = 64 * 1024

class HttpResponse(Protocol):
    """The part of a treq (or Twisted) response we use."""

    @property
    def code(self) -> int: ...

    def deliverBody(self, protocol: IProtocol) -> None: ...


class HttpClient(Protocol):
    """The part of treq's ``HTTPClient`` we use (``StubTreq`` in tests)."""

    def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: dict[str | bytes, list[str | bytes]] | None = None,
        allow_redirects: bool = True,
        unbuffered: bool = False,
    ) -> Awaitable[HttpResponse]: ...


class CommandRunner(Protocol):
    """Runs an external command with a time limit (``systemctl stop …``)."""

    def __call__(self, argv: Sequence[str], timeout: float) -> Deferred[CommandResult]: ...


class ControlFailed(Exception):
    """
    A control call failed: no connection, no answer in time, a refusing answer
    (:meth:`ConsumerControl.call_route`) or a failed command.

    :param message: names the call and says how it failed.
    :param cause: the failure alone, without the call ("connection refused").
    :param timed_out: whether the time limit ran out.
    """

    def __init__(self, message: str, cause: str | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause if cause is not None else message
        self.timed_out = timed_out


class ConsumerControl:
    """
    :param client: sends the requests; answers are read unbuffered and capped.
    :param clock: enforces each call's time limit.
    :param run_command: runs ``systemctl``.
    :param systemctl: the ``systemctl`` command line prefix (``sudo -n systemctl``).
    """

    def __init__(
        self,
        client: HttpClient,
        clock: IReactorTime,
        run_command: CommandRunner,
        systemctl: Sequence[str] = ("systemctl",),
    ) -> None:
        self._client = client
        self._clock = clock
        self._run_command = run_command
        #: The command prefix for units (a reload may change it).
        self._systemctl = tuple(systemctl)

    def reconfigure(self, config: Config) -> None:
        """Run units with the reloaded ``lifecycle.systemctl`` prefix from the next call on."""
        self._systemctl = tuple(config.lifecycle.systemctl)

    async def request(
        self,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        timeout: float,
        body: bytes | None = None,
        cap: int = MAX_ANSWER,
    ) -> Answer:
        """
        Send one request to ``consumer`` and read its answer, whatever its
        status.  A ``body`` is sent as JSON.

        :raises ControlFailed: no answer within ``timeout`` seconds, or no connection.
        :raises CancelledError: the caller cancelled the call.
        """
        url = consumer.url + path
        headers: dict[str | bytes, list[str | bytes]] | None = (
            {"Content-Type": ["application/json"]} if body is not None else None
        )

        async def call() -> Answer:
            response = await self._client.request(
                method, url, data=body, headers=headers, allow_redirects=False, unbuffered=True
            )
            return Answer(response.code, await read_body(response, cap))

        what = f"{method} {path}"
        try:
            return await within(Deferred.fromCoroutine(call()), timeout, self._clock, what)
        except Exception as e:
            kind, cause = classify_call_failure(e)
            if kind == "cancelled":
                raise CancelledError() from None
            if kind == "timed_out":
                raise ControlFailed(cause, timed_out=True) from None
            raise ControlFailed(f"{what}: {cause}", cause) from None

    async def call_route(self, consumer: ConsumerConfig, route: Route, timeout: float) -> Answer:
        """
        Call a configured route (load, unload) and insist on success.

        :raises ControlFailed: as :meth:`request`, and for an answer other than 2xx.
        """
        answer = await self.request(consumer, route.method, route.path, timeout, route.body)
        if not answer.ok:
            raise ControlFailed(
                f"{route.method} {route.path} answered HTTP {answer.code} {answer.quoted()}"
            )
        return answer

    async def get_json(
        self,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        timeout: float,
        cap: int = MAX_ANSWER,
        body: JsonObject | None = None,
    ) -> tuple[int, JsonObject | None]:
        """
        The status of a call and its answer as a JSON object; ``None`` when
        the answer is not one (not JSON, not an object, or over ``cap`` bytes).

        :raises ControlFailed: as :meth:`request`.
        """
        sent = json.dumps(body).encode("utf-8") if body is not None else None
        answer = await self.request(consumer, method, path, timeout, sent, cap)
        return answer.code, answer.json_object()

    async def systemctl(self, action: str, unit: str, timeout: float) -> CommandResult:
        """
        Run ``systemctl <action> <unit>`` and insist that it succeeds.

        :raises ControlFailed: it exited with an error, or outlived ``timeout``.
        """
        argv = [*self._systemctl, action, unit]
        try:
            result = await self._run_command(argv, timeout)
        except CancelledError:
            raise
        except Exception as e:
            raise ControlFailed(str(e)) from None
        if not result.ok:
            raise ControlFailed(result.describe())
        return result
