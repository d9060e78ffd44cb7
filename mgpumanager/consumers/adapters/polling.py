"""The waits adapters share: a server asked again and again until it says yes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from mgpumanager.config.document import ConsumerConfig
from mgpumanager.consumers.control import ConsumerControl, ControlFailed


def sleep(clock: IReactorTime, seconds: float) -> Awaitable[None]:
    return deferLater(clock, seconds, lambda: None)


async def poll_until(
    clock: IReactorTime,
    interval: float,
    seconds: float,
    check: Callable[[], Awaitable[bool]],
) -> bool:
    """
    Ask ``check`` now and every ``interval`` seconds until it says yes
    (then ``True``) or ``seconds`` have passed (then ``False``).
    """
    deadline = clock.seconds() + seconds
    while True:
        if await check():
            return True
        if clock.seconds() >= deadline:
            return False
        await sleep(clock, interval)


def configured_unload(consumer: ConsumerConfig) -> str | None:
    """What :func:`unload_as_configured` does, in words; None where it cannot."""
    if consumer.unload is not None:
        return f"{consumer.unload.method} {consumer.unload.path}"
    if consumer.systemd_unit is not None:
        return f"systemctl stop {consumer.systemd_unit}"
    return None


async def unload_as_configured(
    control: ConsumerControl, consumer: ConsumerConfig, timeout: float
) -> None:
    """
    The configured ``unload`` route, or ``systemctl stop`` of the unit.

    :raises ControlFailed: it failed, or there is neither.
    """
    if consumer.unload is not None:
        await control.call_route(consumer, consumer.unload, timeout)
    elif consumer.systemd_unit is not None:
        await control.systemctl("stop", consumer.systemd_unit, timeout)
    else:
        raise ControlFailed("no unload route or systemd unit")
