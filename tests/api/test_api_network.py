"""The API on the open network, with real parts: a real uvicorn on 127.0.0.1:0 inside
the orchestrator (``api_supervised``), real raw sockets that never speak, dribble or
stall, and browser-style requests (a foreign Host, a foreign Origin, text/plain)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest
import tomli_w

from orchestrator.config.model import Config
from tests.support.api_helpers import api_supervised, message, token_of
from tests.support.e2e import config_dict, make_config, serving
from tests.support.helpers import REPO, until, wait_for
from tests.support.rawnet import RawPool, address, dribble, request

SLACK = 1.5  # s: scheduling on a shared CI core


def net_config(tmp_path: Path, **api) -> Config:
    return make_config(tmp_path, api={"listen": "127.0.0.1:0", **api})


@contextlib.asynccontextmanager
async def no_token(tmp_path: Path, **api) -> AsyncIterator[httpx.AsyncClient]:
    """The API on loopback without a token; a client that sends no Authorization."""
    cfg = net_config(tmp_path, token_file="", **api)
    async with serving(cfg) as service:
        assert service.api.url is not None
        async with httpx.AsyncClient(base_url=service.api.url, timeout=10) as client:
            yield client


# --- connections that never speak, dribble or stall -------------------------------------


async def test_silent_and_dribbling_connections_are_closed_at_the_header_deadline(
        tmp_path: Path) -> None:
    cfg = net_config(tmp_path, header_timeout=1.0)
    async with api_supervised(cfg) as (_, client), RawPool(client) as pool:
        silent = await pool.open(30)
        dribblers = await pool.open(5)
        host = "%s:%d" % address(client)
        tasks = [asyncio.create_task(dribble(d, request("GET", "/v1/sessions", host), 0.2))
                 for d in dribblers]
        started = time.monotonic()
        resp = await client.get("/v1/sessions")  # served meanwhile, at once
        assert resp.status_code == 200 and time.monotonic() - started < 1.0
        for raw in silent + dribblers:
            assert await raw.until_closed(1.0 + SLACK) >= 0.9
        for raw in silent:
            assert raw.status_line() == "HTTP/1.1 408 Request Timeout"
        await asyncio.gather(*tasks)
        assert (await client.get("/healthz")).status_code == 200


async def test_a_body_that_stalls_or_dribbles_is_cut_at_the_body_timeout(
        tmp_path: Path) -> None:
    cfg = net_config(tmp_path, header_timeout=5.0, body_timeout=0.8)
    async with api_supervised(cfg) as (_, client), RawPool(client) as pool:
        host = "%s:%d" % address(client)
        head = request("POST", "/v1/messages", host, {
            "Authorization": f"Bearer {token_of(cfg)}", "Content-Type": "application/json",
            "Content-Length": "1000"})
        stalled, dribbler = await pool.open(2)
        for raw in (stalled, dribbler):
            raw.writer.write(head + b'{"agent_group": ')
        task = asyncio.create_task(dribble(dribbler, b" " * 900, 0.1))
        for raw in (stalled, dribbler):
            assert 0.7 <= await raw.until_closed(0.8 + SLACK)
        await task
        assert (await client.get("/v1/sessions")).json() == []


async def test_an_idle_kept_alive_connection_is_closed_and_a_dribbled_next_request_too(
        tmp_path: Path) -> None:
    cfg = net_config(tmp_path, header_timeout=1.0, keepalive_timeout=0.5)
    async with api_supervised(cfg) as (_, client), RawPool(client) as pool:
        host = "%s:%d" % address(client)
        idle, next_dribbled = await pool.open(2)
        for raw in (next_dribbled, idle):
            raw.writer.write(request("GET", "/healthz", host))
            await raw.reader.readuntil(b"}")  # the whole small JSON answer
        # a byte of the next request every 0.2 s: each resets nothing; closed 1 s after the first
        task = asyncio.create_task(dribble(next_dribbled, request("GET", "/healthz", host),
                                           0.2))
        t1 = time.monotonic()
        await idle.until_closed(10)
        assert (idle.closed_at or 0) - t1 < 0.5 + SLACK  # keepalive_timeout
        await next_dribbled.until_closed(10)
        assert 0.9 <= (next_dribbled.closed_at or 0) - t1 <= 1.0 + SLACK
        await task


async def test_over_the_cap_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    cfg = net_config(tmp_path, header_timeout=30.0, max_connections=8)
    async with api_supervised(cfg) as (_, client), RawPool(client) as pool:
        silent = await pool.open(20)
        started = time.monotonic()
        resp = await client.get("/v1/sessions")  # one more connection: room is made
        assert resp.status_code == 200 and time.monotonic() - started < 2.0
        for raw in silent[:12]:  # the oldest, long before the 30 s deadline
            await raw.until_closed(SLACK)
            assert raw.status_line() == "HTTP/1.1 408 Request Timeout"
        assert not any(raw.reader.at_eof() for raw in silent[-6:])  # the newest stay


async def test_over_the_cap_with_every_connection_busy_a_new_one_gets_503(
        tmp_path: Path) -> None:
    cfg = net_config(tmp_path, header_timeout=0.5, body_timeout=0.5, max_connections=8)
    async with api_supervised(cfg) as (_, client), RawPool(client) as pool:
        host = "%s:%d" % address(client)
        streams = await pool.open(8)
        for raw in streams:  # /v1/events: a response that streams, never "idle"
            raw.writer.write(request("GET", "/v1/events", host,
                                     {"Authorization": f"Bearer {token_of(cfg)}"}))
            await raw.reader.readuntil(b"event: hello")
        [extra] = await pool.open()
        await extra.until_closed(SLACK)
        assert extra.status_line() == "HTTP/1.1 503 Service Unavailable"
        # A streaming response is not cut: once both deadlines have passed (the server's
        # timers run on this loop, so they fire first), one more refused connection is
        # a round trip after them — a stream they had closed would be at EOF by then.
        passed = time.monotonic() + cfg.api.header_timeout + cfg.api.body_timeout
        await until(lambda: time.monotonic() > passed, message="both deadlines passed")
        [late] = await pool.open()
        await late.until_closed(SLACK)
        assert late.status_line() == "HTTP/1.1 503 Service Unavailable"
        assert not any(raw.reader.at_eof() for raw in streams)
        for raw in streams:
            raw.close()
            await raw.writer.wait_closed()
        await asyncio.sleep(0.3)
        assert (await client.get("/healthz")).status_code == 200


# --- browser-style requests: DNS rebinding, cross-site POSTs ----------------------------


async def test_without_a_token_a_foreign_host_or_origin_is_refused(tmp_path: Path) -> None:
    async with no_token(tmp_path) as client:
        host, port = address(client)
        rebinding = {"Host": f"evil.example:{port}"}
        for method, path in (("GET", "/v1/sessions"), ("GET", "/v1/events"),
                             ("POST", "/v1/sessions/sess-x/stop"), ("GET", "/")):
            resp = await client.request(method, path, headers=rebinding)
            assert resp.status_code == 403, (method, path)
            assert resp.json()["error"].startswith("Host 'evil.example:")
        # the form a foreign page can send without asking: text/plain, its own Origin
        body = b'{"agent_group": "g", "content": {"text": "hi"}}'
        csrf = await client.post("/v1/messages", content=body, headers={
            "Content-Type": "text/plain", "Origin": "https://evil.example"})
        assert csrf.status_code == 403 and "Origin" in csrf.json()["error"]
        plain = await client.post("/v1/messages", content=body,
                                  headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
        assert (await client.get("/v1/sessions")).json() == []  # nothing was created
        same_origin = await client.post("/v1/messages", content=body, headers={
            "Content-Type": "application/json", "Origin": f"http://{host}:{port}"})
        assert same_origin.status_code == 201
        listen_name = await client.get("/v1/sessions", headers={"Host": f"localhost:{port}"})
        assert listen_name.status_code == 200


async def test_with_a_token_foreign_origins_cannot_change_state(tmp_path: Path) -> None:
    cfg = net_config(tmp_path, allowed_hosts=["orch.example"])
    async with api_supervised(cfg) as (_, client):
        foreign = {"Origin": "https://evil.example"}
        post = await client.post("/v1/messages", json=message(), headers=foreign)
        assert post.status_code == 403 and "Origin" in post.json()["error"]
        assert (await client.get("/v1/sessions", headers=foreign)).status_code == 200
        named = await client.get("/v1/sessions", headers={"Host": "orch.example"})
        assert named.status_code == 200
        other = await client.get("/v1/sessions", headers={"Host": "other.example"})
        assert other.status_code == 403 and "allowed_hosts" in other.json()["error"]
        ok = await client.post("/v1/messages", json=message(),
                               headers={"Origin": "https://orch.example"})
        assert ok.status_code == 201


async def test_the_trailing_slash_redirect_never_names_the_requests_host(
        tmp_path: Path) -> None:
    cfg = net_config(tmp_path, allowed_hosts=["*"])
    async with api_supervised(cfg) as (_, client), RawPool(client) as pool:
        resp = await client.get("/v1/sessions/?status=running",
                                headers={"Host": "evil.example"})
        assert resp.status_code == 308
        assert resp.headers["location"] == "/v1/sessions?status=running"
        [raw] = await pool.open()
        raw.writer.write(request("GET", "//evil.example/", "evil.example",
                                 {"Connection": "close"}))
        await raw.until_closed(5)
    assert b"\r\nlocation: /evil.example\r\n" in raw.received.lower()


# --- bodies and headers that gave 500s ----------------------------------------------------


@pytest.mark.parametrize("body, headers, path", [
    (b'{"agent_group": "g", "content": {"n": NaN}}', {}, "/v1/messages"),
    (b'{"agent_group": "g", "content": {"n": 1e999}}', {}, "/v1/messages"),
    (b'{"agent_group": "g", "content": {"n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
     {}, "/v1/messages"),
    (b'{"agent_group": "g", "content": {}, "process_after": "9999-12-31T23:59:59.5Z"}', {},
     "/v1/messages"),
    (b'{"agent_group": "g", "content": {}, "process_after": "0001-01-01T00:00:00+01:00"}', {},
     "/v1/messages"),
    (b'{"agent_group": "g", "content": {}, "process_after": "2001-01-01T00:00:00Z"}', {},
     "/v1/messages"),
])
async def test_bodies_that_are_not_plain_json_are_400s(tmp_path: Path, body, headers, path
                                                       ) -> None:
    cfg = net_config(tmp_path)
    async with api_supervised(cfg) as (_, client):
        resp = await client.post(path, content=body,
                                 headers={"Content-Type": "application/json", **headers})
        assert resp.status_code == 400, resp.text
        assert "\n" not in resp.json()["error"]
        assert (await client.get("/v1/sessions")).json() == []


@pytest.mark.parametrize("last_id", ["1" * 40, "²", "-1", "1e3"])
async def test_a_last_event_id_that_is_no_event_id_is_a_400(tmp_path: Path, last_id) -> None:
    cfg = net_config(tmp_path)
    async with api_supervised(cfg) as (_, client):
        resp = await client.get("/v1/events", headers={"Last-Event-ID": last_id.encode()})
        assert resp.status_code == 400 and "Last-Event-ID" in resp.json()["error"]


# --- descriptors ---------------------------------------------------------------------------


def test_run_raises_the_soft_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard limit {hard}: nothing to raise")
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(config_dict(tmp_path)))
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", "--config", str(config_file)],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        wait_for(lambda: "orchestrator up" in log.read_text() or proc.poll() is not None,
                 timeout=30, message="orchestrator start-up")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        [row] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert row.split()[3:5] == [str(hard), str(hard)], row
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_accept_errors_are_logged_once_and_pending_connections_closed(tmp_path: Path) -> None:
    """The listening socket under a tiny open-file limit (a subprocess): 60 connections
    arrive, 10 descriptors are free. One warning, no asyncio traceback, and the ones
    that cannot be served are closed at once instead of hanging."""
    import socket

    proc = subprocess.Popen([sys.executable, "-m", "tests.support.emfile_server", "3"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    conns = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(0.5)
        conns.append(s)
    time.sleep(0.5)
    closed = 0
    for s in conns:
        try:
            closed += s.recv(1) == b""
        except TimeoutError:
            pass  # held by the server
        except ConnectionError:
            closed += 1
        s.close()
    out, err = proc.communicate(timeout=30)
    assert err.count("cannot accept connections") == 1, err
    assert "out of system resource" not in err and "Traceback" not in err, err
    assert len(err.splitlines()) < 10, err
    assert closed >= 40, (closed, out, err)
