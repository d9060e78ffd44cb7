"""
A stand-in ``systemctl`` that drives the simulated whisper unit over HTTP.

The daemon runs ``<lifecycle.systemctl...> start|stop <unit>`` for consumers managed by
systemd.  Pointing ``lifecycle.systemctl`` at
``python -m mgpumanager.simulate.systemctl --url http://127.0.0.1:PORT`` lets it do so
against a :class:`~mgpumanager.simulate.consumers.SimWhisper` in another process, with
systemctl's exit codes: 0 done, 1 failed, 3 inactive (``is-active``), 5 no such unit.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

_ACTIONS = ("start", "stop", "restart", "is-active", "status")
EXIT_FAILED = 1
EXIT_INACTIVE = 3
EXIT_NO_UNIT = 5


def _call(url: str, action: str, timeout: float) -> dict[str, object]:
    method = "GET" if action == "status" else "POST"
    request = urllib.request.Request(f"{url.rstrip('/')}/_sim/unit/{action}", method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        document = json.load(response)
    if not isinstance(document, dict):
        raise ValueError(f"unexpected answer {document!r}")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    """Run one systemctl command; return its exit status."""
    parser = argparse.ArgumentParser(prog="mgpumanager.simulate.systemctl")
    parser.add_argument("--url", required=True, help="base URL of the simulated unit's server")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("action", choices=_ACTIONS)
    parser.add_argument("unit")
    # Real systemctl flags (--no-block, --quiet, ...) mean nothing here.
    options, _ = parser.parse_known_args(argv)
    try:
        status = _call(options.url, "status", options.timeout)
        if status.get("unit") != options.unit:
            print(f"Unit {options.unit} not found.", file=sys.stderr)
            return EXIT_NO_UNIT
        steps = {"restart": ["stop", "start"], "is-active": [], "status": []}
        for step in steps.get(options.action, [options.action]):
            status = _call(options.url, step, options.timeout)
    except (OSError, ValueError) as e:
        # urllib's HTTPError is an OSError: a failed start (CUDA OOM) lands here too.
        detail = (
            e.read().decode("utf-8", "replace") if isinstance(e, urllib.error.HTTPError) else e
        )
        print(f"Job for {options.unit} failed: {detail}", file=sys.stderr)
        return EXIT_FAILED
    if options.action in ("is-active", "status"):
        print("active" if status.get("active") else "inactive")
        return 0 if status.get("active") else EXIT_INACTIVE
    return 0


if __name__ == "__main__":
    sys.exit(main())
