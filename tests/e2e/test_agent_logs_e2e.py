"""Agent logs end to end: a real Docker agent that prints a line and exits 1 right at
its start leaves its output readable after its container is gone — through
``orchestrator logs`` (control characters escaped) and ``GET /v1/sessions/{id}/logs``
(the bytes as written, behind the token). A local agent's run log is read the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import tomli_w

from orchestrator.cli import commands as cli
from orchestrator.config.load import load_config
from orchestrator.contract.layout import registry_path
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup
from orchestrator.runtime.docker.spec import LABEL_INSTANCE
from tests.support.api_helpers import token_of
from tests.support.e2e import Client, make_config, replies_to, run, serving
from tests.support.helpers import until, wait_for

CRASH = ("import sys; print('agent says: starting', flush=True); "
         "print('\\x1b[2Jgone', file=sys.stderr, flush=True); sys.exit(1)")


def docker_cfg(tmp_path: Path, instance: str, image: str) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "data"),
        "runtime": {"kind": "docker", "on_shutdown": "stop", "stop_grace": 2.0,
                    "start_retry_max": 2.0},
        "docker": {"instance": instance, "image": image, "network": "none",
                   "command": ["python3", "-c", CRASH]},
        "lifecycle": {"backoff_base": 0.2, "max_tries": 3},
        "sessions": {"agent_log_runs": 5},
        "api": {"listen": "127.0.0.1:0"},
    }


def logs_cli(config: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(["logs", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.docker
def test_the_output_of_a_docker_agent_that_exited_1_at_start_outlives_its_container(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str, instance: str,
        capsys: pytest.CaptureFixture) -> None:
    raw = docker_cfg(tmp_path, instance, agent_image)
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(raw))
    cfg = load_config(raw, tmp_path)
    store = AgentLogs.of(cfg)

    def ours() -> list:
        return docker_client.containers.list(all=True,
                                             filters={"label": f"{LABEL_INSTANCE}={instance}"})

    async def body() -> tuple[str, httpx.Response, httpx.Response, httpx.Response, int]:
        async with serving(cfg) as service:
            sup = service.supervisor
            row = sup.sessions.resolve("crashy", MessagingGroup("cli", "local"), None, "shared")
            sup.sessions.write_message(row, {"text": "hello"},
                                       routing=sup.sessions.routing_of(row))
            await until(lambda: store.runs("crashy", row.id), timeout=60,
                        message="a run's output kept")
            async with httpx.AsyncClient(base_url=service.api.url) as client:
                auth = {"Authorization": f"Bearer {token_of(cfg)}"}
                url = f"/v1/sessions/{row.id}/logs"
                got = await client.get(url, headers=auth)
                unauthed = await client.get(url)
                missing = await client.get(f"{url}?run=999", headers=auth)
            # (the orchestrator's stop ends one more run: counted once it is over)
        with Registry(registry_path(cfg.data_dir)) as registry:
            starts = [c for c in registry.status_changes(row.id)
                      if c["reason"].startswith("agent started")]
        return row.id, got, unauthed, missing, len(starts)

    sid, got, unauthed, missing, starts = run(body(), timeout=150)
    # its containers are all gone (each removed after its exit), its output is not
    wait_for(lambda: not ours(), timeout=30, message="no container of this instance left")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/plain")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert b"agent says: starting\n" in got.content
    assert b"\x1b[2Jgone\n" in got.content  # as written: the API does not interpret it
    assert int(got.headers["x-agent-log-run"]) >= 1
    assert (unauthed.status_code, missing.status_code) == (401, 404)

    # the run the API showed (a later one may have been stopped at shutdown mid-print)
    shown_run = got.headers["x-agent-log-run"]
    code, out, err = logs_cli(config, sid, "--run", shown_run, capsys=capsys)
    assert code == 0, err
    assert "agent says: starting\n" in out
    assert "\\x1b[2Jgone\n" in out and "\x1b" not in out  # escaped for the terminal
    assert f"session {sid}, run {shown_run} " in err
    runs = store.runs("crashy", sid)
    # each container's output kept once at most (an exit and a reconcile may both remove
    # it; a run stopped before it printed anything leaves no file)
    assert 1 <= len(runs) <= min(starts, 5) and int(shown_run) in runs, (runs, starts)
    code, out, _ = logs_cli(config, sid, "--run", shown_run, "--json", capsys=capsys)
    doc = json.loads(out)
    assert (doc["session_id"], doc["agent_group"], doc["run"]) == (sid, "crashy", int(shown_run))
    assert "agent says: starting" in doc["text"] and "\x1b[2Jgone" in doc["text"]
    code, out, _ = logs_cli(config, sid, capsys=capsys)  # the newest run by default
    assert code == 0 and "agent says: starting" in out
    code, _, err = logs_cli(config, sid, "--run", "999", capsys=capsys)
    assert code == 2 and "has no run 999 kept" in err


async def test_a_local_agent_run_log_is_read_by_the_cli(tmp_path: Path, reap_agents,
                                                       capsys: pytest.CaptureFixture) -> None:
    cfg = make_config(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps({"data_dir": str(cfg.data_dir)}))
    client = Client(cfg)
    async with serving(cfg):
        row, mid = client.send("helpers", "hi")
        await until(lambda: replies_to(cfg, mid), message="the reply")
        await until(lambda: client.container_status(row.id) == "stopped", message="stopped")
    code, out, err = logs_cli(config, row.id, capsys=capsys)
    assert code == 0, err
    assert "stopping on signal" in out, out
    assert f"session {row.id}, run 1 (runs kept: 1)" in err
    code, _, err = logs_cli(config, "sess-nothere", capsys=capsys)
    assert code == 2 and "no session 'sess-nothere'" in err
    client.close()
