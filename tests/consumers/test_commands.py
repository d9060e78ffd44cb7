"""
Tests for :mod:`mgpumanager.consumers.commands` (real processes on the real reactor: exit
codes, captured output, a missing executable, a command killed at its time
limit) and :mod:`mgpumanager.common.deadline` (with a ``Clock``: an answer in time passes
through, a late one is a :class:`TimedOut` whatever the cancelled operation said).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.web.client import ResponseNeverReceived

from mgpumanager.common.deadline import TimedOut, within
from mgpumanager.consumers.commands import MAX_OUTPUT, CommandResult, CommandTimedOut, run_command
from tests.support import assert_no_result, failure_result_of, success_result_of


class SpyReactor:
    """The real reactor, keeping the process transports it spawns."""

    def __init__(self) -> None:
        self.processes: list[Any] = []

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        process = reactor.spawnProcess(*args, **kwargs)  # type: ignore[attr-defined]
        self.processes.append(process)
        return process


def run(argv: list[str], timeout: float = 5.0, spy: Any = None) -> Deferred[CommandResult]:
    return run_command(spy or reactor, reactor, argv, timeout)  # type: ignore[arg-type]


# -- run_command ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_true_exits_with_zero() -> None:
    result = await run(["true"])

    assert result == CommandResult(argv=("true",), code=0, output="")
    assert result.ok


@pytest_twisted.ensureDeferred
async def test_false_exits_with_one() -> None:
    result = await run(["false"])

    assert result.code == 1
    assert not result.ok
    assert result.describe() == "`false` exited with 1"


@pytest_twisted.ensureDeferred
async def test_stdout_and_stderr_are_captured_with_the_exit_code() -> None:
    result = await run(["sh", "-c", "echo started; echo 'Access denied' >&2; exit 5"])

    assert result.code == 5
    assert "started" in result.output
    assert "Access denied" in result.output
    assert result.argv == ("sh", "-c", "echo started; echo 'Access denied' >&2; exit 5")
    assert result.describe().endswith("exited with 5: started Access denied")


@pytest_twisted.ensureDeferred
async def test_output_beyond_the_limit_is_dropped() -> None:
    result = await run(["sh", "-c", f"head -c {MAX_OUTPUT + 5000} /dev/zero | tr '\\0' a"])

    assert result.code == 0
    assert result.output == "a" * MAX_OUTPUT


@pytest_twisted.ensureDeferred
async def test_the_environment_and_path_are_passed_on() -> None:
    os.environ["MGPU_TEST_MARKER"] = "seen"
    try:
        result = await run(["sh", "-c", "printf %s \"$MGPU_TEST_MARKER\""])
    finally:
        del os.environ["MGPU_TEST_MARKER"]

    assert result.output == "seen"


@pytest.mark.parametrize(
    "argv", [["mgpumanager-no-such-command-xyz"], ["/nonexistent/dir/systemctl", "stop", "x"]]
)
def test_a_missing_executable_answers_127_like_a_shell(argv: list[str]) -> None:
    result = success_result_of(run(argv))

    assert result.code == 127
    assert result.output == f"{argv[0]}: not found"
    assert result.describe() == f"`{' '.join(argv)}` exited with 127: {argv[0]}: not found"


def test_a_file_that_is_not_executable_answers_127(tmp_path: Any) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    assert success_result_of(run([str(script)])).code == 127


@pytest_twisted.ensureDeferred
async def test_a_command_past_its_time_limit_is_killed() -> None:
    spy = SpyReactor()
    started = time.monotonic()

    with pytest.raises(CommandTimedOut) as raised:
        await run(["sleep", "5"], timeout=0.2, spy=spy)

    assert time.monotonic() - started < 2
    assert str(raised.value) == "`sleep 5` took longer than 0.2 s"
    (process,) = spy.processes
    for _ in range(100):
        if process.pid is None:  # reaped
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert process.pid is None
    assert os.WIFSIGNALED(process.status)
    assert os.WTERMSIG(process.status) == signal.SIGKILL


@pytest_twisted.ensureDeferred
async def test_a_command_in_time_leaves_no_timer_behind() -> None:
    clock = Clock()

    result = await run_command(reactor, clock, ["true"], 5.0)  # type: ignore[arg-type]

    assert result.code == 0
    assert clock.getDelayedCalls() == []


# -- within --------------------------------------------------------------------------


def test_a_result_in_time_passes_through_and_the_timer_is_cancelled() -> None:
    clock = Clock()
    pending: Deferred[str] = Deferred()

    d = within(pending, 5, clock, "GET /health")
    clock.advance(4.9)
    assert_no_result(d)
    pending.callback("ok")

    assert clock.getDelayedCalls() == []
    clock.advance(10)  # nothing left to expire
    assert success_result_of(d) == "ok"


def test_a_failure_in_time_passes_through_unchanged() -> None:
    clock = Clock()
    pending: Deferred[str] = Deferred()

    d = within(pending, 5, clock, "POST /load")
    pending.errback(ConnectionRefusedError())

    failure_result_of(d, ConnectionRefusedError)
    assert clock.getDelayedCalls() == []


def test_an_immediate_result_passes_through() -> None:
    clock = Clock()
    pending: Deferred[int] = Deferred()
    pending.callback(7)

    assert success_result_of(within(pending, 5, clock, "x")) == 7
    assert clock.getDelayedCalls() == []


def test_a_late_operation_is_cancelled_and_fails_with_timed_out() -> None:
    clock = Clock()
    cancelled: list[bool] = []
    pending: Deferred[str] = Deferred(lambda _: cancelled.append(True))

    d = within(pending, 5, clock, "POST /admin/unload")
    clock.advance(4.99)
    assert_no_result(d)
    clock.advance(0.01)

    error = failure_result_of(d, TimedOut).value
    assert cancelled == [True]
    assert str(error) == "POST /admin/unload timed out after 5 s"
    assert error.seconds == 5


@pytest.mark.parametrize(
    "inner",
    [
        ResponseNeverReceived([CancelledError()]),  # what treq says on a cancelled request
        ConnectionLost(),
        CancelledError(),
        ValueError("whatever"),
    ],
)
def test_a_late_operation_is_timed_out_whatever_the_cancellation_failed_with(
    inner: Exception,
) -> None:
    clock = Clock()
    pending: Deferred[str] = Deferred(lambda d: d.errback(inner))

    d = within(pending, 0.5, clock, "GET /health")
    clock.advance(0.5)

    error = failure_result_of(d, TimedOut).value
    assert str(error) == "GET /health timed out after 0.5 s"


def test_a_canceller_that_does_nothing_still_ends_in_timed_out() -> None:
    clock = Clock()
    pending: Deferred[str] = Deferred(lambda _: None)

    d = within(pending, 3, clock, "probe")
    clock.advance(3)

    assert str(failure_result_of(d, TimedOut).value) == "probe timed out after 3 s"
