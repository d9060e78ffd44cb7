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
  so it is not formatted a second time, when that line is a string and nothing
  else of the event needs Twisted's formatting.

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
        line = event.get("line")
        if (
            event.get("log_format") != LINE_FORMAT
            or type(line) is not str
            # What Twisted formats its own way: a traceback, a system of the
            # event's own, the fields of an event read back from JSON.
            or not _FORMATTED_BY_TWISTED.isdisjoint(event)
        ):
            return formatEventAsClassicLogText(event, formatTime=self.timestamp)
        if not line:
            return None
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        classic = f"{self.timestamp(event.get('log_time'))} [{system}] {line}"
        return classic.replace("\n", "\n\t") + "\n"

    def timestamp(self, when: float | None) -> str:
        """The RFC 3339 timestamp to the second, as twistd writes it."""
        if when is None:
            return "-"
        second = math.floor(when)
        if when - second > _LAST_MICROSECOND:
            # ``datetime`` rounds to the microsecond: this is the next second.
            return formatTime(when)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, formatTime(second))
        return cached[1]


#: Keys of an event that Twisted's own formatting must read.
_FORMATTED_BY_TWISTED = frozenset(("log_failure", "log_system", "log_flattened"))
#: Past this much of a second, ``datetime`` may round a time up to the next.
_LAST_MICROSECOND = 0.999999


def text_observer(out: IO[Any]) -> ILogObserver:
    """An observer writing :class:`ClassicText` lines to ``out``, each flushed."""
    return FileLogObserver(out, ClassicText())
