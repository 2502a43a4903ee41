"""The status page (``GET /``) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium): it asks for the token once, shows the
session, and its status cell changes live — no reload — when the agent stops.

Without Chromium this skips, except when CI is set: then it fails (CI installs it,
see .ci/run)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.api_helpers import api_supervised, message, token_of, url_of
from tests.support.browser import chromium
from tests.support.e2e import make_config, replies_to, run
from tests.support.helpers import until


@pytest.fixture
def browser(tmp_path: Path):
    yield from chromium(tmp_path)


def text_of(driver, selector: str) -> str | None:
    """Read in one script call: the page re-renders rows, so a held element goes stale."""
    return driver.execute_script(
        "const el = document.querySelector(arguments[0]); return el ? el.textContent : null;",
        selector)


def status_cell(driver, session_id: str) -> str | None:
    return text_of(driver, f"#row-{session_id} td.status")


def answer_prompt(driver, token: str) -> None:
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    alert = WebDriverWait(driver, 20).until(ec.alert_is_present())
    alert.send_keys(token)
    alert.accept()


def test_status_page_shows_a_session_and_updates_live(tmp_path: Path, browser,
                                                      reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle={"idle_after": 60, "stop_idle_after": 60})

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            created = (await client.post("/v1/messages", json=message("hi"))).json()
            sid = created["session_id"]
            await until(lambda: replies_to(cfg, created["message_id"]))
            assert sup.tracked[sid].status == "running"

            def page(fn, *args):
                return asyncio.to_thread(fn, *args)

            await page(browser.get, url_of(client) + "/")
            await page(answer_prompt, browser, token_of(cfg))
            await wait_in_browser(lambda: status_cell(browser, sid) == "running",
                                  "the session row, running")
            assert await page(text_of, browser, f"#row-{sid} td.group") == "helpers"
            assert await page(text_of, browser, f"#row-{sid} td.chat") == "chat:room-1"
            assert await page(text_of, browser, f"#row-{sid} td.session") == sid
            await page(browser.execute_script, "window.__same_page = 1")

            resp = await client.post(f"/v1/sessions/{sid}/stop")
            assert resp.status_code == 202
            await wait_in_browser(lambda: status_cell(browser, sid) == "stopped",
                                  "the status cell turning 'stopped'")
            assert await page(browser.execute_script, "return window.__same_page") == 1
            # the run that ended: what it used, and the session's totals
            await wait_in_browser(lambda: "· 1 run, " in (text_of(browser, f"#row-{sid} "
                                                                     "td.usage") or ""),
                                  "the usage cell of the ended run")
            used = await page(text_of, browser, f"#row-{sid} td.usage")
            assert "CPU-s" in used and "(stopped: requested through the API)" in used, used

            # the token was asked for once: a reload shows the table without a prompt
            await page(browser.refresh)
            await wait_in_browser(lambda: status_cell(browser, sid) == "stopped",
                                  "the table after a reload, with no prompt")

    run(body(), timeout=150)


async def wait_in_browser(condition, what: str, timeout: float = 30.0):
    """``until`` for a blocking Selenium call: each check runs in a worker thread, so
    the supervisor (and its API) keep serving on this loop meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:g}s")
        await asyncio.sleep(0.1)
