"""
The daemon's text log writes twistd's classic lines, byte for byte, whatever
the event: only what it costs differs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import (
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure

from mgpumanager.common.log_text import LINE_FORMAT, ClassicText, text_observer

#: A moment with whole microseconds, as time.time() gives them.
NOW = 1_796_000_000.123456
#: The next whole second.
NEXT = 1_796_000_001.0


def _failure() -> Failure:
    try:
        raise ValueError("the consumer answered garbage")
    except ValueError:
        return Failure()


def _access(line: Any) -> dict[str, Any]:
    return {
        "log_format": LINE_FORMAT, "line": line, "log_level": LogLevel.info,
        "log_namespace": "mgpumanager.access", "log_time": NOW, "code": 200,
    }


EVENTS: dict[str, dict[str, Any]] = {
    "fields": {
        "log_format": "{consumer}: {work_id} ended ({how})", "consumer": "comfyui",
        "work_id": "p-1", "how": "done", "log_level": LogLevel.info,
        "log_namespace": "mgpumanager.web.jobs", "log_time": NOW,
    },
    "own system": {"log_format": "ManagerSite starting on 8770", "log_system": "-",
                   "log_time": NOW},
    "no level": {"log_format": "x", "log_namespace": "n", "log_time": NOW},
    "no namespace": {"log_format": "x", "log_level": LogLevel.warn, "log_time": NOW},
    "no time": {"log_format": "x", "log_level": LogLevel.info, "log_namespace": "n"},
    "several lines": {"log_format": "first\nsecond", "log_level": LogLevel.error,
                      "log_namespace": "n", "log_time": NOW},
    "failure": {"log_format": "a job failed", "log_failure": _failure(),
                "log_level": LogLevel.critical, "log_namespace": "n", "log_time": NOW},
    "unformattable": {"log_format": "{missing}", "log_level": LogLevel.info,
                      "log_namespace": "n", "log_time": NOW},
    "no format": {"log_level": LogLevel.info, "log_namespace": "n", "log_time": NOW},
    "access": _access("127.0.0.1 POST /v1/tts?x=%E2%9C%93 200 11"),
    "access, braces and a newline": _access("127.0.0.1 GET /{a}\nb 404 9"),
    "access, not text": _access(404),
    "access, empty": _access(""),
    "access without its line": {k: v for k, v in _access("x").items() if k != "line"},
    "access with a failure": {**_access("x"), "log_failure": _failure()},
    "access with its own system": {**_access("x"), "log_system": "site"},
    "access read back from JSON": eventFromJSON(eventAsJSON(_access("127.0.0.1 GET / 200 1"))),
    "access a hair before a second": {**_access("x"), "log_time": math.nextafter(NEXT, 0)},
}


@pytest.mark.parametrize("name", list(EVENTS))
def test_every_event_is_the_line_twistd_writes(name: str) -> None:
    event = EVENTS[name]
    assert ClassicText()(event) == formatEventAsClassicLogText(event)


def test_the_timestamp_is_right_in_every_second_it_is_kept_for() -> None:
    text = ClassicText()
    # Forwards a second at a time, within one, then back: the clock may be set back.
    moments = [NOW + step / 4 for step in range(12)] + [NOW - 3600.5, NOW + 86_400.75]
    # datetime rounds to the microsecond: a hair before a second is that second.
    moments += [math.nextafter(NEXT, 0), NEXT - 0.0000004, NEXT - 0.0000006, NEXT, -0.5]
    for moment in moments:
        assert text.timestamp(moment) == formatTime(moment)
    assert text.timestamp(None) == "-"


def test_the_observer_writes_each_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    with path.open("w") as out:
        observer = text_observer(out)
        event = _access("127.0.0.1 POST /v1/tts 200 11")
        observer(event)
        # Flushed: a reader (journald, tail -f) has the line before the next one.
        assert path.read_text() == formatEventAsClassicLogText(event)


def test_an_event_with_nothing_to_say_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    with path.open("w") as out:
        observer = text_observer(out)
        observer({**EVENTS["no format"], "log_time": time.time()})
        observer(_access(""))
    assert path.read_text() == ""
