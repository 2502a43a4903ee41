"""Headless Chromium for the console tests (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium), and the small waits around it.

Without Chromium the tests skip, except when CI is set: then they fail (CI installs it
with ``.ci/setup-browser.sh``). Every Selenium call blocks, so the async tests run
them in a worker thread (``page``): the supervisor and its API keep serving on the
test's loop meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.helpers import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
SHOTS = REPO / "docs" / "img"


def chromium(tmp_path: Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium (a fixture's body: ``yield from chromium(tmp_path)``)."""
    if not (CHROMIUM and DRIVER):
        why = "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def page(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking Selenium call, off the loop."""
    return asyncio.to_thread(fn, *args)


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def text_of(driver: Any, selector: str) -> str | None:
    """Read in one script call: the page re-renders, so a held element goes stale."""
    return js(driver, "const e = document.querySelector(arguments[0]);"
                      " return e ? e.textContent : null;", selector)


def texts_of(driver: Any, selector: str) -> list[str]:
    return js(driver, "return Array.from(document.querySelectorAll(arguments[0]),"
                      " e => e.textContent);", selector)


def click(driver: Any, selector: str) -> bool:
    return js(driver, "const e = document.querySelector(arguments[0]);"
                      " if (!e) return false; e.click(); return true;", selector)


async def wait_in_browser(condition: Callable[[], Any], what: str, timeout: float = 30.0
                          ) -> Any:
    """``until`` for a blocking Selenium call: each check runs in a worker thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:g}s")
        await asyncio.sleep(0.1)


def screenshot(driver: Any, name: str, tmp_path: Path) -> Path:
    """The page as a PNG: into ``docs/img/`` with UPDATE_SCREENSHOTS=1 (commit it),
    else beside the test's files (the run still proves the view renders)."""
    keep = os.environ.get("UPDATE_SCREENSHOTS", "") == "1"
    where = SHOTS if keep else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.png"
    height = js(driver, "return Math.min(3000, document.documentElement.scrollHeight);")
    driver.set_window_size(driver.get_window_size()["width"], max(600, int(height) + 40))
    assert driver.save_screenshot(str(path)), f"screenshot {path} not written"
    return path
