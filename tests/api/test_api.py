"""The HTTP API end to end: a real uvicorn on an ephemeral port inside the
supervisor's loop, a real httpx client, the reference agent as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx
import pytest
import tomli_w

from orchestrator.api.auth import ApiConfigError
from orchestrator.cli import commands as cli
from orchestrator.contract.layout import registry_path, session_paths
from tests.support.api_helpers import SseReader, api_supervised, message, token_of, url_of
from tests.support.e2e import config_dict, make_config, replies_to, run, serving, supervised
from tests.support.helpers import query, until


def inbound_ids(cfg, group: str, session_id: str) -> list[str]:
    paths = session_paths(cfg.data_dir, group, session_id)
    return [r[0] for r in query(paths.inbound_db, "SELECT id FROM messages_in ORDER BY seq")]


def session_count(cfg) -> int:
    return query(registry_path(cfg.data_dir), "SELECT COUNT(*) FROM sessions")[0][0]


async def test_post_message_gets_a_reply_and_the_session_shows_up(tmp_path: Path,
                                                            reap_agents) -> None:
    cfg = make_config(tmp_path)

    async with api_supervised(cfg) as (sup, client):
        data = base64.b64encode(b"bytes").decode()
        resp = await client.post("/v1/messages", json=message(
            "hi", content={"text": "hi", "attachments": [{"name": "a.txt", "data": data}]},
            thread_id="t1", mode="per-thread"))
        assert resp.status_code == 201, resp.text
        created = resp.json()
        assert set(created) == {"session_id", "message_id"}
        [reply] = await until(lambda: replies_to(cfg, created["message_id"]))
        assert reply["content"]["text"] == "echo: hi"
        assert (reply["channel_type"], reply["platform_id"], reply["thread_id"]) == (
            "chat", "room-1", "t1")

        resp = await client.get("/v1/sessions")
        assert resp.status_code == 200
        [row] = resp.json()
        assert row["session_id"] == created["session_id"]
        assert row["agent_group"] == "helpers"
        assert row["routing"] == {"channel_type": "chat", "platform_id": "room-1",
                                  "thread_id": "t1"}
        assert row["container_status"] in ("running", "idle", "stopped")
        assert {"pending", "processing", "failed", "completed", "last_active",
                "last_heartbeat", "status_reason", "created_at"} <= set(row)
        one = await client.get(f"/v1/sessions/{created['session_id']}")
        assert one.status_code == 200 and one.json()["session_id"] == created["session_id"]
        assert (await client.get("/v1/sessions?agent_group=other")).json() == []
        assert len((await client.get("/v1/sessions?agent_group=helpers")).json()) == 1
        assert (await client.get("/v1/sessions/sess-nope")).status_code == 404


async def test_a_posted_message_makes_its_chat_a_destination_of_the_group(tmp_path: Path,
                                                                     reap_agents) -> None:
    """Like ``send``: every chat that routes to a group is one of its destinations,
    in the session it writes to before the message (a running agent can answer it)."""
    cfg = make_config(tmp_path)

    async with api_supervised(cfg) as (sup, client):
        first = (await client.post("/v1/messages", json=message(
            "one", mode="agent-shared"))).json()
        second = (await client.post("/v1/messages", json=message(
            "two", mode="agent-shared", platform_id="room-2"))).json()
        assert first["session_id"] == second["session_id"]
        db = session_paths(cfg.data_dir, "helpers", first["session_id"]).inbound_db
        names = query(db, "SELECT name, channel_type, platform_id FROM destinations")
        assert sorted(names) == [("chat:room-1", "chat", "room-1"),
                                 ("chat:room-2", "chat", "room-2")]
        assert sorted(query(registry_path(cfg.data_dir),
                            "SELECT channel_type, platform_id FROM group_chats")) == [
            ("chat", "room-1"), ("chat", "room-2")]


async def test_every_v1_endpoint_needs_the_token_health_and_metrics_do_not(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async with api_supervised(cfg) as (sup, client):
        token = token_of(cfg)
        assert (Path(cfg.api.token_file).stat().st_mode & 0o777) == 0o600
        async with httpx.AsyncClient(base_url=url_of(client)) as anon:
            for method, path in (("GET", "/v1/sessions"), ("GET", "/v1/sessions/x"),
                                 ("POST", "/v1/messages"), ("POST", "/v1/sessions/x/stop"),
                                 ("GET", "/v1/events")):
                resp = await anon.request(method, path)
                assert resp.status_code == 401, (method, path)
                assert resp.headers["www-authenticate"] == "Bearer"
                assert token not in resp.text
                wrong = await anon.request(method, path,
                                           headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                assert "error" in wrong.json()
            assert (await anon.get("/healthz")).status_code == 200
            assert (await anon.get("/readyz")).status_code == 200
            assert (await anon.get("/metrics")).status_code == 200
            page = await anon.get("/")
            assert page.status_code == 200 and "/console/console.js" in page.text
            assert token not in page.text


async def test_metrics_auth_true_requires_the_token(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, api={"listen": "127.0.0.1:0", "metrics_auth": True})

    async with api_supervised(cfg) as (sup, client):
        async with httpx.AsyncClient(base_url=url_of(client)) as anon:
            assert (await anon.get("/metrics")).status_code == 401
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.parametrize("payload, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"content": {"text": "x"}}', "agent_group must be a string (required)"),
    (b'{"agent_group": "g", "content": "x"}', "content must be a JSON object"),
    (b'{"agent_group": "g", "content": {}, "colour": 1}', "unknown field 'colour'"),
    (b'{"agent_group": "g", "content": {}, "mode": "x"}', "mode must be one of"),
    (b'{"agent_group": "../g", "content": {}}', "agent group"),
    (b'{"agent_group": "g", "content": {}, "process_after": "soon"}', "process_after"),
    (b'{"agent_group": "g", "content": {"attachments": [{"name": "a", "data": "!!"}]}}',
     "base64"),
])
async def test_bad_bodies_are_400_with_one_line_and_write_nothing(tmp_path: Path, payload: bytes,
                                                            fragment: str) -> None:
    cfg = make_config(tmp_path)

    async with api_supervised(cfg) as (sup, client):
        resp = await client.post("/v1/messages", content=payload,
                                 headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert fragment in err and "\n" not in err
        assert session_count(cfg) == 0


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, sessions={"max_attachment_bytes": 1000})

    async with api_supervised(cfg) as (sup, client):
        big = {"name": "a.bin", "data": base64.b64encode(b"x" * 3_000_000).decode()}
        resp = await client.post("/v1/messages", json=message(
            content={"text": "x", "attachments": [big]}))
        assert resp.status_code == 413 and "max_attachment_bytes" in resp.json()["error"]
        small_but_over = {"name": "a.bin", "data": base64.b64encode(b"x" * 2000).decode()}
        resp = await client.post("/v1/messages", json=message(
            content={"text": "x", "attachments": [small_but_over]}))
        assert resp.status_code == 400 and "1000" in resp.json()["error"]
        assert session_count(cfg) == 0


async def test_a_retried_post_with_the_same_idempotency_key_writes_one_message(tmp_path: Path,
                                                                         reap_agents) -> None:
    cfg = make_config(tmp_path)

    async with api_supervised(cfg) as (sup, client):
        headers = {"Idempotency-Key": "order-42"}
        first = await client.post("/v1/messages", json=message("once"), headers=headers)
        assert first.status_code == 201
        again = await client.post("/v1/messages", json=message("once"), headers=headers)
        assert again.status_code == 201 and again.json() == first.json()
        # concurrent retries of another key: still one message
        other = {"Idempotency-Key": "order-43"}
        results = await asyncio.gather(*(client.post("/v1/messages", json=message("twice"),
                                                     headers=other) for _ in range(5)))
        assert {r.status_code for r in results} == {201}
        assert len({r.json()["message_id"] for r in results}) == 1
        sid = first.json()["session_id"]
        assert sorted(inbound_ids(cfg, "helpers", sid)) == sorted(
            [first.json()["message_id"], results[0].json()["message_id"]])
        # the same key with a different body is refused, not replayed
        clash = await client.post("/v1/messages", json=message("different"),
                                  headers=headers)
        assert clash.status_code == 422 and "different body" in clash.json()["error"]
        bad = await client.post("/v1/messages", json=message("x"),
                                headers={"Idempotency-Key": "k" * 201})
        assert bad.status_code == 400
    # keys survive a restart (kept in the registry)
    async with api_supervised(cfg) as (sup, client):
        again = await client.post("/v1/messages", json=message("once"), headers=headers)
        assert again.json() == first.json()
        assert len(inbound_ids(cfg, "helpers", first.json()["session_id"])) == 2


async def test_stop_endpoint_stops_the_agent(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle={"idle_after": 30, "stop_idle_after": 30})

    async with api_supervised(cfg) as (sup, client):
        created = (await client.post("/v1/messages", json=message("hi"))).json()
        sid = created["session_id"]
        await until(lambda: replies_to(cfg, created["message_id"]))
        resp = await client.post(f"/v1/sessions/{sid}/stop")
        assert resp.status_code == 202, resp.text
        await until(lambda: sup.tracked[sid].status == "stopped")
        row = (await client.get(f"/v1/sessions/{sid}")).json()
        assert row["container_status"] == "stopped"
        assert row["status_reason"].startswith("stopped: requested through the API")
        again = await client.post(f"/v1/sessions/{sid}/stop")
        assert again.status_code == 409
        assert (await client.post("/v1/sessions/sess-nope/stop")).status_code == 404
        text = (await client.get("/metrics")).text
        assert ('orchestrator_agent_stops_total{agent_group="other",reason="requested"} 1.0'
                in text)


async def test_metrics_after_a_round_trip(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path)

    async with api_supervised(cfg) as (sup, client):
        created = (await client.post("/v1/messages", json=message("hi"))).json()
        await until(lambda: replies_to(cfg, created["message_id"]))
        await until(lambda: sup.tracked[created["session_id"]].status == "stopped")
        text = (await client.get("/metrics")).text
        other = 'agent_group="other"'  # "helpers" is not a configured group
        for line in (f'orchestrator_replies_delivered_total{{{other},channel="jsonl"}} 1.0',
                     f'orchestrator_replies_failed_total{{{other},channel="jsonl"}} 0.0',
                     f'orchestrator_agent_starts_total{{{other},result="ok",runtime="local"}} 1.0',
                     f'orchestrator_agent_stops_total{{{other},reason="idle"}} 1.0',
                     'orchestrator_sessions{status="stopped"} 1.0',
                     'orchestrator_sessions{status="running"} 0.0',
                     f'orchestrator_reply_delivery_delay_seconds_count{{{other},channel="jsonl"}}'
                     ' 1.0',
                     f'orchestrator_agent_start_duration_seconds_count{{{other},runtime="local"}}'
                     ' 1.0',
                     f'orchestrator_admission_wait_seconds_count{{{other}}} 1.0',
                     f"orchestrator_messages_failed_total{{{other}}} 0.0",
                     "orchestrator_admission_queue_length 0.0",
                     'orchestrator_http_request_duration_seconds_count{code="201",method="POST",'
                     'route="/v1/messages"} 1.0',
                     'orchestrator_watch_rescans_total{cause="events_lost"}'):
            assert line in text, line
        assert "orchestrator_build_info{" in text
        watches = [ln for ln in text.splitlines()
                   if ln.startswith("orchestrator_inotify_watches ")]
        assert len(watches) == 1 and float(watches[0].split()[1]) >= 4


def test_sse_reconnect_with_last_event_id_across_a_restart_misses_nothing(
        tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path)

    async def body() -> None:
        async with api_supervised(cfg) as (sup, client):
            reader = SseReader(client).start()
            await asyncio.wait_for(reader.connected.wait(), 10)
            first = (await client.post("/v1/messages", json=message("one"))).json()
            await until(lambda: "reply_delivered" in [e["event"] for e in reader.events])
            await until(lambda: sup.tracked[first["session_id"]].status == "stopped")
            await until(lambda: reader.events and reader.events[-1]["event"] == "status"
                        and reader.events[-1]["data"]["status"] == "stopped")
            await reader.stop()  # the client goes away ...
            seen = reader.ids()
            assert seen == sorted(seen) and len(seen) == len(set(seen))
            # ... and misses events while the orchestrator restarts
            second = (await client.post("/v1/messages", json=message("two"))).json()
            await until(lambda: replies_to(cfg, second["message_id"]))
        async with api_supervised(cfg) as (sup, client):  # a new port, the same data
            third = (await client.post("/v1/messages", json=message("three"))).json()
            await until(lambda: replies_to(cfg, third["message_id"]))
            await until(lambda: sup.tracked[third["session_id"]].status == "stopped")
            back = SseReader(client, last_id=seen[-1]).start()
            stored = [r[0] for r in query(tmp_path / "data" / "events.db",
                                          "SELECT id FROM events WHERE id > ? ORDER BY id",
                                          (seen[-1],))]
            await until(lambda: back.ids() == stored, message="replay of the missed events")
            kinds = [e["event"] for e in back.events]
            assert kinds.count("reply_delivered") == 2
            delivered = [e["data"]["message_id"] for e in back.events
                         if e["event"] == "reply_delivered"]
            assert [r["message_id"] for r in replies_to(cfg, second["message_id"])
                    + replies_to(cfg, third["message_id"])] == delivered
            # live events keep coming on the same stream after the replay
            fourth = (await client.post("/v1/messages", json=message("four"))).json()
            await until(lambda: any(e["event"] == "reply_delivered" and e["data"]["message_id"]
                                    == replies_to(cfg, fourth["message_id"])[0]["message_id"]
                                    for e in back.events if replies_to(cfg, fourth["message_id"])))
            ids = back.ids()
            assert ids == sorted(set(ids)) and ids[0] == seen[-1] + 1
            assert ids == list(range(ids[0], ids[-1] + 1))  # no hole
            await back.stop()

    run(body(), timeout=180)


def test_non_loopback_without_a_token_is_refused_at_start(tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    cfg = make_config(tmp_path, api={"listen": "0.0.0.0:0", "token_file": ""})

    async def body() -> None:
        with pytest.raises(ApiConfigError, match="not a loopback address"):
            async with supervised(cfg):
                pass

    run(body())
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(config_dict(tmp_path, api={"listen": "0.0.0.0:0",
                                                             "token_file": ""})))
    capsys.readouterr()
    # keep loguru's sinks as they are (run's own set-up would bind this test's stderr)
    monkeypatch.setattr("orchestrator.cli.logs.setup_logging", lambda *a, **k: None)
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "token_file" in err
    assert not (tmp_path / "data" / "events.db").exists()  # refused before anything started


async def test_loopback_without_a_token_serves_and_a_unix_socket_works(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    cfg = make_config(tmp_path, api={"listen": f"unix:{sock}", "token_file": ""})

    async with serving(cfg) as service:
        assert service.api.url == f"unix:{sock}"
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            assert (await c.get("/v1/sessions")).json() == []
            assert (await c.get("/readyz")).status_code == 200
    assert not sock.exists()


async def test_healthz_fails_when_the_sweep_is_late(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, watch={"sweep_interval": 30})

    async with api_supervised(cfg) as (sup, client):
        assert (await client.get("/healthz")).status_code == 200
        sup.last_sweep = time.monotonic() - 61  # as if the sweep had stalled (limit 60 s)
        resp = await client.get("/healthz")
        assert resp.status_code == 503 and "sweep" in resp.json()["error"]


async def test_many_concurrent_posts_with_keys_to_many_sessions_all_succeed(tmp_path: Path) -> None:
    """API writes run in worker threads: the shared registry and key store must take it."""
    cfg = make_config(tmp_path, runtime={"command": ["/bin/false"]})  # no agents needed

    async with api_supervised(cfg) as (sup, client):
        results = await asyncio.gather(*(
            client.post("/v1/messages", json=message(f"m{i}", platform_id=f"chat-{i % 40}"),
                        headers={"Idempotency-Key": f"k-{i}"}) for i in range(120)))
        assert [r.status_code for r in results] == [201] * 120, [
            r.text for r in results if r.status_code != 201][:3]
        assert len({r.json()["message_id"] for r in results}) == 120
        assert len({r.json()["session_id"] for r in results}) == 40
