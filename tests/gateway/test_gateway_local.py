"""The egress gateway with real parts: a fake model API over HTTPS (its own CA), the
gateway on loopback, and agents as real processes started by the local runtime."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from orchestrator.config.groups import resolve
from orchestrator.config.load import load_config
from orchestrator.config.model import Config
from orchestrator.config.sections import ConfigError
from orchestrator.gateway.service import EgressRefused, Gateway
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.runtime.base import AgentExit, SessionRef
from orchestrator.runtime.local.runtime import LocalRuntime
from tests.support.docker_fixtures import make_session
from tests.support.egress import (
    AGENT_SCRIPT,
    CHUNKS,
    SECRET,
    FakeModelApi,
    connect_request,
    free_port_pair,
    parse_agent_output,
    raw_request,
)
from tests.support.helpers import until


@pytest.fixture
def api() -> AsyncIterator[FakeModelApi]:
    server = FakeModelApi()
    yield server
    server.close()


def egress_config(tmp_path: Path, api: FakeModelApi, port: int, **gateway: object) -> Config:
    secret = tmp_path / "secrets" / "model-key"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    script = tmp_path / "agent_script.py"
    script.write_text(AGENT_SCRIPT)
    return load_config({
        "data_dir": str(tmp_path / "data"),
        "gateway": {"port": port, **gateway},
        "groups": {
            "alpha": {
                "command": [sys.executable, str(script)],
                "egress": [f"localhost:{api.port}"],
                "egress_credentials": [{
                    "host": "localhost", "header": "x-api-key", "secret_file": str(secret),
                    "base_url_env": "ANTHROPIC_BASE_URL", "key_env": "ANTHROPIC_API_KEY"}],
            },
            "beta": {"egress": ["example.org:443"]},
        },
    }, tmp_path)


@pytest.fixture
async def gateway(tmp_path: Path, api: FakeModelApi) -> AsyncIterator[Gateway]:
    cfg = egress_config(tmp_path, api, free_port_pair())
    gw = Gateway(cfg, upstream_verify=api.client_context())
    await gw.start()
    yield gw
    await gw.close()


async def run_agent(gw: Gateway, tmp_path: Path, mode: str, session_id: str,
                    api: FakeModelApi) -> dict:
    """Start the agent script through the local runtime (the group's command, the
    gateway's variables as the engine hands them over) and read what it printed."""
    cfg = gw.cfg
    exits: list[AgentExit] = []
    settings = resolve(cfg, "alpha")
    settings = settings.__class__(**{**settings.__dict__, "runtime": settings.runtime.__class__(
        **{**settings.runtime.__dict__, "command": (*settings.runtime.command, mode,
                                                    str(api.port))})})
    runtime = LocalRuntime(cfg.runtime, cfg.data_dir, exits.append)
    folder = make_session(cfg.data_dir, "alpha", session_id)
    egress = gw.admit("alpha", session_id)
    assert egress is not None
    await runtime.start(SessionRef("alpha", session_id, folder, settings, egress))
    await until(lambda: exits, timeout=30, message="the agent script did not finish")
    await runtime.close()
    log = AgentLogs(cfg.data_dir).read("alpha", session_id)  # the run's kept output
    assert log is not None, "the agent's run left no output"
    return parse_agent_output(log.data.decode())


def assert_streamed(result: dict, api: FakeModelApi) -> None:
    assert result.get("status") == 200, result.get("error")
    assert [line for _, line in result["lines"]] == [f"data: chunk {i}" for i in range(CHUNKS)]
    first_arrival = result["lines"][0][0]
    last_sent = api.sent[-1][-1]
    assert first_arrival < last_sent, "the stream was buffered: the first chunk arrived " \
        "after the last one left the upstream"


@pytest.mark.parametrize("mode", ["proxy", "base"])
async def test_local_agent_gets_the_stream_and_the_upstream_the_key(gateway, tmp_path, api,
                                                                    mode):
    result = await run_agent(gateway, tmp_path, mode, f"s-{mode}", api)
    assert_streamed(result, api)
    seen = api.requests[-1]
    assert seen["headers"]["x-api-key"] == SECRET  # injected by the gateway
    assert seen["path"] == "/v1/messages" and seen["body"] == '{"q":1}'
    token = result["environ"]["ANTHROPIC_API_KEY"]
    assert token and token not in str(seen["headers"])  # the placeholder never left
    assert "proxy-authorization" not in seen["headers"]
    # the key is nowhere in the agent's environment
    assert SECRET not in str(result["environ"])
    assert result["environ"]["SSL_CERT_FILE"] == str(gateway.ca.bundle)
    assert gateway.counts[("alpha", "ok")] >= 1


async def test_key_is_in_no_file_the_agent_is_given(gateway, tmp_path, api):
    env = dict(gateway.admit("alpha", "s-files").env)
    for path in {env["SSL_CERT_FILE"]}:
        assert SECRET not in Path(path).read_text()
    assert SECRET not in str(env)
    folder = gateway.folder
    for f in folder.iterdir():  # tokens.json holds hashes only, never a token or a key
        assert SECRET.encode() not in f.read_bytes()
        assert env["ANTHROPIC_API_KEY"].encode() not in f.read_bytes()
    assert (folder / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def door(gw: Gateway, group: str) -> tuple[str, int]:
    d = gw.doors[group]
    return d.host, d.port


async def test_off_list_host_is_refused_with_403_naming_it(gateway):
    token = dict(gateway.admit("alpha", "s-off").env)["ANTHROPIC_API_KEY"]
    answer = await asyncio.to_thread(raw_request, *door(gateway, "alpha"),
                                     connect_request("evil.example.com:443", token))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    assert body.decode().strip() == ("egress to evil.example.com:443 is not allowed for agent "
                                     "group 'alpha': add \"evil.example.com:443\" to "
                                     "[groups.alpha] egress")
    # base-URL mode too
    host, port = door(gateway, "alpha")
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.post(f"http://{host}:{port}/evil.example.com/v1/x",
                              headers={"proxy-authorization": _basic(token)})
    assert r.status_code == 403 and "evil.example.com:443" in r.text
    assert gateway.counts[("alpha", "host_refused")] == 2


def _basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"orchestrator:{token}".encode()).decode()


async def test_another_groups_token_is_refused(gateway, api):
    beta_token = dict(gateway.admit("beta", "s-beta").env)["HTTPS_PROXY"].split(":")[2] \
        .split("@")[0]
    answer = await asyncio.to_thread(raw_request, *door(gateway, "alpha"),
                                     connect_request(f"localhost:{api.port}", beta_token))
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"not one of agent group 'alpha'" in answer
    # as the base-URL placeholder key too
    host, port = door(gateway, "alpha")
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.post(f"http://{host}:{port}/localhost:{api.port}/v1/messages",
                              headers={"x-api-key": beta_token})
    assert r.status_code == 403
    assert not api.requests  # nothing reached the upstream


@pytest.mark.parametrize("token, status, body", [
    (None, 407, b"no gateway token"),
    ("made-up", 407, b"unknown gateway token"),
])
async def test_missing_or_unknown_token_is_407(gateway, api, token, status, body):
    answer = await asyncio.to_thread(raw_request, *door(gateway, "alpha"),
                                     connect_request(f"localhost:{api.port}", token))
    assert answer.startswith(f"HTTP/1.1 {status}".encode()) and body in answer
    assert b"proxy-authenticate: Basic" in answer.lower().replace(b"basic", b"Basic")


async def test_a_stopped_sessions_token_is_refused(gateway, tmp_path, api):
    result = await run_agent(gateway, tmp_path, "base", "s-stop", api)
    assert_streamed(result, api)
    token = result["environ"]["ANTHROPIC_API_KEY"]
    gateway.revoke("s-stop")  # what the supervisor does when the agent's exit is reported
    host, port = door(gateway, "alpha")
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.post(f"http://{host}:{port}/localhost:{api.port}/v1/messages",
                              headers={"x-api-key": token})
    assert r.status_code == 407 and "revoked" in r.text
    assert len(api.requests) == 1


async def test_limits_body_size_and_rate(tmp_path, api):
    cfg = egress_config(tmp_path, api, free_port_pair(), max_body_bytes=1024,
                        max_requests_per_minute=2)
    gw = Gateway(cfg, upstream_verify=api.client_context())
    await gw.start()
    try:
        token = dict(gw.admit("alpha", "s-lim").env)["ANTHROPIC_API_KEY"]
        host, port = door(gw, "alpha")
        url = f"http://{host}:{port}/localhost:{api.port}/v1/messages"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            big = await client.post(url, headers={"x-api-key": token}, content=b"x" * 2048)
            assert big.status_code == 413 and "max_body_bytes" in big.text
            ok = await client.post(url, headers={"x-api-key": token}, content=b"{}")
            assert ok.status_code == 200
            limited = await client.post(url, headers={"x-api-key": token}, content=b"{}")
            assert limited.status_code == 429 and "max_requests_per_minute" in limited.text
        assert len(api.requests) == 1
        assert gw.counts[("alpha", "limited")] == 1 and gw.counts[("alpha", "too_large")] == 1
    finally:
        await gw.close()


async def test_tokens_survive_a_restart_for_adopted_agents_only(tmp_path, api):
    cfg = egress_config(tmp_path, api, free_port_pair())
    first = Gateway(cfg, upstream_verify=api.client_context())
    await first.start()
    kept = dict(first.admit("alpha", "s-kept").env)["ANTHROPIC_API_KEY"]
    gone = dict(first.admit("alpha", "s-gone").env)["ANTHROPIC_API_KEY"]
    await first.close()
    second = Gateway(cfg, upstream_verify=api.client_context())
    await second.start()
    try:
        second.keep_only({"s-kept"})  # the runtime adopted this one only
        assert second.book is not None
        assert second.book.check(kept)[1] is not None
        assert second.book.check(gone)[0].value == "revoked"
    finally:
        await second.close()


async def test_egress_with_kubernetes_is_refused_in_one_line(tmp_path, api):
    cfg = egress_config(tmp_path, api, free_port_pair())
    cfg = cfg.replace(runtime={"kind": "kubernetes"})
    with pytest.raises(ConfigError, match=r"^\[groups.alpha\] egress: the egress gateway "
                       r"serves the local and docker runtimes, not kubernetes yet"):
        await Gateway(cfg).start()


async def test_disabled_gateway_refuses_the_start_of_a_group_with_egress(tmp_path, api):
    gw = Gateway(egress_config(tmp_path, api, free_port_pair(), enabled=False))
    await gw.start()
    try:
        assert gw.admit("other", "s-1") is None  # a group without egress is not concerned
        with pytest.raises(EgressRefused, match="gateway is not running"):
            gw.admit("alpha", "s-2")
    finally:
        await gw.close()


@pytest.mark.parametrize("target", [
    "/evil.com@localhost:{port}/v1/messages",
    "/localhost:{port}#@evil.com/v1/messages",
    "/localhost%3a{port}/v1/messages",
    "http://x@localhost:{port}/v1/messages",
])
async def test_a_hostile_target_is_refused_not_sent_anywhere(gateway, api, target):
    token = dict(gateway.admit("alpha", "s-hostile").env)["ANTHROPIC_API_KEY"]
    request = (f"POST {target.format(port=api.port)} HTTP/1.1\r\nHost: gw\r\n"
               f"x-api-key: {token}\r\nProxy-Authorization: {_basic(token)}\r\n"
               "Content-Length: 0\r\n\r\n").encode()
    answer = await asyncio.to_thread(raw_request, *door(gateway, "alpha"), request)
    assert answer.split(b" ", 2)[1] in (b"400", b"403"), answer[:200]
    assert not api.requests


def _inside_tunnel(gw_host: str, gw_port: int, api_port: int, token: str, ca: str,
                   request: bytes) -> bytes:
    """CONNECT, TLS with the gateway's leaf (trusting its CA bundle), one raw request."""
    import socket
    import ssl

    sock = socket.create_connection((gw_host, gw_port), timeout=10)
    sock.sendall(connect_request(f"localhost:{api_port}", token))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname="localhost")
    with tls:
        tls.sendall(request)
        parts = []
        with contextlib.suppress(ssl.SSLError):  # the gateway closes after its answer
            while chunk := tls.recv(65536):
                parts.append(chunk)
        return b"".join(parts)


