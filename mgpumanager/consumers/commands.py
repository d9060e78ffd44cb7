"""
Run a short external command (``systemctl stop whisper-server.service``) without
blocking the reactor, and kill it if it outlives its time limit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: Output beyond this is dropped: a command's last words fit in an error message.
MAX_OUTPUT = 16 * 1024


@attrs.frozen
class CommandResult:
    """How a command ended: its exit code (or -signal) and what it printed."""

    argv: tuple[str, ...]
    code: int
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        tail = " ".join(self.output.split())[-300:]
        said = f": {tail}" if tail else ""
        return f"`{' '.join(self.argv)}` exited with {self.code}{said}"


class CommandTimedOut(Exception):
    """The command did not finish in time and was killed."""


class _Collector(ProcessProtocol):
    def __init__(self, argv: tuple[str, ...], done: Deferred[CommandResult]) -> None:
        self._argv = argv
        self._done = done
        self._output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self._collect(data)

    def errReceived(self, data: bytes) -> None:
        self._collect(data)

    def _collect(self, data: bytes) -> None:
        room = MAX_OUTPUT - len(self._output)
        if room > 0:
            self._output += data[:room]

    def processEnded(self, reason: Failure) -> None:
        if self._done.called:
            return
        error = reason.value
        if isinstance(error, ProcessDone):
            code = 0
        elif isinstance(error, ProcessTerminated):
            code = error.exitCode if error.exitCode is not None else -(error.signal or 1)
        else:
            code = -1
        output = self._output.decode("utf-8", "replace")
        self._done.callback(CommandResult(argv=self._argv, code=code, output=output))


def run_command(
    reactor: IReactorProcess, clock: IReactorTime, argv: Sequence[str], timeout: float
) -> Deferred[CommandResult]:
    """
    Start ``argv`` (looked up on ``PATH``) and fire with its result; fail
    with :class:`CommandTimedOut` after ``timeout`` seconds, killing it.
    A command that cannot be started fires with code 127, like a shell.
    """
    words = tuple(argv)
    done: Deferred[CommandResult] = Deferred()
    executable = _which(words[0])
    if executable is None:
        done.callback(CommandResult(argv=words, code=127, output=f"{words[0]}: not found"))
        return done
    process: Any = reactor.spawnProcess(
        _Collector(words, done), executable, list(words), env=dict(os.environ)
    )

    def expire() -> None:
        try:
            process.signalProcess(signal.SIGKILL)
        except ProcessExitedAlready:
            pass
        done.errback(CommandTimedOut(f"`{' '.join(words)}` took longer than {timeout:g} s"))

    timer = clock.callLater(timeout, expire)

    def stop_timer(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    done.addBoth(stop_timer)
    return done


def _which(name: str) -> str | None:
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
