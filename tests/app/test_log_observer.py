"""
Which log observer twistd runs the daemon with: the daemon's own text lines on
standard output where twistd would write its text there, and whatever the
operator asked for everywhere else.

Each case goes the way twistd goes: its own options parsed, the plugin's
service made and given the application, then the application's
``ILogObserver`` component, which twistd's logger takes when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from twisted.internet import defer
from twisted.logger import FileLogObserver, ILogObserver
from twisted.python import failure
from twisted.scripts._twistd_unix import UnixApplicationRunner
from twisted.scripts.twistd import ServerOptions

from mgpumanager.common.log_text import ClassicText
from tests.app.test_tap import EXAMPLE
from tests.daemon import Daemon


def _observer_for(twistd_args: list[str]) -> object:
    """The observer twistd's runner would take, going its own way up to its logger."""
    options = ServerOptions()
    with pytest.MonkeyPatch.context() as patch:
        # --debug would also turn on, for the rest of this process, Deferred
        # debugging and a debugger at every Failure: only its option is wanted.
        patch.setattr(defer, "setDebugging", lambda on: None)
        patch.setattr(failure, "startDebugMode", lambda: None)
        options.parseOptions(
            ["--pidfile=", *twistd_args, "mgpumanager", "--config", str(EXAMPLE)]
        )
    runner = UnixApplicationRunner(options)
    # What runs before the plugin's service is made (it may change the options).
    runner.preApplication()
    application = runner.createOrGetApplication()
    return application.getComponent(ILogObserver)


@pytest.mark.parametrize("args", [["-n"], ["-n", "--logfile=-"]])
def test_in_the_foreground_on_standard_output_the_daemon_writes_its_own_lines(
    args: list[str],
) -> None:
    observer = _observer_for(args)
    assert isinstance(observer, FileLogObserver)
    assert isinstance(observer.formatEvent, ClassicText)


@pytest.mark.parametrize("args", [
    ["-n", "--logfile=/var/log/mgpumanager.log"],
    ["-n", "--syslog"],
    ["-n", "--logger=mgpumanager.logs.json_stdout"],
    [],
    # --debug turns nodaemon on after twistd chose to log to twistd.log.
    ["-b"],
    ["-b", "--logfile=-"],
    ["-n", "-b"],
])
def test_a_log_file_syslog_a_logger_or_a_daemon_is_left_to_twistd(args: list[str]) -> None:
    assert _observer_for(args) is None


def test_a_running_daemon_writes_twistds_lines(tmp_path: Path) -> None:
    """
    The real process's output has twistd's shape, access lines included
    (which observer wrote it, the tests above say: the lines are the same).
    """
    daemon = Daemon(yaml.safe_load(EXAMPLE.read_text()), tmp_path)
    daemon.start()  # waits for GET /healthz to answer
    daemon.stop()
    lines = daemon.log().splitlines()
    assert any(line.endswith(" [mgpumanager.access#info] 127.0.0.1 GET /healthz 200 16")
               for line in lines)
    # Every line opens with twistd's RFC 3339 timestamp and its [system].
    for line in lines:
        if line.startswith("\t"):
            continue
        stamp, system, _ = line.split(" ", 2)
        assert len(stamp) == len("2026-12-07T15:14:14+0000") and stamp[10] == "T", line
        assert system.startswith("[") and system.endswith("]"), line


def test_with_the_json_logger_each_access_is_an_object_with_its_fields(tmp_path: Path) -> None:
    daemon = Daemon(yaml.safe_load(EXAMPLE.read_text()), tmp_path,
                    twistd_args=("--logger", "mgpumanager.logs.json_stdout"))
    daemon.start()  # waits for GET /healthz to answer
    daemon.stop()
    events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    accesses = [e for e in events if e.get("log_namespace") == "mgpumanager.access"]
    assert accesses, daemon.log()
    assert {
        key: accesses[-1][key] for key in ("line", "client", "method", "uri", "code", "length")
    } == {
        "line": "127.0.0.1 GET /healthz 200 16", "client": "127.0.0.1", "method": "GET",
        "uri": "/healthz", "code": 200, "length": 16,
    }
    assert not any(line[:4].isdigit() for line in daemon.log().splitlines()), "no text lines"
