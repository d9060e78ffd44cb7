"""
Tests for the response relay's idle timeout (:class:`mgpumanager.relay.streaming.BodyRelay`)
with a ``Clock``: each byte from the consumer restarts the clock, silence aborts
both sides, a client that paused the stream gets a period of its own, and a normal end or a
cancellation leaves no timer behind.  Also :class:`ReusedEndpoints`: one endpoint
per consumer address, and a clear refusal of schemes it cannot serve.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import pytest
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import URI, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from mgpumanager.common.errors import ApiError
from mgpumanager.relay.endpoints import ReusedEndpoints
from mgpumanager.relay.streaming import BodyRelay, UpstreamBroke
from tests.support import assert_no_result, failure_result_of, success_result_of

IDLE = 5.0


class ClientTransport:
    """The client's connection: records aborts."""

    def __init__(self) -> None:
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


class ClientRequest(DummyRequest):
    """
    A ``DummyRequest`` that keeps a push producer the way ``Request`` does
    (``DummyRequest.registerProducer`` would spin on ``resumeProducing``).
    """

    def __init__(self) -> None:
        super().__init__([b""])
        self.transport = ClientTransport()
        self.channel: object | None = object()
        self.producer: Any = None
        self.streaming: bool | None = None
        self.unregistered = 0

    def registerProducer(self, prod: Any, s: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        self.producer = prod
        self.streaming = s

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered += 1


class Relay:
    """A relay wired to a fake client request and a fake upstream connection."""

    def __init__(self, idle: float = IDLE) -> None:
        self.clock = Clock()
        self.request = ClientRequest()
        self.upstream = StringTransport()
        self.finished: Deferred[None] = Deferred(lambda _: self.relay.cancel())
        self.relay = BodyRelay(
            cast(Request, self.request), self.finished, "ollama", self.clock, idle
        )
        self.relay.makeConnection(self.upstream)

    @property
    def aborted(self) -> int:
        return self.request.transport.aborted

    @property
    def producer(self) -> Any:
        return self.request.producer


def test_the_relay_registers_a_streaming_producer_and_starts_the_idle_clock() -> None:
    relay = Relay()

    assert relay.producer is not None
    assert relay.request.streaming is True
    assert len(relay.clock.getDelayedCalls()) == 1
    assert_no_result(relay.finished)


def test_bytes_are_written_to_the_client_as_they_arrive() -> None:
    relay = Relay()

    relay.relay.dataReceived(b'{"response": "a"}\n')
    relay.relay.dataReceived(b'{"response": "b"}\n')

    assert relay.request.written == [b'{"response": "a"}\n', b'{"response": "b"}\n']


def test_each_arrival_restarts_the_idle_clock() -> None:
    relay = Relay()

    for _ in range(10):
        relay.clock.advance(IDLE - 0.5)
        relay.relay.dataReceived(b"x")
    relay.clock.advance(IDLE - 0.01)

    assert relay.aborted == 0
    assert_no_result(relay.finished)
    assert relay.upstream.producerState == "producing"


def test_silence_for_the_idle_time_aborts_both_sides() -> None:
    relay = Relay()
    relay.relay.dataReceived(b"partial")
    relay.clock.advance(IDLE - 0.01)
    assert relay.aborted == 0

    relay.clock.advance(0.01)

    assert relay.aborted == 1
    failure = failure_result_of(relay.finished, UpstreamBroke)
    assert "upstream ollama sent nothing" in str(failure.value)
    assert relay.upstream.producerState == "stopped"
    assert relay.producer is None
    assert relay.request.unregistered == 1
    assert relay.clock.getDelayedCalls() == []


def test_silence_before_the_first_byte_also_aborts() -> None:
    relay = Relay()

    relay.clock.advance(IDLE)

    assert relay.aborted == 1
    failure_result_of(relay.finished, UpstreamBroke)


def test_nothing_is_relayed_after_the_idle_abort() -> None:
    relay = Relay()
    relay.clock.advance(IDLE)
    failure_result_of(relay.finished, UpstreamBroke)

    relay.relay.dataReceived(b"late")
    relay.relay.connectionLost(Failure(ResponseDone()))

    assert relay.request.written == []
    assert relay.aborted == 1


def test_pausing_restarts_the_clock_for_the_client() -> None:
    """A slow client is not a stalled consumer: pausing starts a fresh period."""
    relay = Relay()
    relay.clock.advance(IDLE - 1)

    relay.producer.pauseProducing()
    assert relay.upstream.producerState == "paused"
    relay.clock.advance(IDLE - 0.01)

    assert relay.aborted == 0
    assert_no_result(relay.finished)


def test_a_client_that_never_reads_again_is_cut_off() -> None:
    """Otherwise one stalled client would hold the GPU lock forever."""
    relay = Relay()
    relay.producer.pauseProducing()

    relay.clock.advance(IDLE)

    assert relay.aborted == 1
    failure = failure_result_of(relay.finished, UpstreamBroke)
    assert "the client read nothing" in str(failure.value)
    assert relay.upstream.producerState == "stopped"


def test_bytes_already_in_flight_while_paused_do_not_restart_the_clock() -> None:
    relay = Relay()
    relay.producer.pauseProducing()
    relay.clock.advance(IDLE - 1)

    relay.relay.dataReceived(b"buffered")
    relay.clock.advance(1)

    assert relay.request.written == [b"buffered"]
    assert relay.aborted == 1
    failure_result_of(relay.finished, UpstreamBroke)


def test_resuming_restarts_the_idle_clock_from_zero() -> None:
    relay = Relay()
    relay.clock.advance(IDLE - 1)
    relay.producer.pauseProducing()
    relay.clock.advance(IDLE - 1)

    relay.producer.resumeProducing()
    assert relay.upstream.producerState == "producing"
    relay.clock.advance(IDLE - 0.01)
    assert relay.aborted == 0

    relay.clock.advance(0.01)

    assert relay.aborted == 1
    failure_result_of(relay.finished, UpstreamBroke)


def test_the_normal_end_fires_finished_without_an_abort() -> None:
    relay = Relay()
    relay.relay.dataReceived(b"all of it")
    relay.clock.advance(IDLE - 1)

    relay.relay.connectionLost(Failure(ResponseDone()))

    assert success_result_of(relay.finished) is None
    assert relay.aborted == 0
    assert relay.producer is None
    assert relay.clock.getDelayedCalls() == []
    relay.clock.advance(IDLE * 10)
    assert relay.aborted == 0


def test_the_end_of_an_unframed_body_is_a_normal_end() -> None:
    relay = Relay()

    relay.relay.connectionLost(Failure(http.PotentialDataLoss()))

    assert success_result_of(relay.finished) is None
    assert relay.aborted == 0


def test_the_normal_end_while_paused_fires_finished() -> None:
    relay = Relay()
    relay.producer.pauseProducing()

    relay.relay.connectionLost(Failure(ResponseDone()))

    assert success_result_of(relay.finished) is None
    assert relay.clock.getDelayedCalls() == []


def test_a_broken_upstream_aborts_the_client() -> None:
    relay = Relay()
    relay.relay.dataReceived(b"half")

    relay.relay.connectionLost(Failure(net_error.ConnectionLost()))

    assert relay.aborted == 1
    failure_result_of(relay.finished, UpstreamBroke)
    assert relay.clock.getDelayedCalls() == []


def test_an_upstream_broken_before_its_body_gets_the_client_the_daemons_own_error() -> None:
    """
    Headers alone never reach the client (twisted.web sends them with the
    first byte of the body): aborting here would close the client's
    connection with no answer at all, leaving it to guess whether its POST
    ran.  It gets the daemon's 502 instead, with none of the consumer's headers.
    """
    relay = Relay()
    relay.request.responseHeaders.setRawHeaders(b"content-length", [b"5000"])

    relay.relay.connectionLost(Failure(net_error.ConnectionLost()))

    assert relay.aborted == 0
    failure = failure_result_of(relay.finished, ApiError)
    assert failure.value.kind.code == "consumer_unreachable"
    assert "broke before the answer's body" in failure.value.message
    assert not relay.request.responseHeaders.hasHeader(b"content-length")
    assert relay.clock.getDelayedCalls() == []


def test_cancel_stops_the_upstream_and_leaves_no_timer() -> None:
    relay = Relay()
    relay.relay.dataReceived(b"some")

    relay.relay.cancel()

    assert relay.upstream.producerState == "stopped"
    assert relay.producer is None
    assert relay.clock.getDelayedCalls() == []
    relay.clock.advance(IDLE * 10)
    assert relay.aborted == 0
    assert_no_result(relay.finished)


def test_cancelling_finished_cancels_the_relay_once() -> None:
    relay = Relay()

    relay.finished.cancel()

    failure_result_of(relay.finished, CancelledError)
    assert relay.upstream.producerState == "stopped"
    # The upstream connection then reports its loss: nothing fires twice.
    relay.relay.connectionLost(Failure(net_error.ConnectionAborted()))
    assert relay.producer is None
    relay.clock.advance(IDLE * 10)
    assert relay.aborted == 0
    assert relay.clock.getDelayedCalls() == []


def test_a_client_gone_with_its_channel_is_not_unregistered_from() -> None:
    relay = Relay()
    relay.request.channel = None

    relay.relay.connectionLost(Failure(ResponseDone()))

    assert relay.request.unregistered == 0
    assert relay.producer is None
    assert success_result_of(relay.finished) is None


# --- ReusedEndpoints -------------------------------------------------------------


def uri(text: bytes) -> URI:
    parsed: URI = URI.fromBytes(text)
    return parsed


@pytest.fixture
def endpoints() -> ReusedEndpoints:
    return ReusedEndpoints(MemoryReactorClock(), connect_timeout=5.0)


def test_the_same_address_gets_the_same_endpoint(endpoints: ReusedEndpoints) -> None:
    first = endpoints.endpointForURI(uri(b"http://127.0.0.1:9001/api/synthesize"))
    second = endpoints.endpointForURI(uri(b"http://127.0.0.1:9001/api/other?x=1"))

    assert first is second


def test_another_port_or_host_gets_another_endpoint(endpoints: ReusedEndpoints) -> None:
    base = endpoints.endpointForURI(uri(b"http://127.0.0.1:9001/"))

    assert endpoints.endpointForURI(uri(b"http://127.0.0.1:9002/")) is not base
    assert endpoints.endpointForURI(uri(b"http://localhost:9001/")) is not base


def test_an_unsupported_scheme_is_refused(endpoints: ReusedEndpoints) -> None:
    with pytest.raises(SchemeNotSupported, match="ftp"):
        endpoints.endpointForURI(uri(b"ftp://127.0.0.1:21/file"))


def test_https_without_tls_support_is_refused_naming_tls(
    endpoints: ReusedEndpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes the import fail, as it does without pyOpenSSL.
    monkeypatch.setitem(sys.modules, "twisted.internet.ssl", None)

    with pytest.raises(SchemeNotSupported, match="TLS"):
        endpoints.endpointForURI(uri(b"https://127.0.0.1:9443/"))


def _openssl_importable() -> bool:
    try:
        import OpenSSL  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_openssl_importable(), reason="pyOpenSSL is installed here")
def test_https_without_pyopenssl_is_refused_naming_tls(endpoints: ReusedEndpoints) -> None:
    with pytest.raises(SchemeNotSupported, match="TLS"):
        endpoints.endpointForURI(uri(b"https://127.0.0.1:9443/"))


@pytest.mark.skipif(not _openssl_importable(), reason="pyOpenSSL is not installed")
def test_https_with_pyopenssl_gets_one_reused_tls_endpoint(endpoints: ReusedEndpoints) -> None:
    first = endpoints.endpointForURI(uri(b"https://127.0.0.1:9443/a"))

    assert endpoints.endpointForURI(uri(b"https://127.0.0.1:9443/b")) is first
    assert endpoints.endpointForURI(uri(b"http://127.0.0.1:9443/a")) is not first
