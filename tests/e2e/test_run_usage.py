"""What an agent run used, end to end on the local runtime: a real agent that burns one
CPU for 2 s and touches 200 MB before it answers, its run recorded in the registry when
it ends (CPU ≥ 1.5 s, peak ≥ 200 MB, wall time, exit reason), shown by ``status --json``
and counted by the per-group metrics.

The orchestrator is a real ``orchestrator run`` process, as in production: a forked
agent inherits its parent's high-water resident size as the floor of its own peak, and
this test process's mark (a whole pytest session's) would hide a 200 MB agent."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import tomli_w

from orchestrator.config.load import load_config
from orchestrator.host import status
from tests.support.e2e import Client, OrchestratorProcess, config_dict, replies_to
from tests.support.heavy_agent import HEAVY, MIB
from tests.support.helpers import until


def start(tmp_path: Path, **kwargs) -> tuple[OrchestratorProcess, Client, str]:
    raw = config_dict(tmp_path, **kwargs)
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(raw))
    orch = OrchestratorProcess(config_file, tmp_path / "run.log")
    orch.wait_up()
    found = re.search(r"API listening on (http://[0-9.]+:[0-9]+)", orch.text())
    assert found, orch.text()
    return orch, Client(load_config(raw, tmp_path)), found.group(1)


def metric(url: str, token: str, name: str, group: str) -> float | None:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    found = re.search(rf'^{name}\{{agent_group="{group}"\}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else None


async def test_cpu_peak_memory_and_wall_time_of_a_run_are_recorded(tmp_path: Path,
                                                                   reap_agents) -> None:
    script = tmp_path / "heavy.py"
    script.write_text(HEAVY)
    orch, client, url = start(tmp_path, command=["{python}", str(script), "--poll-interval",
                                                 "0.02", "--heartbeat-interval", "0.1"],
                              lifecycle={"idle_after": 0.5, "stop_idle_after": 0.5,
                                         "claim_stuck": 30.0})
    cfg = client.cfg
    try:
        row, mid = client.send("heavy", "work hard")
        await until(lambda: replies_to(cfg, mid), timeout=30, message="the reply")
        await until(lambda: client.container_status(row.id) == "stopped", timeout=15,
                    message="stopped when idle")
        await until(lambda: client.registry.run_usage().get(row.id), message="run recorded")
        token = (cfg.data_dir / "api-token").read_text().strip()
        cpu_metric = metric(url, token, "orchestrator_agent_cpu_seconds_total", "other")
        peaks = metric(url, token, "orchestrator_agent_peak_memory_bytes_count", "other")
    finally:
        assert orch.end(signal.SIGTERM) == 0, orch.text()
    usage = client.registry.run_usage()[row.id]
    last = usage["last_run"]
    print(f"run usage: {last}")
    assert usage["runs"] == 1
    assert last["cpu_seconds"] >= 1.5, last
    assert last["peak_memory_bytes"] >= 200 * MIB, last
    assert last["wall_seconds"] >= 2.0 and last["exit_reason"].startswith("stopped: idle")
    assert usage["cpu_seconds"] == last["cpu_seconds"]
    assert cpu_metric is not None and cpu_metric >= 1.5 and peaks == 1
    [shown] = [r for r in status.collect(cfg.data_dir, client.registry) if r.session_id == row.id]
    assert shown.usage == usage  # status --json and GET /v1/sessions carry it
    client.close()


async def test_a_small_agents_peak_is_unknown_not_the_orchestrators_size(
        tmp_path: Path, reap_agents) -> None:
    """At or below the orchestrator's high-water size at the spawn, wait4's peak is the
    orchestrator's mark carried into the fork, not the agent's: recorded as unknown; its
    CPU time is known (the floor rule itself: tests/runtime/test_local_runtime.py)."""
    orch, client, _url = start(tmp_path)
    cfg = client.cfg
    try:
        row, mid = client.send("small", "hi")
        await until(lambda: replies_to(cfg, mid), timeout=60, message="the reply")
        await until(lambda: client.registry.run_usage().get(row.id), message="run recorded")
    finally:
        assert orch.end(signal.SIGTERM) == 0, orch.text()
    last = client.registry.run_usage()[row.id]["last_run"]
    assert last["peak_memory_bytes"] is None, last
    assert last["cpu_seconds"] is not None and 0 <= last["cpu_seconds"] < 5
    client.close()
