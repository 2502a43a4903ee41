"""The egress gateway inside the whole orchestrator (``compose.assembled``, local
runtime): the engine mints a session's token as its agent starts, the agent's
environment carries it (and no key), the gateway lets it through to the fake model
API, ``/metrics`` counts it, and once the agent is stopped the same token is refused."""

from __future__ import annotations

from pathlib import Path

import httpx
from loguru import logger

from orchestrator.runtime.local.runtime import read_pid_file
from tests.support.e2e import AGENT, Client, make_config, replies_to, run, serving
from tests.support.egress import CHUNKS, SECRET, FakeModelApi, free_port_pair
from tests.support.helpers import until


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = fh.read().decode("utf-8", "replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def test_engine_mints_at_start_and_revokes_at_stop(tmp_path: Path, reap_agents: None) -> None:
    api = FakeModelApi()
    secret = tmp_path / "model-key"
    secret.write_text(SECRET + "\n")
    cfg = make_config(
        tmp_path, lifecycle={"stop_idle_after": 60.0, "idle_after": 30.0},
        gateway={"port": free_port_pair(), "upstream_ca_file": str(api.ca_file)},
        groups={"alpha": {
            "command": AGENT, "egress": [f"localhost:{api.port}"],
            "egress_credentials": [{"host": "localhost", "header": "x-api-key",
                                    "secret_file": str(secret),
                                    "base_url_env": "ANTHROPIC_BASE_URL",
                                    "key_env": "ANTHROPIC_API_KEY"}]}})
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="TRACE", format="{message}")

    async def body() -> None:
        client = Client(cfg)
        async with serving(cfg) as service:
            sup = service.supervisor
            row, mid = client.send("alpha", "hello")
            await until(lambda: replies_to(cfg, mid), timeout=30, message="the agent's reply")
            found = read_pid_file(client.paths(row).pid_file)
            assert found
            env = environ(found[0])
            token, base = env["ANTHROPIC_API_KEY"], env["ANTHROPIC_BASE_URL"]
            assert SECRET not in str(env)
            assert env["HTTPS_PROXY"].endswith(f"127.0.0.1:{cfg.gateway.port}")
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                ok = await http.post(f"{base}/v1/messages", headers={"x-api-key": token},
                                     content=b"{}")
                assert ok.status_code == 200 and ok.text.count("data: chunk") == CHUNKS
                metrics = await http.get(f"{service.api.url}/metrics")
                assert ('orchestrator_egress_requests_total{agent_group="alpha",result="ok"} 1.0'
                        in metrics.text)
                assert sup.stop_agent(row.id, "test") is True
                await until(lambda: not sup.runtime.is_running(row.id), timeout=30,
                            message="the agent stopped")
                await until(lambda: token_refused(http, base, token), timeout=10,
                            message="the stopped session's token refused")
            assert api.requests[0]["headers"]["x-api-key"] == SECRET
        client.close()

    async def token_refused(http: httpx.AsyncClient, base: str, token: str) -> bool:
        r = await http.post(f"{base}/v1/messages", headers={"x-api-key": token}, content=b"{}")
        return r.status_code == 407 and "revoked" in r.text

    try:
        run(body())
    finally:
        logger.remove(sink)
        api.close()
    assert len(api.requests) == 1  # the refused call never reached the upstream
    assert logged and not [line for line in logged if SECRET in line]
