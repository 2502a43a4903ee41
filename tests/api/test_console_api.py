"""The console's routes over HTTP against a real supervisor (reference agent, real
SQLite, uvicorn on the test's loop): the fleet and its history, the paged sessions
list (and that the old unpaged form still answers the same), a session's timeline,
answering a question card, series, groups, and the page's own files and headers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from orchestrator.rules.scheduling import new_series_id
from tests.support.api_helpers import api_supervised, message
from tests.support.e2e import Client, make_config, replies_to, run
from tests.support.helpers import until

LIFECYCLE = {"idle_after": 60, "stop_idle_after": 60}


async def _two_sessions(cfg, client) -> tuple[str, str]:
    a = (await client.post("/v1/messages", json=message("hi"))).json()
    b = (await client.post("/v1/messages", json=message("yo", group="writers",
                                                        platform_id="room-2"))).json()
    for created in (a, b):
        await until(lambda c=created: replies_to(cfg, c["message_id"]), timeout=30)
    return a["session_id"], b["session_id"]


def test_fleet_counts_and_history(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle=LIFECYCLE)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            await _two_sessions(cfg, client)
            fleet = (await client.get("/v1/fleet")).json()
            assert fleet["tiles"]["sessions"]["running"] + fleet["tiles"]["sessions"][
                "idle"] == 2
            assert fleet["tiles"]["total"] == 2 and fleet["tiles"]["agents"] == 2
            assert fleet["interval_seconds"] == 10.0
            # the history counts what happened since its first sample (at start-up)
            assert fleet["last_hour"]["delivered"] == 2, fleet["last_hour"]
            last = fleet["samples"][-1]
            assert last["running"] == 2 and last["starts"] + sum(
                s["starts"] for s in fleet["samples"][:-1]) == 2
            assert any(s["delay_p50"] is not None for s in fleet["samples"])

    run(body(), timeout=90)


def test_sessions_list_pages_filters_and_stays_compatible(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle=LIFECYCLE)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            a, b = await _two_sessions(cfg, client)
            every = (await client.get("/v1/sessions")).json()
            assert {r["session_id"] for r in every} == {a, b}
            assert set(every[0]) >= {"agent_group", "container_status", "pending", "routing"}

            resp = await client.get("/v1/sessions", params={"limit": "1", "sort": "session_id"})
            assert resp.headers["X-Total-Count"] == "2"
            assert [r["session_id"] for r in resp.json()] == [min(a, b)]
            resp = await client.get("/v1/sessions", params={"limit": "1", "offset": "1",
                                                             "sort": "session_id"})
            assert [r["session_id"] for r in resp.json()] == [max(a, b)]
            resp = await client.get("/v1/sessions", params={"q": "ROOM-2"})
            assert [r["session_id"] for r in resp.json()] == [b]
            assert resp.json()[0]["pending"] == 0  # the page's files were read
            resp = await client.get("/v1/sessions", params={"agent_group": "writers",
                                                            "status": "stopped"})
            assert resp.json() == [] and resp.headers["X-Total-Count"] == "0"
            for bad in ({"status": "dead"}, {"limit": "0"}, {"sort": "pending"}):
                resp = await client.get("/v1/sessions", params=bad)
                assert resp.status_code == 400 and set(resp.json()) == {"error"}

    run(body(), timeout=90)


def test_timeline_answer_series_and_groups(tmp_path: Path, reap_agents) -> None:
    secret = tmp_path / "key"
    secret.write_text("s3cr3t")
    cfg = make_config(tmp_path, lifecycle=LIFECYCLE,
                      groups={"helpers": {"env": {"MODE": "x"},
                                          "env_files": {"KEY": str(secret)}}})

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            a, _ = await _two_sessions(cfg, client)
            resp = await client.post(f"/v1/sessions/{a}/stop")
            assert resp.status_code == 202
            await until(lambda: sup.tracked[a].status == "stopped")
            tl = (await client.get(f"/v1/sessions/{a}/timeline")).json()
            assert [c["new"] for c in tl["changes"]][:1] == ["running"]
            assert tl["runs"][-1]["exit_reason"].startswith("stopped: requested")
            assert (await client.get("/v1/sessions/sess-nope/timeline")).status_code == 404

            # answer: a system row in the session's inbound.db, NanoClaw's shape
            resp = await client.post(f"/v1/sessions/{a}/answer",
                                     json={"question_id": "q-1", "option": "yes"})
            assert resp.status_code == 201, resp.text
            mid = resp.json()["message_id"]
            msgs = (await client.get(f"/v1/sessions/{a}/messages")).json()["messages"]
            found = [m for m in msgs if m["id"] == mid]
            assert found and found[0]["kind"] == "system"
            assert found[0]["content"] == {"type": "question_response", "questionId": "q-1",
                                           "selectedOption": "yes", "userId": ""}
            for bad in ({"question_id": "q"}, {"question_id": 1, "option": "x"},
                        {"question_id": "q", "option": "x", "extra": 1}):
                resp = await client.post(f"/v1/sessions/{a}/answer", json=bad)
                assert resp.status_code == 400, bad
            resp = await client.post("/v1/sessions/sess-nope/answer",
                                     json={"question_id": "q", "option": "x"})
            assert resp.status_code == 404

            # series: listed, cancelled (the pending occurrence removed from inbound.db)
            c = Client(cfg)
            with c.registry:
                s = c.registry.session(a)
                series_id = new_series_id()
                c.registry.add_series(series_id, a, "helpers", "0 3 * * *", "UTC")
                c.sessions.write_message(s, {"text": "daily"}, routing=("chat", "room-1", None),
                                         process_after=datetime.now(timezone.utc)
                                         + timedelta(hours=5), recurrence="0 3 * * *",
                                         series_id=series_id)
            listed = (await client.get("/v1/series", params={"session_id": a})).json()
            assert [(r["series_id"], r["state"]) for r in listed] == [(series_id, "active")]
            resp = await client.post(f"/v1/series/{series_id}/cancel")
            assert resp.status_code == 200 and resp.json()["removed_pending"] == 1
            listed = (await client.get("/v1/series")).json()
            assert [r["state"] for r in listed] == ["cancelled"]
            assert (await client.post("/v1/series/ser-nope/cancel")).status_code == 404
            assert (await client.post("/v1/series/..%2F/cancel")).status_code == 404

            groups = {g["group"]: g for g in (await client.get("/v1/groups")).json()}
            assert set(groups) == {"helpers", "writers"}
            shown = groups["helpers"]["settings"]
            assert shown["env"] == {"MODE": "(set)"} and shown["env_files"] == {
                "KEY": str(secret)}
            assert "s3cr3t" not in (await client.get("/v1/groups")).text
            assert groups["helpers"]["configured"] and not groups["writers"]["configured"]
            assert groups["helpers"]["series"][0]["series_id"] == series_id
            assert groups["writers"]["sessions"] == 1

    run(body(), timeout=90)


def test_the_page_and_its_files(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            async with httpx.AsyncClient(base_url=str(client.base_url)) as anon:  # no token
                page = await anon.get("/")
                assert page.status_code == 200
                csp = page.headers["Content-Security-Policy"]
                assert csp.startswith("default-src 'self'") and "unsafe" not in csp
                assert "<script>" not in page.text and "/console/console.js" in page.text
                js = await anon.get("/console/console.js")
                assert js.status_code == 200
                assert js.headers["content-type"].startswith("text/javascript")
                assert "innerHTML" not in js.text.replace("never innerHTML", "")
                css = await anon.get("/console/console.css")
                assert css.headers["content-type"].startswith("text/css")
                assert (await anon.get("/console/../app.py")).status_code == 404
                assert (await anon.get("/console/nope.js")).status_code == 404
                assert (await anon.get("/v1/fleet")).status_code == 401

    run(body(), timeout=60)
