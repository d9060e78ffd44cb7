"""
Shared fixtures.  pytest does not notice errors that Twisted merely logs (an
unhandled error in a Deferred, a failure in a LoopingCall), so every test fails
if one was logged while it ran, unless it is marked ``logged_errors_expected``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher


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
