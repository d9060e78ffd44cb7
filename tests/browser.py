"""
A real browser for the status page's tests: Debian's Chromium, headless,
driven by selenium through the system chromedriver.  Nothing is downloaded:
the paths are given explicitly and selenium's manager is kept offline.

Selenium blocks, and the servers under test run in this process's reactor, so
every browser call runs in a thread and the reactor keeps serving meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.threads import deferToThread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = (
    "chromium and chromium-driver are not installed; "
    "`apt-get install chromium chromium-driver` to run the browser tests"
)
LAPTOP = (1280, 900)
PHONE = (390, 844)

_T = TypeVar("_T")


def start_chromium(size: tuple[int, int] = LAPTOP) -> Any:
    """
    A headless Chromium session that keeps every console message, or a skip
    when Chromium or its driver is not installed.
    """
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(MISSING)
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


class Browser:
    """One Chromium session whose blocking calls return Deferreds."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def call(self, action: Callable[[Any], _T]) -> _T:
        """Run ``action(driver)`` in a thread, so the reactor keeps serving."""
        result: _T = await deferToThread(action, self.driver)
        return result

    async def open(self, url: str) -> None:
        """
        Load ``url`` afresh; what the previous page logged (its server going
        away at the end of its test, say) is dropped, not blamed on this one.
        """

        def load(driver: Any) -> None:
            driver.get("about:blank")
            driver.get_log("browser")
            driver.get(url)

        await self.call(load)

    async def resize(self, size: tuple[int, int]) -> None:
        await self.call(lambda driver: driver.set_window_size(*size))

    async def wait_until(
        self, condition: Callable[[Any], _T], timeout: float = 2.0, what: str = ""
    ) -> _T:
        """
        The first truthy ``condition(driver)`` within ``timeout`` seconds; a
        failure that says what never happened otherwise.
        """
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def wait(driver: Any) -> _T:
            # The page re-renders on every event: an element read between its
            # lookup and its text may be gone; that is "not yet", not an error.
            return WebDriverWait(
                driver,
                timeout,
                poll_frequency=0.05,
                ignored_exceptions=(StaleElementReferenceException,),
            ).until(condition)

        try:
            return await self.call(wait)
        except TimeoutException:
            pytest.fail(f"not within {timeout} s: {what or condition}")

    async def script(self, source: str) -> Any:
        return await self.call(lambda driver: driver.execute_script(source))

    async def screenshot(self, path: Path) -> Path:
        await self.call(lambda driver: driver.save_screenshot(str(path)))
        print(f"screenshot: {path}")
        return path

    async def errors(self, include_network: bool = True) -> list[str]:
        """
        The console's errors since the last call (reading them empties
        Chromium's buffer, so one test never sees another's).  Without
        ``include_network`` only the page's own (script errors,
        console.error): the browser itself logs a refused connection when a
        test refuses one on purpose.
        """
        return [
            entry["message"]
            for entry in await self.call(lambda driver: driver.get_log("browser"))
            if entry["level"] == "SEVERE"
            and (include_network or entry.get("source") != "network")
        ]


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Browser]:
    """One Chromium per test module: starting it costs more than a test."""
    driver = start_chromium()
    try:
        yield Browser(driver)
    finally:
        driver.quit()
