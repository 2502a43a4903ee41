"""The operator's console (``GET /``, issue 27) in a real headless Chromium against a
real supervisor with its API (``api_supervised``: uvicorn on the test's loop) and
real agents (``tests/support/console_agent.py`` through the local runtime).

Each view is loaded and read back; each action is clicked on the page and its effect
checked through the API or the session's files, not only on the page. The XSS test
has an agent reply with markup, a file named like markup and a question card full of
markup: the page shows them as text and none of it runs (the ``window.__pwned``
sentinel every payload would set stays unset, no alert opens). The fleet and session
views are screenshotted by the run (into ``docs/img/`` with UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.host import destinations
from orchestrator.rules.scheduling import new_series_id
from tests.support import console_agent
from tests.support.api_helpers import api_supervised, message, token_of, url_of
from tests.support.browser import (
    chromium,
    click,
    js,
    page,
    screenshot,
    text_of,
    texts_of,
    wait_in_browser,
)
from tests.support.e2e import Client, make_config, replies_to, run
from tests.support.helpers import REPO, until

AGENT = [sys.executable, str(REPO / "tests" / "support" / "console_agent.py")]
LIFECYCLE = {"idle_after": 60, "stop_idle_after": 60}


@pytest.fixture
def browser(tmp_path: Path):
    yield from chromium(tmp_path)


def open_console(driver, client, token: str, where: str = "/") -> None:
    driver.get(url_of(client) + "/#token=" + token)  # kept in localStorage: no prompt
    driver.execute_script("window.__pwned = undefined; window.__alerts = 0;"
                          " window.alert = () => { window.__alerts += 1; };")
    if where != "/":
        driver.execute_script("location.hash = arguments[0];", where)


def rows(driver) -> list[str]:
    return js(driver, "return Array.from(document.querySelectorAll('#sessions tbody tr'),"
                      " tr => tr.id.slice(4));")


async def send(client, text: str, **extra) -> dict:
    resp = await client.post("/v1/messages", json=message(text, **extra))
    assert resp.status_code == 201, resp.text
    return resp.json()


async def replied(cfg, created: dict) -> None:
    await until(lambda: replies_to(cfg, created["message_id"]), timeout=30)


def test_fleet_view_and_sessions_list(tmp_path: Path, browser, reap_agents) -> None:
    cfg = make_config(tmp_path, command=AGENT, lifecycle=LIFECYCLE)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            a = await send(client, "hi")
            b = await send(client, "hi", group="writers", platform_id="room-2")
            c = await send(client, "hi", platform_id="room-3")
            for created in (a, b, c):
                await replied(cfg, created)
            assert (await client.post(f"/v1/sessions/{c['session_id']}/stop")).status_code == 202
            await until(lambda: sup.tracked[c["session_id"]].status == "stopped")

            await page(open_console, browser, client, token_of(cfg))
            await wait_in_browser(lambda: len(rows(browser)) == 3, "three session rows")
            fleet = (await client.get("/v1/fleet")).json()
            assert fleet["tiles"]["sessions"]["running"] == 2
            await wait_in_browser(lambda: text_of(browser, "#tile-running .v") == "2",
                                  "the running tile")
            assert await page(text_of, browser, "#tile-stopped .v") == "1"
            assert (await page(text_of, browser, "#tile-delivered_1h .v")) == str(
                fleet["last_hour"]["delivered"])
            plots = await page(texts_of, browser, ".plot .k")
            assert len(plots) == 4 and plots[0].startswith("running agents")
            assert await page(js, browser, "return document.querySelectorAll("
                              "'.plot svg polyline').length") >= 2

            # search: typed into the box, answered by the server (?q=)
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            box = await page(browser.find_element, By.ID, "q")
            await page(box.send_keys, "room-2")
            await wait_in_browser(lambda: rows(browser) == [b["session_id"]],
                                  "the search for room-2")
            await page(box.clear)
            await page(box.send_keys, "writers")
            await wait_in_browser(lambda: rows(browser) == [b["session_id"]],
                                  "the search by group")
            await page(js, browser, "const q = document.getElementById('q'); q.value = '';"
                       " q.dispatchEvent(new Event('input'));")
            await wait_in_browser(lambda: len(rows(browser)) == 3, "the cleared search")

            status = Select(await page(browser.find_element, By.ID, "status-filter"))
            await page(status.select_by_visible_text, "stopped")
            await wait_in_browser(lambda: rows(browser) == [c["session_id"]],
                                  "the stopped filter")
            api_rows = (await client.get("/v1/sessions", params={"status": "stopped"})).json()
            assert [r["session_id"] for r in api_rows] == [c["session_id"]]
            await page(status.select_by_visible_text, "any status")

            sort = Select(await page(browser.find_element, By.ID, "sort"))
            await page(sort.select_by_value, "session_id")
            order = Select(await page(browser.find_element, By.ID, "order"))
            await page(order.select_by_value, "desc")
            want = sorted([a["session_id"], b["session_id"], c["session_id"]], reverse=True)
            await wait_in_browser(lambda: rows(browser) == want, "sorted by id, descending")
            await page(sort.select_by_value, "")
            await page(order.select_by_value, "asc")

            # live: a status change reaches the row without a reload
            await page(js, browser, "window.__same_page = 1")
            assert (await client.post(f"/v1/sessions/{a['session_id']}/stop")).status_code == 202
            await wait_in_browser(
                lambda: text_of(browser, f"#row-{a['session_id']} td.status") == "stopped",
                "the row turning stopped")
            await wait_in_browser(lambda: text_of(browser, "#tile-stopped .v") == "2",
                                  "the stopped tile, live")
            assert await page(js, browser, "return window.__same_page") == 1
            await page(screenshot, browser, "console-fleet", tmp_path)

            # a narrow window: nothing wider than it (tables scroll inside their box)
            await page(browser.set_window_size, 400, 800)
            await wait_in_browser(lambda: js(browser, "return window.innerWidth <= 400"),
                                  "the narrow window")
            for where in ("#/", f"#/session/{a['session_id']}", "#/groups"):
                await page(js, browser, "location.hash = arguments[0];", where)
                await wait_in_browser(lambda: js(
                    browser, "const v = document.querySelector('main > section:not([hidden])');"
                    " return v && v.childElementCount > 0 && v.textContent.length > 20;"),
                    f"{where} in a narrow window")
                wide = await page(js, browser, "return document.documentElement.scrollWidth"
                                  " - window.innerWidth;")
                assert wide <= 0, f"{where}: {wide}px wider than the window"

    run(body(), timeout=150)


def _series(cfg, session_id: str) -> str:
    """A daily series in the session, written the way ``send --every`` writes one."""
    c = Client(cfg)
    with c.registry:
        row = c.registry.session(session_id)
        assert row is not None
        sid = new_series_id()
        c.registry.add_series(sid, row.id, row.agent_group_id, "0 3 * * *", "UTC")
        c.sessions.write_message(row, {"text": "daily report"}, routing=("chat", "room-1", None),
                                 process_after=datetime.now(timezone.utc) + timedelta(hours=5),
                                 recurrence="0 3 * * *", series_id=sid)
    return sid


def test_session_view_and_its_actions(tmp_path: Path, browser, reap_agents) -> None:
    cfg = make_config(tmp_path, command=AGENT, lifecycle=LIFECYCLE)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            first = await send(client, "hello")
            sid = first["session_id"]
            await replied(cfg, first)
            await replied(cfg, await send(client, "ask"))
            await send(client, "badreply")
            await send(client, "fail")
            await until_true(lambda: _messages(client, sid), lambda ms: any(
                m["status"] == "failed" and m["direction"] == "out" for m in ms),
                "the failed reply")
            series_id = _series(cfg, sid)

            await page(open_console, browser, client, token_of(cfg), f"#/session/{sid}")
            await wait_in_browser(lambda: text_of(browser, "#session-id") == sid,
                                  "the session view")
            texts = await page(texts_of, browser, "#conversation .msg .text")
            assert texts[0] == "hello" and "echo: hello" in texts  # oldest first
            assert await page(text_of, browser, "#session-group") == "helpers"
            assert await page(text_of, browser, "#session-chat") == "chat:room-1"
            runs_shown = await page(texts_of, browser, "#view-session table")
            assert any("running" in t for t in runs_shown)  # the status timeline
            await page(screenshot, browser, "console-session", tmp_path)

            # answer the question card: the answer is a system row in inbound.db
            assert await page(click, browser, "#questions button.answer")
            msgs = await until_true(lambda: _messages(client, sid),
                                    lambda ms: _answer(ms) is not None, "the answer row")
            assert _answer(msgs) == console_agent.CARD["options"][0]
            await wait_in_browser(lambda: (text_of(browser, "#conversation .card .muted")
                                           or "").startswith("answered"), "the card answered")

            # send a message from the page: written to the session, answered by its agent
            await page(js, browser, "document.getElementById('send-text').value ="
                       " 'from the console';")
            assert await page(click, browser, "#send-button")
            await until_true(lambda: _messages(client, sid), lambda ms: any(
                m["direction"] == "out" and (m["content"] or {}).get("text")
                == "echo: from the console" for m in ms), "the reply to the page's message")
            await wait_in_browser(lambda: "echo: from the console" in texts_of(
                browser, "#conversation .msg .text"), "the reply on the page")

            # retry the failed reply: re-queued with fresh attempts (its row in the
            # session's files is pending again), the route's answer on the page
            bad = [m["id"] for m in await _messages(client, sid)
                   if m["direction"] == "out" and m["status"] == "failed"]
            assert len(bad) == 1 and await _failed_events(client, sid) == 1
            assert await page(click, browser, "#act-retry-failed-replies")
            await wait_in_browser(lambda: text_of(browser, "#action-result")
                                  == "re-queued 1 failed replies", "the retry's answer")
            assert [m["status"] for m in await _messages(client, sid) if m["id"] == bad[0]] \
                != ["failed"]

            # failed inbound message: listed under pending and failed
            await wait_in_browser(lambda: js(browser, "return Array.from(document."
                                  "querySelectorAll('#view-session tr'), tr => Array.from("
                                  "tr.cells, c => c.textContent)).some(r => r[1] === 'in'"
                                  " && r[2] === 'failed' && r[4] === 'fail')"),
                                  "the failed message listed as failed")

            # cancel the series: its state through the API
            await wait_in_browser(lambda: click(browser, ".cancel-series"), "the cancel button")
            await until_async(lambda: _series_state(client, series_id), "cancelled")

            # stop the agent: the session stops; the run ends with the operator's reason
            assert sup.tracked[sid].status in ("running", "idle")
            assert await page(click, browser, "#act-stop-agent")
            await until(lambda: sup.tracked[sid].status == "stopped", timeout=20)
            timeline = (await client.get(f"/v1/sessions/{sid}/timeline")).json()
            assert timeline["runs"][-1]["exit_reason"].startswith("stopped: requested")
            await wait_in_browser(lambda: (text_of(browser, "#session-status") or "")
                                  .startswith("stopped"), "the status on the page")

    run(body(), timeout=180)


def test_agent_markup_is_shown_as_text(tmp_path: Path, browser, reap_agents) -> None:
    cfg = make_config(tmp_path, command=AGENT, lifecycle=LIFECYCLE)
    hostile_chat = '<img src=x onerror="window.__pwned=1">'

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            first = await send(client, "hostile", platform_id=hostile_chat)
            sid = first["session_id"]
            await replied(cfg, first)
            await replied(cfg, await send(client, "ask", platform_id=hostile_chat))

            await page(open_console, browser, client, token_of(cfg))
            await wait_in_browser(lambda: text_of(browser, f"#row-{sid} td.chat")
                                  == f"chat:{hostile_chat}", "the chat id as text")
            await page(js, browser, "location.hash = arguments[0];", f"#/session/{sid}")
            await wait_in_browser(lambda: console_agent.HOSTILE_TEXT in texts_of(
                browser, "#conversation .msg .text"), "the hostile reply as text")
            assert console_agent.HOSTILE_FILE in await page(texts_of, browser, "a.file")
            # the agent's own output (its log tail): text, the escape shown, not obeyed
            shown = console_agent.HOSTILE_LOG.replace("\x1b", "\\x1b")
            await wait_in_browser(lambda: shown in (text_of(browser, "#agent-log") or ""),
                                  "the agent's log tail as text")
            card = console_agent.CARD
            assert await page(text_of, browser, "#questions .card .title") == card["title"]
            assert await page(text_of, browser, "#questions .card .q") == card["question"]
            labels = await page(texts_of, browser, "#questions .card button")
            assert labels == [card["options"][0], card["options"][1]["label"]]
            injected = await page(js, browser, "return document.querySelectorAll("
                                  "'main img, main script, main svg:not(.plot svg), main b,"
                                  " main i, main iframe').length")
            assert injected == 0
            # hover and click what an attacker would want hovered or clicked
            await page(js, browser, "for (const e of document.querySelectorAll('main *')) {"
                       " e.dispatchEvent(new MouseEvent('mouseover', {bubbles: true})); }")
            assert await page(js, browser, "return window.__pwned") is None
            assert await page(js, browser, "return window.__alerts") == 0
            await page(js, browser, "location.hash = '#/'")
            await wait_in_browser(lambda: len(rows(browser)) == 1, "back on the list")
            assert await page(js, browser, "return window.__pwned") is None

    run(body(), timeout=150)


def test_groups_view(tmp_path: Path, browser, reap_agents) -> None:
    secret = tmp_path / "support-key"
    secret.write_text("s3cr3t-value")
    cfg = make_config(tmp_path, command=AGENT, lifecycle=LIFECYCLE,
                      groups={"helpers": {"env": {"MODE": "plain-but-hidden"},
                                          "env_files": {"API_KEY": str(secret)},
                                          "max_agents": 3}})

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            first = await send(client, "hi")
            await replied(cfg, first)
            series_id = _series(cfg, first["session_id"])
            c = Client(cfg)
            with c.registry:
                destinations.add(c.registry, "helpers", destinations.parse(
                    "ops-room", channel="chat", platform="ops"))
            await page(open_console, browser, client, token_of(cfg), "#/groups")
            await wait_in_browser(lambda: text_of(browser, "#group-helpers pre"),
                                  "the helpers group")
            shown = await page(text_of, browser, "#group-helpers pre")
            assert str(secret) in shown and '"max_agents": 3' in shown
            assert "s3cr3t-value" not in shown and "plain-but-hidden" not in shown
            cells = await page(texts_of, browser, "#group-helpers td")
            assert "ops-room" in cells and series_id in cells
            groups = (await client.get("/v1/groups")).json()
            assert [g["group"] for g in groups] == ["helpers"]
            assert groups[0]["settings"]["env"] == {"MODE": "(set)"}
            # cancel the series from the groups view
            assert await page(click, browser, "#group-helpers .cancel-series")
            await until_async(lambda: _series_state(client, series_id), "cancelled")

    run(body(), timeout=120)


# --- reading the effects --------------------------------------------------------------------


async def _messages(client, sid: str) -> list[dict]:
    """The session's messages through the API (a 409 while the agent holds a lock on
    its files is asked again)."""
    for _ in range(50):
        resp = await client.get(f"/v1/sessions/{sid}/messages", params={"limit": "200"})
        if resp.status_code != 409:
            assert resp.status_code == 200, resp.text
            return resp.json()["messages"]
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {sid}: messages unreadable")


def _answer(msgs: list[dict]) -> str | None:
    """The selected option of the session's question_response row (inbound.db)."""
    for m in msgs:
        c = m["content"]
        if m["direction"] == "in" and isinstance(c, dict) and c.get("type") == \
                "question_response":
            return c["selectedOption"]
    return None


async def until_true(fn, check, what: str, timeout: float = 30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check(got := await fn()):
        if loop.time() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:g}s (last: {got!r})")
        await asyncio.sleep(0.1)
    return got


async def _failed_events(client, sid: str) -> int:
    page_ = (await client.get("/v1/events", params={"last_event_id": "0"},
                              headers={"Accept": "application/json"})).json()
    return sum(1 for e in page_["events"] if e["kind"] == "reply_failed"
               and e["session_id"] == sid)


async def _series_state(client, series_id: str) -> str:
    rows_ = (await client.get("/v1/series")).json()
    return next(r["state"] for r in rows_ if r["series_id"] == series_id)


async def until_async(fn, want, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await fn()) != want:
        if loop.time() > deadline:
            raise AssertionError(f"wanted {want!r}, still {got!r} after {timeout:g}s")
        await asyncio.sleep(0.1)
