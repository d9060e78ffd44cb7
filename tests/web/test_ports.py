"""
Per-server ports: ``consumers.<name>.listen`` answers exactly like
``/upstream/<name>/`` at its root, behind the same guard and body limit, and
:meth:`ConsumerPorts.apply` opens and closes ports as the configuration says.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol

from mgpumanager.common.exposure import endpoint_is_loopback
from mgpumanager.config.parsing import parse_config
from mgpumanager.web.ports import ConsumerPorts
from tests.builders import consumer
from tests.daemon import free_port
from tests.web.test_upstream import Stage, start_stage, stop_stage


@pytest_twisted.async_yield_fixture
async def stage() -> AsyncIterator[Stage]:
    document = {"consumers": {"llm": consumer(0, "llm", adapter="ollama", max_body_mib=1)
                              | {"url": "http://127.0.0.1:{llm}"}}}
    started = await start_stage(document, ("llm",))
    yield started
    await stop_stage(started)


@pytest_twisted.ensureDeferred
async def test_a_consumer_port_answers_like_the_passthrough(stage: Stage) -> None:
    port = free_port()
    config = attrs.evolve(stage.config, consumers={
        "llm": attrs.evolve(stage.config.consumers["llm"], listen=_listen(port))
    })
    ports = ConsumerPorts(config, stage.passthrough, reactor, endpoint_is_loopback)
    await ports.apply(config)
    try:
        url = f"http://127.0.0.1:{port}"
        seen = await (await treq.get(url + "/api/tags?x=%2F")).json()
        assert (seen["server"], seen["uri"]) == ("llm", "/api/tags?x=%2F")
        assert stage.scheduler.total_jobs == 0
        answer = await treq.post(url + "/api/chat", data=b'{"messages": []}')
        assert (await answer.json())["uri"] == "/api/chat"
        assert stage.scheduler.total_jobs == 1, "a model call on the port is a GPU job"
        too_big = await treq.post(url + "/api/chat", data=b"x" * (2 * 2**20))
        assert too_big.code == 413
        foreign = await treq.post(url + "/api/chat", data=b"{}",
                                  headers={"origin": "http://evil.example"})
        assert foreign.code == 403
        same_origin = await treq.post(url + "/api/chat", data=b"{}",
                                      headers={"origin": url})
        assert same_origin.code == 200, "a page the port itself serves may post to it"
    finally:
        await ports.apply(attrs.evolve(config, consumers=stage.config.consumers))
    await _refused(port)


@pytest_twisted.ensureDeferred
async def test_apply_moves_a_port_and_stop_closes_it(stage: Stage) -> None:
    first, second = free_port(), free_port()
    base = stage.config.consumers["llm"]

    def listening_on(port: int) -> Any:
        consumers = {"llm": attrs.evolve(base, listen=_listen(port))}
        return attrs.evolve(stage.config, consumers=consumers)

    ports = ConsumerPorts(listening_on(first), stage.passthrough, reactor, endpoint_is_loopback)
    ports.startService()
    await _answers(first)
    await ports.apply(listening_on(second))
    await _answers(second)
    await _refused(first)
    await ports.stopService()
    await _refused(second)


async def _refused(port: int) -> None:
    """Nothing listens on ``port`` any more (a fresh connection, not a pooled one)."""
    with pytest.raises(ConnectError):
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())


async def _answers(port: int) -> None:
    for _ in range(100):
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/")
        except ConnectError:
            continue
        assert json.loads(await response.content())["uri"] == "/"
        return
    raise AssertionError(f"port {port} never answered")


def _listen(port: int) -> Any:
    return parse_config({"listen": f"127.0.0.1:{port}", "consumers": {"x": consumer(1)}}).listen