async def test_inside_a_tunnel_only_a_path_is_sent_on(gateway, api):
    env = dict(gateway.admit("alpha", "s-tunnel").env)
    token = env["ANTHROPIC_API_KEY"]
    hostile = (f"POST @127.0.0.1:{api.port}/v1/messages HTTP/1.1\r\nHost: x\r\n"
               "Content-Length: 0\r\n\r\n").encode()
    answer = await asyncio.to_thread(_inside_tunnel, *door(gateway, "alpha"), api.port, token,
                                     env["SSL_CERT_FILE"], hostile)
    assert answer.startswith(b"HTTP/1.1 400") and b"must be a path" in answer
    assert not api.requests


async def test_max_connections_per_session(tmp_path, api):
    import socket

    cfg = egress_config(tmp_path, api, free_port_pair(), max_connections=1)
    gw = Gateway(cfg, upstream_verify=api.client_context())
    await gw.start()
    try:
        token = dict(gw.admit("alpha", "s-conns").env)["ANTHROPIC_API_KEY"]
        host, port = door(gw, "alpha")

        def first_held() -> socket.socket:
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(connect_request(f"localhost:{api.port}", token))
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            return sock

        held = await asyncio.to_thread(first_held)
        try:
            answer = await asyncio.to_thread(raw_request, host, port,
                                             connect_request(f"localhost:{api.port}", token))
            assert answer.startswith(b"HTTP/1.1 429") and b"max_connections" in answer
        finally:
            held.close()
        await until(lambda: gw._uses["s-conns"].open == 0, message="the held one counted off")
        answer = await asyncio.to_thread(raw_request, host, port, connect_request(
            "evil.example.com:443", token))
        assert answer.startswith(b"HTTP/1.1 403")  # a new connection is let in again
    finally:
        await gw.close()
