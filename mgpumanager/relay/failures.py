"""
Why a call to a consumer failed, read from Twisted's client exceptions: the
relay and the control calls tell a cancellation, a time limit and a broken
connection apart the same way.
"""

from __future__ import annotations

from typing import Literal

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.web import client as web_client

from mgpumanager.common.deadline import TimedOut
from mgpumanager.relay.twisted_private import WrapperException


def is_cancellation(error: BaseException) -> bool:
    """
    Whether a failed HTTP call was cancelled by us: Twisted's client reports a
    request cancelled on an open connection as ResponseNeverReceived (or a
    transmission failure) wrapping the CancelledError.
    """
    if isinstance(error, CancelledError):
        return True
    if isinstance(error, WrapperException):
        return any(reason.check(CancelledError) for reason in error.reasons)
    return False


def classify_call_failure(
    error: BaseException,
) -> tuple[Literal["cancelled", "timed_out", "connection"], str]:
    """
    Why a call to a consumer failed, in the three ways a caller must tell
    apart: we cancelled it (pass the cancellation on), its time limit ran out
    (:func:`~mgpumanager.common.deadline.within`'s message), or the connection failed
    (a short, path-free description).
    """
    if isinstance(error, TimedOut):
        return "timed_out", str(error)
    if is_cancellation(error):
        return "cancelled", "cancelled"
    return "connection", describe_connection_error(error)


def describe_connection_error(error: BaseException) -> str:
    """A short, path-free description of why talking to a consumer failed."""
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, net_error.DNSLookupError):
        return "host name not found"
    if isinstance(error, net_error.TimeoutError | net_error.TCPTimedOutError):
        return "connect timed out"
    if isinstance(error, DeferredTimeout):
        return "timed out"
    if isinstance(error, web_client.ResponseNeverReceived):
        return "connection closed before any response"
    if isinstance(error, web_client.RequestTransmissionFailed):
        return "connection failed while sending the request"
    if isinstance(error, web_client.ResponseFailed | WrapperException):
        inner = [describe_connection_error(f.value) for f in error.reasons]
        return "; ".join(dict.fromkeys(inner)) or "response failed"
    if isinstance(error, net_error.ConnectionLost | net_error.ConnectionDone):
        return "connection lost"
    text = " ".join(str(error).split())
    return text or type(error).__name__
