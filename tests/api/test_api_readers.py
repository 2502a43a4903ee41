"""``GET /v1/sessions`` and ``GET /v1/sessions/{id}`` (the real API over httpx, inside
a real supervisor) over a data dir where every hostile case of tests/support/hostile.py
is planted, each in its own session: every answer comes in time, each bad session's
row has a one-line error, the good rows are whole, no worker thread is left blocked
(``POST /v1/messages`` still answers, for a good session and a bad one) —
docs/contract.md §11, "Every reader is contained"."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.support.api_helpers import api_supervised
from tests.support.e2e import make_config
from tests.support.hostile import LATER, build_world, release_fifos, table

BOUND = 5.0  # seconds per request


async def within(coro, what: str, root: Path):
    start = time.monotonic()
    try:
        resp = await asyncio.wait_for(coro, BOUND)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        release_fifos(root)
        raise AssertionError(f"{what} did not answer within {BOUND}s") from None
    assert time.monotonic() - start < BOUND
    return resp


async def test_session_routes_contain_every_hostile_session(tmp_path: Path,
                                                            reap_agents) -> None:
    cfg = make_config(tmp_path)
    cases = table(tmp_path)
    world = build_world(cfg.data_dir, cases)
    async with api_supervised(cfg) as (_sup, client):
        # more at once than the worker threads asyncio.to_thread has (min(32, cpus + 4))
        answers = await within(asyncio.gather(*(client.get("/v1/sessions")
                                                for _ in range(12))),
                               "GET /v1/sessions", tmp_path)
        for resp in answers:
            assert resp.status_code == 200, resp.text
            rows = {r["session_id"]: r for r in resp.json()}
            assert len(rows) == len(world.good) + len(cases)
            for g in world.good:
                assert rows[g.id]["error"] is None, rows[g.id]["error"]
                assert rows[g.id]["pending"] == 1 and rows[g.id]["last_heartbeat"]
            for case, row in world.bad.items():
                err = rows[row.id]["error"]
                assert err and "\n" not in err, (case, err)
        for case, row in world.bad.items():
            one = await within(client.get(f"/v1/sessions/{row.id}"),
                               f"GET /v1/sessions/{row.id} ({case})", tmp_path)
            assert one.status_code == 200 and one.json()["error"], (case, one.text)
        for n, case in enumerate(cases):  # writing to a bad session answers too
            resp = await within(client.post("/v1/messages", json={
                "agent_group": f"bad-{n}", "channel": "cli", "platform_id": f"bad-{n}",
                "content": {"text": "hi"}, "process_after": LATER.isoformat()}),
                f"POST /v1/messages to the {case} session", tmp_path)
            # taken, or refused with the one line naming what is wrong: never a hang
            assert resp.status_code == 201 or (resp.status_code == 500 and "cannot" in
                                               resp.json()["error"]), (case, resp.text)
        resp = await within(client.post("/v1/messages", json={
            "agent_group": "good", "channel": "cli", "platform_id": "good-1",
            "content": {"text": "hi"}, "process_after": LATER.isoformat()}),
            "POST /v1/messages to a good session", tmp_path)
        assert resp.status_code == 201, resp.text
        assert resp.json()["session_id"] == world.good[1].id


async def test_the_messages_route_contains_every_hostile_session(tmp_path: Path,
                                                                 reap_agents) -> None:
    """``GET /v1/sessions/{id}/messages`` over every hostile case: each answers in time
    with the page (what could be read), a 404 (nothing there) or a one-line 409 naming
    why — never a 500 or a hang — and the good sessions' pages are whole."""
    cfg = make_config(tmp_path)
    cases = table(tmp_path)
    world = build_world(cfg.data_dir, cases)
    async with api_supervised(cfg) as (_sup, client):
        for case, row in world.bad.items():
            resp = await within(client.get(f"/v1/sessions/{row.id}/messages"),
                                f"GET /v1/sessions/{row.id}/messages ({case})", tmp_path)
            assert resp.status_code in (200, 404, 409), (case, resp.text)
            if resp.status_code != 200:
                assert "\n" not in resp.json()["error"], (case, resp.text)
        for g in world.good:
            page = (await within(client.get(f"/v1/sessions/{g.id}/messages"),
                                 "a good session's messages", tmp_path)).json()
            assert [m["direction"] for m in page["messages"]] == ["in"], page
            assert page["messages"][0]["problem"] is None
