"""
Shared fixtures.  pytest does not notice errors that Twisted merely logs (an
unhandled error in a Deferred, a failure in a LoopingCall), so every test fails
if one was logged while it ran, unless it is marked ``logged_errors_expected``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.daemon import REPO


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "logged_errors_expected: the test provokes logged Twisted errors on purpose"
    )


@pytest.fixture(autouse=True)
def fail_on_logged_errors(request: Any) -> Iterator[list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)
        elif event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observe)
    if errors and request.node.get_closest_marker("logged_errors_expected") is None:
        shown = "\n".join(_describe(event) for event in errors[:3])
        pytest.fail(f"{len(errors)} error(s) logged during the test:\n{shown}")


def _describe(event: dict[str, Any]) -> str:
    failure = event.get("log_failure")
    return formatEvent(event) + ("\n" + failure.getTraceback() if failure else "")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    The package built as a wheel, once a run, for the tests of what it ships.
    Building writes ``build/`` and the egg-info in the source tree, so two
    pytest-xdist workers building at once break each other's build: the
    first to take the lock builds into the directory every worker shares,
    the others wait and read its wheel.
    """
    basetemp = tmp_path_factory.getbasetemp()
    shared = basetemp.parent if "PYTEST_XDIST_WORKER" in os.environ else basetemp
    outdir = shared / "wheel"
    with (shared / "wheel.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not list(outdir.glob("mgpumanager-*.whl")):
            result = subprocess.run(
                [sys.executable, "-m", "build", "--wheel", "--no-isolation",
                 "--outdir", str(outdir), str(REPO)],
                capture_output=True, text=True, timeout=300,
            )
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (built,) = outdir.glob("mgpumanager-*.whl")
    return built
