"""
A consumer that never accepts the connection: the job fails with a 502 after
``timeouts.connect_seconds``, instead of waiting for the response timeout.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest

from mgpumanager.common.errors import ApiError
from mgpumanager.config.parsing import parse_config
from mgpumanager.relay.endpoints import ReusedEndpoints
from mgpumanager.relay.proxy import ConsumerProxy


@pytest.fixture
def black_hole() -> Iterator[int]:
    """
    A port whose accept queue is full: Linux drops further SYNs, so a connect
    neither succeeds nor is refused, like a consumer on a hung host.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel accepts past a full backlog")
    except (TimeoutError, BlockingIOError):
        pass
    finally:
        probe.close()
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_connect_that_never_completes_is_a_502_after_connect_seconds(
    black_hole: int,
) -> None:
    config = parse_config(
        {
            "routing": {"tts": "voice"},
            "consumers": {
                "voice": {
                    "url": f"http://127.0.0.1:{black_hole}",
                    "health": {"path": "/health"},
                    "paths": {"tts": {"path": "/api/tts"}},
                    "timeouts": {"connect_seconds": 0.4, "response_seconds": 10},
                }
            },
        }
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor, 0.4), pool=pool)
    proxy = ConsumerProxy(lambda consumer: agent, reactor)
    request = DummyRequest([b"v1", b"tts"])
    request.method = b"POST"
    request.uri = b"/v1/tts"
    request.content = io.BytesIO(b"{}")
    started = time.monotonic()
    with pytest.raises(ApiError) as refused:
        await proxy.relay(request, config.consumers["voice"], "POST", "/api/tts")
    elapsed = time.monotonic() - started
    assert refused.value.status == 502
    assert refused.value.kind.code == "consumer_unreachable"
    assert "connect timed out" in refused.value.message
    assert 0.3 < elapsed < 3.0
