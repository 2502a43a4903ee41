"""DELETE /v1/sessions/{id} (issue 26.1) against the whole orchestrator: a running agent
is stopped first, pending work refuses it (409) unless forced, and an archived session
restored while ``run`` runs answers its chat again."""

from __future__ import annotations

from pathlib import Path

from orchestrator.contract.layout import registry_path, session_dir
from orchestrator.host.registry import Registry
from orchestrator.host.retention import Retention
from tests.support.api_helpers import api_supervised, message
from tests.support.e2e import make_config, replies_to
from tests.support.helpers import until


async def test_delete_stops_the_agent_archives_and_a_restore_answers_again(
        tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle={"stop_idle_after": 60.0})  # the agent stays up
    async with api_supervised(cfg) as (sup, client):
        created = (await client.post("/v1/messages", json=message("hi"))).json()
        sid = created["session_id"]
        await until(lambda: replies_to(cfg, created["message_id"]))
        assert sup.runtime.is_running(sid)

        async def events_of(session_id: str) -> list:
            page = (await client.get("/v1/events?last_event_id=0",
                                     headers={"Accept": "application/json"})).json()
            return [e for e in page["events"] if e.get("session_id") == session_id]

        assert await events_of(sid)  # its status changes and its reply
        resp = await client.delete(f"/v1/sessions/{sid}", params={"archive": "true"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["action"] == "archived" and Path(body["archive"]).is_file()
        assert not sup.runtime.is_running(sid)
        assert not session_dir(cfg.data_dir, "helpers", sid).exists()
        assert (await client.get(f"/v1/sessions/{sid}")).status_code == 404
        assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 404
        assert await events_of(sid) == []  # forgotten with it
        metrics = (await client.get("/metrics")).text
        [line] = [ln for ln in metrics.splitlines()
                  if ln.startswith('orchestrator_sessions_removed_total{action="archived"')]
        assert line.endswith(" 1.0")

        # restored while run runs: the watcher finds a folder the registry knows
        with Registry(registry_path(cfg.data_dir)) as reg:
            assert Retention(cfg.data_dir, reg, cfg.retention).restore(sid).action == "restored"
        await until(lambda: sid in sup.tracked, message="the restored session tracked")
        again = (await client.post("/v1/messages", json=message("back?"))).json()
        assert again["session_id"] == sid
        [reply] = await until(lambda: replies_to(cfg, again["message_id"]))
        assert reply["content"]["text"] == "echo: back?"


async def test_pending_work_is_409_unless_forced(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path)
    async with api_supervised(cfg) as (sup, client):
        later = message("later", process_after="2099-01-01T00:00:00Z")
        created = (await client.post("/v1/messages", json=later)).json()
        sid = created["session_id"]
        resp = await client.delete(f"/v1/sessions/{sid}")
        assert resp.status_code == 409
        text = resp.json()["error"]
        assert "1 pending message" in text and "force" in text and "\n" not in text
        assert session_dir(cfg.data_dir, "helpers", sid).is_dir()
        await until(lambda: sid in sup.tracked, message="kept: tracked again")
        assert (await client.delete(f"/v1/sessions/{sid}?force=maybe")).status_code == 400
        resp = await client.delete(f"/v1/sessions/{sid}", params={"force": "true"})
        assert resp.status_code == 200 and resp.json() == {
            "session_id": sid, "action": "deleted", "archive": None}
        assert not session_dir(cfg.data_dir, "helpers", sid).exists()
        assert sid not in sup.tracked
        assert (await client.delete("/v1/sessions/sess-nope")).status_code == 404
