"""What an agent run used, end to end on the local runtime: a real agent that burns one
CPU for 2 s and touches 200 MB before it answers, its run recorded in the registry when
it ends (CPU ≥ 1.5 s, peak ≥ 200 MB, wall time, exit reason), shown by ``status --json``
and counted by the per-group metrics."""

from __future__ import annotations

from pathlib import Path

from orchestrator.host import status
from tests.support.e2e import Client, make_config, replies_to, serving
from tests.support.helpers import until

HEAVY = '''
import os, sys, time
end = time.process_time() + 2.0
while time.process_time() < end:  # one CPU, busy, for 2 s
    pass
block = bytearray(200 * 1024 * 1024)
for i in range(0, len(block), 4096):  # touched: resident, not just reserved
    block[i] = 1
del block
os.execv(sys.executable, [sys.executable, "-m", "orchestrator.agent", *sys.argv[1:]])
'''

MIB = 1024 * 1024


async def test_cpu_peak_memory_and_wall_time_of_a_run_are_recorded(tmp_path: Path,
                                                                   reap_agents) -> None:
    script = tmp_path / "heavy.py"
    script.write_text(HEAVY)
    cfg = make_config(tmp_path, command=["{python}", str(script), "--poll-interval", "0.02",
                                         "--heartbeat-interval", "0.1"],
                      lifecycle={"claim_stuck": 30.0})
    client = Client(cfg)
    async with serving(cfg) as service:
        row, mid = client.send("heavy", "work hard")
        await until(lambda: replies_to(cfg, mid), timeout=30, message="the reply")
        await until(lambda: client.container_status(row.id) == "stopped", timeout=15,
                    message="stopped when idle")
        await until(lambda: client.registry.run_usage().get(row.id), message="run recorded")
        metrics = service.api.metrics.registry
        cpu_metric = metrics.get_sample_value("orchestrator_agent_cpu_seconds_total",
                                              {"agent_group": "other"})
        peaks = metrics.get_sample_value("orchestrator_agent_peak_memory_bytes_count",
                                         {"agent_group": "other"})
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
    """Below the orchestrator's own size at the spawn, wait4's peak is the forked copy
    of the orchestrator, not the agent's: recorded as unknown; its CPU time is known."""
    cfg = make_config(tmp_path)
    client = Client(cfg)
    async with serving(cfg):
        row, mid = client.send("small", "hi")
        await until(lambda: replies_to(cfg, mid), message="the reply")
        await until(lambda: client.registry.run_usage().get(row.id), message="run recorded")
    last = client.registry.run_usage()[row.id]["last_run"]
    assert last["peak_memory_bytes"] is None, last
    assert last["cpu_seconds"] is not None and 0 <= last["cpu_seconds"] < 5
    client.close()
