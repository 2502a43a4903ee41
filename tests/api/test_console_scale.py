"""The console with 10 000 sessions, timed in a real headless Chromium (issue 27).

The registry is populated directly (one transaction: 9 900 rows written the way
``create_session`` writes them, no folder) plus 100 real sessions made by
``Sessions.resolve`` (folder, inbound.db), named so that the first page is real
ones: the numbers include reading those 50 folders. Measured, through the
Performance API: the first paint, the first page of the list on screen (from
navigation start), a filtered view (a search submitted, and a status filter) from
the user's action to the rows on screen, and the API's own answer times (paged and
unpaged) for comparison. The numbers are printed (``-s``) and go into README.md;
the asserted bounds are loose (a shared CI machine), the point is "paged stays fast".
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.contract.schema import format_ts
from orchestrator.host.sessions import MessagingGroup
from tests.support.api_helpers import api_supervised, token_of, url_of
from tests.support.browser import chromium, js, page, wait_in_browser
from tests.support.e2e import Client, make_config, run
from tests.support.helpers import until

TOTAL = 10_000
REAL = 100


@pytest.fixture
def browser(tmp_path: Path):
    yield from chromium(tmp_path)


def populate(cfg) -> None:
    c = Client(cfg)
    with c.registry:
        for i in range(REAL):  # group "a-real" sorts first: the first page is these
            c.sessions.resolve("a-real", MessagingGroup("chat", f"real-{i}"), None, "shared")
        now = datetime.now(timezone.utc)
        conn = c.registry._conn  # noqa: SLF001 - a fixture writing 9 900 rows in one go
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR IGNORE INTO agent_groups (id, name, created_at)"
                         " VALUES (?,?,?)", [(f"group-{g}", f"group-{g}", format_ts(now))
                                             for g in range(50)])
        conn.executemany("INSERT INTO messaging_groups (id, channel_type, platform_id,"
                         " created_at) VALUES (?,?,?,?)",
                         [(f"mg-{i}", "chat", f"room-{i}", format_ts(now))
                          for i in range(TOTAL - REAL)])
        conn.executemany(
            "INSERT INTO sessions (id, agent_group_id, messaging_group_id, resolution_key,"
            " container_status, status_reason, last_active, created_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [(f"sess-{i:016x}", f"group-{i % 50}", f"mg-{i}", f"fixture:{i}",
              "stopped", "fixture", format_ts(now - timedelta(seconds=i)),
              format_ts(now - timedelta(seconds=2 * i)))
             for i in range(TOTAL - REAL)])
        conn.execute("COMMIT")


def listed(driver) -> dict | None:
    return js(driver, "return window.__consoleListed || null;")


def test_ten_thousand_sessions_stay_fast(tmp_path: Path, browser, reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle={"idle_after": 60, "stop_idle_after": 60})
    populate(cfg)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            # measured in a steady state: the start-up pass over the 9 900 folder-less
            # fixture rows (each logged as unreadable) done first
            await until(lambda: sup.ready.is_set() and not sup.dirty.flags, timeout=120)
            timings: dict[str, float] = {}
            t = time.perf_counter()
            resp = await client.get("/v1/sessions", params={"limit": "50"})
            timings["api_page_ms"] = (time.perf_counter() - t) * 1000
            assert resp.headers["X-Total-Count"] == str(TOTAL) and len(resp.json()) == 50
            t = time.perf_counter()
            resp = await client.get("/v1/sessions", params={"q": "room-777", "limit": "50"})
            timings["api_search_ms"] = (time.perf_counter() - t) * 1000
            assert len(resp.json()) >= 1
            t = time.perf_counter()
            resp = await client.get("/v1/sessions")
            timings["api_unpaged_ms"] = (time.perf_counter() - t) * 1000
            assert len(resp.json()) == TOTAL

            await page(browser.get, url_of(client) + "/#token=" + token_of(cfg))
            first = await wait_in_browser(lambda: listed(browser), "the first page", 60)
            assert first["rows"] == 50 and first["total"] == TOTAL
            nav = await page(js, browser, """
                const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                const n = performance.getEntriesByType('navigation')[0];
                return {fcp: fcp ? fcp.startTime : null, dcl: n.domContentLoadedEventEnd,
                        load: n.loadEventEnd};""")
            timings["first_contentful_paint_ms"] = nav["fcp"]
            timings["dom_content_loaded_ms"] = nav["dcl"]
            timings["first_page_on_screen_ms"] = first["at"]
            timings["first_page_fetch_ms"] = first["ms"]

            async def filtered(action: str, check) -> float:
                before = listed(browser)["at"]
                start = await page(js, browser, action + "; return performance.now();")
                got = await wait_in_browser(
                    lambda: (lambda x: x if x and x["at"] > before and check(x) else None)(
                        listed(browser)), "the filtered view", 60)
                return got["at"] - start

            in_group = sum(1 for i in range(TOTAL - REAL) if i % 50 == 7)
            timings["search_view_ms"] = await filtered(
                "document.getElementById('q').value = 'group-7';"
                " document.getElementById('filters').requestSubmit()",
                lambda x: x["total"] == in_group)
            timings["chat_search_sorted_view_ms"] = await filtered(  # room-77, -77x, -77xx
                "document.getElementById('q').value = 'room-77';"
                " document.getElementById('order').value = 'desc';"
                " const s = document.getElementById('sort'); s.value = 'last_active';"
                " s.dispatchEvent(new Event('change'))",
                lambda x: "sort=last_active" in x["query"] and x["total"] == 111)
            rows = await page(js, browser, "return document.querySelectorAll("
                              "'#sessions tbody tr').length")
            assert rows == 50
            # next and back by the server's cursor (X-Next-Cursor), as across shards
            shown = listed(browser)
            second = await filtered("document.getElementById('next').click()",
                                    lambda x: x["first"] == 51)
            after = listed(browser)
            assert after["rows"] == 50 and set(after["ids"]).isdisjoint(shown["ids"])
            expect = await client.get("/v1/sessions", params={
                "q": "room-77", "order": "desc", "sort": "last_active", "limit": "100"})
            assert after["ids"] == [r["session_id"] for r in expect.json()[50:]]
            await filtered("document.getElementById('prev').click()",
                           lambda x: x["first"] == 1 and x["ids"] == shown["ids"])
            timings["next_page_view_ms"] = second
            print("\nconsole with", TOTAL, "sessions (ms):",
                  ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "; load average",
                  " ".join(f"{x:.1f}" for x in os.getloadavg()))
            # the figures are measurements (printed, and in the README), not targets a
            # loaded CI host must meet: only a view that never comes fails here
            for name in ("first_page_on_screen_ms", "search_view_ms",
                         "chat_search_sorted_view_ms"):
                assert timings[name] < 30_000, (name, timings)

    run(body(), timeout=300)
