"""
Log observers for ``twistd --logger``: one JSON object a line on standard
output, for journald or any collector that reads structured logs.

``twistd -n --logger mgpumanager.logs.json_stdout mgpumanager ...``
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_stdout() -> ILogObserver:
    """A ``twistd --logger`` factory: JSON lines on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
