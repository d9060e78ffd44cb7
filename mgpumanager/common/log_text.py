"""
The daemon's log as text: twistd's classic lines, each built for what it must cost.

twistd's default observer formats every event whole: the timestamp through
``datetime`` and ``strftime``, the text through ``string.Formatter``.  The
daemon writes one access line per request, so on a fast job that formatting is
a tenth of the daemon's CPU.  :class:`ClassicText` writes the same lines, byte
for byte, for less:

- the timestamp has whole seconds, so it is formatted once a second;
- an event whose ``log_format`` is :data:`LINE_FORMAT` already carries its text
  in ``line`` (the access log builds it by hand for its JSON readers anyway),
  so it is not formatted a second time.

Every other event, tracebacks included, is Twisted's own
``formatEventAsClassicLogText`` with the cached timestamp.
"""

from __future__ import annotations

import math
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
)

#: The ``log_format`` of an event whose text is its ``line`` field, as it is.
LINE_FORMAT = "{line}"


class ClassicText:
    """
    ``formatEventAsClassicLogText``'s lines (``{time} [{system}] {text}``),
    with the timestamp formatted once a second and a :data:`LINE_FORMAT`
    event's line taken as it is.
    """

    def __init__(self) -> None:
        #: The last second formatted and its text, one tuple: a thread that
        #: logs too never sees one second's text under another's.
        self._cached: tuple[int | None, str] = (None, "-")

    def __call__(self, event: LogEvent) -> str | None:
        if event.get("log_format") != LINE_FORMAT or "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=self.timestamp)
        line = event.get("line")
        if line is None:
            # Twisted says why it cannot format the event.
            return formatEventAsClassicLogText(event, formatTime=self.timestamp)
        text = str(line)
        if not text:
            return None
        classic = f"{self.timestamp(event.get('log_time'))} [{_system(event)}] {text}"
        return classic.replace("\n", "\n\t") + "\n"

    def timestamp(self, when: float | None) -> str:
        """The RFC 3339 timestamp to the second, as twistd writes it."""
        if when is None:
            return "-"
        second = math.floor(when)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, formatTime(second))
        return cached[1]


def _system(event: LogEvent) -> str:
    """The ``[system]`` part: ``log_system``, else the namespace and the level."""
    system = event.get("log_system")
    if system is not None:
        return str(system)
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"


def text_observer(out: IO[Any]) -> ILogObserver:
    """An observer writing :class:`ClassicText` lines to ``out``, each flushed."""
    return FileLogObserver(out, ClassicText())
