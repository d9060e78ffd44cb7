"""
Tests for :mod:`mgpumanager.web.agent` and the ``agent`` key: the line HAProxy
reads (the weight from the queue, ``drain`` by one rule), read from a real
scheduler, served on a real loopback port that a reload moves and closes, and
a configuration mistake named by its key.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mgpumanager.config.document import ConfigError, QueueConfig
from mgpumanager.config.parsing import parse_config
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.agent import AgentPort, HostLoad, agent_line, scheduler_load
from tests.builders import consumer
from tests.daemon import free_port


def _config(agent: dict[str, Any] | None = None, **top: Any) -> Any:
    document: dict[str, Any] = {"consumers": {"llm": consumer(9002, "llm")},
                                "routing": {"llm": "llm"}, **top}
    if agent is not None:
        document["agent"] = agent
    return parse_config(document)


@pytest.mark.parametrize(("waiting", "share"), [
    (0, 100), (1, 50), (2, 33), (3, 25), (4, 20), (7, 13), (98, 1), (199, 1), (10_000, 1),
])
def test_the_weight_is_the_share_of_an_idle_host_and_never_zero(waiting: int, share: int) -> None:
    assert agent_line(waiting, drains=False) == b"up ready %d%%\n" % share


def test_drain_is_a_line_of_its_own() -> None:
    assert agent_line(0, drains=True) == b"drain\n"
    assert agent_line(5, drains=True) == b"drain\n"


@pytest.mark.parametrize(("stopping", "full", "yielded", "drains"), [
    (False, False, False, False),
    (True, False, False, True),
    (False, True, False, True),
    (False, False, True, True),
])
def test_one_rule_drains_the_host(stopping: bool, full: bool, yielded: bool,
                                  drains: bool) -> None:
    load = HostLoad(lambda: 2, lambda: full, lambda: stopping, lambda: yielded)
    assert load.drains() is drains
    assert load.line() == (b"drain\n" if drains else b"up ready 33%\n")


def test_without_the_yield_feature_no_card_is_ever_yielded() -> None:
    assert HostLoad(lambda: 0, lambda: False, lambda: False).line() == b"up ready 100%\n"


def test_the_load_of_a_scheduler_counts_waiting_jobs_not_running_ones() -> None:
    config = _config()
    clock = Clock()
    scheduler = GpuScheduler(clock, Registry(config), queue=QueueConfig(max_depth=2))
    stopping = [False]
    load = scheduler_load(scheduler, lambda: stopping[0])
    assert load.line() == b"up ready 100%\n"
    running: Deferred[None] = Deferred()
    scheduler.submit("llm", lambda: running)
    assert scheduler.in_flight == 1
    assert load.line() == b"up ready 100%\n", "a running job is not a waiting one"
    waiting = [scheduler.submit("llm", Deferred) for _ in range(2)]
    assert load.line() == b"drain\n", "two waiting of two: a new job would be refused"
    waiting[1].cancel()
    assert load.line() == b"up ready 50%\n"
    stopping[0] = True
    assert load.line() == b"drain\n"
    for job in waiting:
        job.addErrback(lambda failure: failure.trap(CancelledError))
    waiting[0].cancel()
    running.callback(None)


def test_agent_listen_is_read_and_checked_by_key() -> None:
    assert _config().agent.listen is None
    assert str(_config({"listen": "127.0.0.1:8771"}).agent.listen) == "127.0.0.1:8771"
    with pytest.raises(ConfigError, match=r"agent\.listen: must be host:port"):
        _config({"listen": "8771"})
    with pytest.raises(ConfigError, match=r"agent\.lisen: .*did you mean 'listen'"):
        _config({"lisen": "127.0.0.1:8771"})
    with pytest.raises(ConfigError, match=r"agent\.listen: port 8770 is already taken by listen"):
        _config({"listen": "127.0.0.1:8770"}, listen="127.0.0.1:8770")
    with pytest.raises(ConfigError, match=r"consumers\.llm\.listen: port 8771 is already taken "
                                          r"by agent\.listen"):
        _config({"listen": "127.0.0.1:8771"},
                consumers={"llm": consumer(9002, "llm", listen="127.0.0.1:8771")})


async def _read_line(port: int) -> bytes:
    """Connect, read until the agent closes, as HAProxy does."""
    received: list[bytes] = []
    closed: Deferred[None] = Deferred()

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            closed.callback(None)

    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Reader())
    await closed
    return b"".join(received)


async def _refused(port: int) -> None:
    with pytest.raises(ConnectError):
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())


@pytest_twisted.ensureDeferred
async def test_the_port_answers_one_line_moves_on_reload_and_closes() -> None:
    first, second = free_port(), free_port()
    config = _config({"listen": f"127.0.0.1:{first}"})
    waiting = [0]
    load = HostLoad(lambda: waiting[0], lambda: False, lambda: False)
    agent = AgentPort(config, load, reactor, lambda description: True)
    await agent.apply(config)
    assert await _read_line(first) == b"up ready 100%\n"
    waiting[0] = 3
    assert await _read_line(first) == b"up ready 25%\n", "read afresh at each connection"

    await agent.apply(config)
    assert await _read_line(first) == b"up ready 25%\n", "an unchanged address stays open"
    await agent.apply(attrs.evolve(config, agent=_config({"listen": f"127.0.0.1:{second}"}).agent))
    assert await _read_line(second) == b"up ready 25%\n"
    await _refused(first)
    await agent.apply(_config())
    await _refused(second)
    assert agent.address is None
    await agent.stopService()


@pytest_twisted.ensureDeferred
async def test_a_port_beyond_loopback_is_warned_about() -> None:
    config = _config({"listen": f"127.0.0.1:{free_port()}"})
    load = HostLoad(lambda: 0, lambda: False, lambda: False)
    warnings: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        agent = AgentPort(config, load, reactor, lambda description: False)
        await agent.apply(config)
        await agent.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [event["listen"] for event in warnings] == [str(config.agent.listen)]
    assert "not loopback only" in warnings[0]["log_format"]
