"""Retries that last, and failed replies retried by hand: a real supervisor, the
reference agent, a real receiver (every request verified with ``standardwebhooks``),
the HTTP API and the CLI (``orchestrator deliveries retry``)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import tomli_w

from orchestrator.api.events import EventStore
from orchestrator.cli.commands import main
from orchestrator.cli.deliveries import listen_url
from tests.channels.test_webhook import all_verified, delivered, webhook_config, write_secret
from tests.support.api_helpers import Receiver, api_supervised, free_port, url_of
from tests.support.e2e import Client, config_dict, supervised
from tests.support.helpers import until


class Switch:
    """Answers every reply POST with ``status`` (changed by the test); records 200."""

    def __init__(self, status: int) -> None:
        self.status = status

    def __call__(self, body: dict):
        return (self.status if body["type"] == "reply" else 200), 0.0, {}


def write_config(tmp_path: Path, url: str, **delivery) -> Path:
    data = config_dict(tmp_path, delivery={"channel": "webhook", "url": url, "retry_base": 0.1,
                                           "timeout": 2.0, **delivery})
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def test_failed_replies_are_retried_through_the_api(tmp_path: Path, reap_agents) -> None:
    switch = Switch(400)  # refused for good: failed at once
    receiver = await Receiver("", switch).start()
    cfg = webhook_config(tmp_path, receiver.url)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with api_supervised(cfg) as (_, api):
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), message="failed")
        [(out_id, status)] = delivered(cfg, client, row).items()
        assert status == "failed"
        switch.status = 200
        resp = await api.post("/v1/deliveries/retry", json={"session_id": "sess-nope"})
        assert resp.status_code == 404 and "no session" in resp.json()["error"]
        resp = await api.post("/v1/deliveries/retry", json={"session_id": 7})
        assert resp.status_code == 400
        resp = await api.post("/v1/deliveries/retry", json={"session_id": row.id})
        assert resp.status_code == 200 and resp.json() == {"retried": 1}
        await until(lambda: delivered(cfg, client, row) == {out_id: "delivered"},
                    message="delivered after the retry")
        posts = receiver.replies(out_id)
        assert len(posts) == 2 and {p.headers["webhook-id"] for p in posts} == {out_id}
        resp = await api.post("/v1/deliveries/retry", content=b"")  # all sessions: none left
        assert resp.json() == {"retried": 0}
        text = (await api.get("/metrics")).text
        assert 'orchestrator_webhook_responses_total{code="400"} 1.0' in text
        assert 'orchestrator_webhook_responses_total{code="200"}' in text
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_the_cli_retries_through_a_running_orchestrator(tmp_path: Path,
                                                              reap_agents, capsys) -> None:
    switch = Switch(400)
    receiver = await Receiver("", switch).start()
    cfg = webhook_config(tmp_path, receiver.url)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with api_supervised(cfg) as (_, api):
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), message="failed")
        switch.status = 200
        argv = ["deliveries", "retry", "--url", url_of(api), "--token-file",
                cfg.api.token_file, "--session", row.id, "--json",
                "--config", str(tmp_path / "none.toml")]
        assert await asyncio.to_thread(main, argv) == 0
        assert json.loads(capsys.readouterr().out) == {"retried": 1}
        await until(lambda: set(delivered(cfg, client, row).values()) == {"delivered"},
                    message="delivered after the retry")
        bad = argv[:-2][:6] + ["--session", "sess-nope"]
        assert await asyncio.to_thread(main, bad) == 2
        assert "no session 'sess-nope'" in capsys.readouterr().err
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_the_cli_retries_on_the_files_when_none_runs(tmp_path: Path, reap_agents,
                                                           capsys) -> None:
    switch = Switch(400)
    receiver = await Receiver("", switch).start()
    path = write_config(tmp_path, receiver.url)
    cfg = webhook_config(tmp_path, receiver.url)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), message="failed")
    assert set(delivered(cfg, client, row).values()) == {"failed"}
    assert main(["deliveries", "retry", "--config", str(path)]) == 0
    assert capsys.readouterr().out == "1 failed reply re-queued\n"
    assert delivered(cfg, client, row) == {}  # settled no more: planned afresh
    assert main(["deliveries", "retry", "--config", str(path), "--session", "sess-x"]) == 2
    switch.status = 200
    async with supervised(cfg):
        await until(lambda: set(delivered(cfg, client, row).values()) == {"delivered"},
                    message="delivered after the restart")
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_retries_end_at_the_horizon(tmp_path: Path, reap_agents) -> None:
    """A receiver that is down for good: attempts keep coming (jittered, each at least
    retry_base apart) until retry_horizon after the reply was written, then it is
    recorded failed with the reason, and the failure record says so."""
    receiver = await Receiver("", Switch(503)).start()
    cfg = webhook_config(tmp_path, receiver.url, retry_horizon=1.5, retry_base=0.1,
                         retry_max_delay=0.4)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        started = time.time()
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), timeout=30, message="failed")
        await until(lambda: receiver.failures(), message="the failure record")
    [(out_id, status)] = delivered(cfg, client, row).items()
    assert status == "failed"
    stamps = [p.at_wall for p in receiver.replies(out_id)]
    assert len(stamps) >= 4  # 1.5 s of retries, 0.1 to 0.4 s apart
    assert stamps[-1] - started <= 1.5 + 1.0  # nothing after the horizon (+ the POST)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # the last one may be shorter: the backoff is cut to make a last attempt at the horizon
    assert min(gaps[:-1]) >= 0.09 and max(gaps) <= 0.4 + 0.5
    [failure] = receiver.failures()
    assert "retry_horizon" in failure.json["reason"] and failure.json["id"] == out_id
    assert failure.json["timestamp"].endswith("Z")
    assert failure.headers["webhook-id"] == f"failure-reply-{out_id}"
    all_verified(receiver)
    await receiver.stop()
    client.close()


def test_listen_url() -> None:
    assert listen_url("127.0.0.1:8750") == "http://127.0.0.1:8750"
    assert listen_url("0.0.0.0:80") == "http://127.0.0.1:80"
    assert listen_url("[::1]:9") == "http://[::1]:9"
    assert listen_url("unix:/run/o.sock") == "unix:/run/o.sock"
    assert listen_url("127.0.0.1:0") is None and listen_url("") is None


async def test_status_and_failure_events_go_to_the_webhook_with_the_sse_ids(
        tmp_path: Path, reap_agents) -> None:
    receiver = await Receiver("", Switch(400)).start()
    cfg = webhook_config(tmp_path, receiver.url, events=["status", "failure"])
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with api_supervised(cfg) as (sup, api):
        row, _ = client.send("helpers", "hello")
        await until(lambda: any(r.json["type"] == "reply_failed" for r in receiver.requests),
                    message="the reply_failed event")
        await until(lambda: any(r.json["type"] == "status" and r.json["status"] == "stopped"
                                for r in receiver.requests), timeout=30,
                    message="the stopped status event")
        logged = {e.id: e for e in api_events(sup)}
    events = [r for r in receiver.requests if r.json["type"] in ("status", "reply_failed")]
    for r in events:
        e = logged[r.json["id"]]  # the id of GET /v1/events
        assert r.headers["webhook-id"] == f"event-{e.id}"
        assert r.json["type"] == e.kind and r.json["session_id"] == row.id == e.data[
            "session_id"]
        assert r.json["at"].endswith("Z") and "T" in r.json["at"]
    statuses = [r.json["status"] for r in events if r.json["type"] == "status"]
    assert statuses[:1] == ["running"] and "stopped" in statuses
    assert not any(r.json["type"] == "reply_delivered" for r in receiver.requests)
    all_verified(receiver)
    await receiver.stop()
    client.close()


def api_events(sup) -> list:
    """What ``GET /v1/events`` replays: the event log of this orchestrator."""
    store = EventStore(sup.cfg.data_dir / "events.db")
    try:
        return store.since(0)
    finally:
        store.close()


async def test_no_answer_is_counted_as_code_error(tmp_path: Path, reap_agents) -> None:
    port = free_port()  # nobody listens: every POST is refused
    cfg = webhook_config(tmp_path, f"http://127.0.0.1:{port}/hook", retry_base=0.05)
    write_secret(cfg)
    client = Client(cfg)
    async with api_supervised(cfg) as (_, api):
        client.send("helpers", "hello")

        async def errors() -> float:
            text = (await api.get("/metrics")).text
            line = [ln for ln in text.splitlines()
                    if ln.startswith('orchestrator_webhook_responses_total{code="error"}')]
            return float(line[0].split()[-1]) if line else 0.0

        deadline = time.monotonic() + 20
        while await errors() < 2:
            assert time.monotonic() < deadline, "no refused POSTs counted"
            await asyncio.sleep(0.05)
    client.close()
