"""Agent logs and run usage on Kubernetes, end to end: the real Supervisor on the real
test cluster. The session's first agent Pod prints a line, works 1.5 s and exits 1;
the next one (a marker in the session folder says it is the second) is the reference
agent, which answers and is stopped when idle. Once both Pods are deleted their
output is still read by ``orchestrator logs`` (``<data_dir>/logs/<group>/<session>/
run-N.log``, kept before each delete — the stopped one's including what it wrote
during its grace), and the registry holds both runs with their wall time (the
container's own, from the kubelet's startedAt/finishedAt: whole seconds) and exit
reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from orchestrator.cli import commands as cli
from orchestrator.config.load import load_config
from orchestrator.contract.layout import registry_path
from orchestrator.host.agent_logs import AgentLogs
from tests.e2e.test_kubernetes_e2e import AGENT, config_data, our_pods, send, session
from tests.support.docker_fixtures import in_thread
from tests.support.e2e import replies_to, run, supervised
from tests.support.helpers import query, until
from tests.support.kube import Cluster

pytestmark = pytest.mark.kubernetes

CRASH_ONCE = """
import os, sys, time
marker = '/workspace/.crashed-once'
if os.path.exists(marker):  # the second start: the reference agent
    os.execv(sys.executable, [sys.executable, '-m', 'orchestrator.agent', *sys.argv[1:]])
open(marker, 'w').close()
print('agent says: starting', flush=True)
time.sleep(1.5)
print('agent says: giving up', file=sys.stderr, flush=True)
sys.exit(1)
"""


def logs_cli(config: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(["logs", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def test_pod_logs_are_read_by_the_cli_after_the_pods_are_gone_and_runs_recorded(
        tmp_path: Path, kube_cluster: Cluster, kube_namespace: str, agent_image: str,
        capsys: pytest.CaptureFixture) -> None:
    kube_cluster.import_image(agent_image)
    data = config_data(tmp_path, kube_cluster, kube_namespace, agent_image,
                       kubernetes={"command": ["python3", "-c", CRASH_ONCE, *AGENT[3:]]})
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(data))
    cfg = load_config(data, tmp_path)
    store = AgentLogs.of(cfg)
    instance = cfg.kubernetes.instance

    async def body() -> str:
        async with supervised(cfg) as sup:
            row = session(sup, "crashy")
            mid = send(sup, row, "hello")
            await until(lambda: replies_to(cfg, mid), 120, "the second Pod's reply")
            await until(lambda: (sup.registry.run_usage().get(row.id) or {}).get("runs") == 2,
                        60, "both runs recorded (the second stopped when idle)")
            await until(lambda: in_thread(lambda: not our_pods(kube_cluster, kube_namespace,
                                                               instance)), 60, "Pods deleted")
            return row.id

    sid = run(body(), 240)
    runs = query(registry_path(cfg.data_dir), "SELECT exit_reason, wall_seconds, cpu_seconds,"
                 " peak_memory_bytes FROM agent_runs WHERE session_id=? ORDER BY id", (sid,))
    print(f"runs: {runs}")
    (crash_reason, crash_wall, cpu, peak), (stop_reason, stop_wall, _, _) = runs
    assert crash_reason == "agent exited, exit code 1"
    # the container's own wall time: whole seconds of the kubelet's (1.5 s of work)
    assert crash_wall is not None and 1.0 <= crash_wall <= 3.0, runs
    assert (cpu, peak) == (None, None)  # not read on Kubernetes
    assert stop_reason.startswith("stopped: idle") and stop_wall is not None, runs
    assert store.runs("crashy", sid) == [1, 2]

    code, out, err = logs_cli(config, sid, "--run", "1", capsys=capsys)
    assert code == 0, err
    assert "agent says: starting\n" in out and "agent says: giving up\n" in out, out
    assert f"session {sid}, run 1 " in err
    code, out, err = logs_cli(config, sid, capsys=capsys)  # the newest: the stopped one
    assert code == 0, err
    assert "stopping on signal" in out, out  # written during its grace, kept
