"""The orchestrator with ``[runtime] kind = "kubernetes"``: the real Supervisor on the
real test cluster.

Agents are Pods running the project's agent image (imported into the cluster's
containerd, ``imagePullPolicy: Never``), in a fresh namespace per test, pinned to the
cluster's one node, their session folders ``hostPath`` volumes. Messages go in
through the registry and session folders; replies come out of the jsonl channel.
The SIGKILL test runs ``orchestrator run`` as a real process. Every wait is a
condition with a deadline.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from orchestrator.config.load import load_config
from orchestrator.config.model import Config
from orchestrator.engine.supervisor import Supervisor
from orchestrator.host.registry import SessionRow
from orchestrator.host.sessions import MessagingGroup
from orchestrator.runtime.kubernetes.spec import LABEL_INSTANCE
from tests.support.docker_fixtures import in_thread
from tests.support.e2e import Client, OrchestratorProcess, replies, replies_to, run, supervised
from tests.support.helpers import query, until, wait_for
from tests.support.kube import Cluster

pytestmark = pytest.mark.kubernetes

AGENT = ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace",
         "--poll-interval", "0.05", "--heartbeat-interval", "0.2"]
ONCE = Path(__file__).parents[1] / "runtime" / "kubernetes" / "once_agent.py"


@pytest.fixture
def image(kube_cluster: Cluster, agent_image: str) -> str:
    kube_cluster.import_image(agent_image)
    return agent_image


def config_data(tmp_path: Path, cluster: Cluster, namespace: str, image: str, *,
                agent_args: list[str] = (), **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "runtime": {"kind": "kubernetes", "on_shutdown": "stop", "stop_grace": 2.0,
                    "start_retry_max": 2.0},
        "kubernetes": {"namespace": namespace, "kubeconfig": str(cluster.kubeconfig),
                       "node_name": cluster.node_name, "instance": f"t{uuid.uuid4().hex[:8]}",
                       "image": image, "image_pull_policy": "Never",
                       "command": AGENT + list(agent_args), "cpu_request": "10m",
                       "memory_request": "32Mi", "start_timeout": 60.0,
                       "group_folder": "{data_dir}/groups/{group}"},
        "lifecycle": {"idle_after": 0.5, "stop_idle_after": 1.0, "claim_stuck": 30.0,
                      "backoff_base": 0.2, "max_tries": 3},
        "watch": {"sweep_interval": 5.0},
        "delivery": {"retry_base": 0.1},
        "api": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def kube_config(*args: Any, **kwargs: Any) -> Config:
    return load_config(config_data(*args, **kwargs), args[0])


def send(sup: Supervisor, row: SessionRow, text: str) -> str:
    mid, _ = sup.sessions.write_message(row, {"text": text},
                                        routing=sup.sessions.routing_of(row))
    return mid


def session(sup: Supervisor, group: str) -> SessionRow:
    return sup.sessions.resolve(group, MessagingGroup("cli", "local"), None, "shared")


def message_row(sup: Supervisor, row: SessionRow, message_id: str) -> dict:
    [(status, tries)] = query(sup.sessions.paths(row).inbound_db,
                              "SELECT status, tries FROM messages_in WHERE id=?", (message_id,))
    return {"status": status, "tries": tries}


def claimed(sup: Supervisor, row: SessionRow, message_id: str) -> bool:
    return query(sup.sessions.paths(row).outbound_db,
                 "SELECT status FROM processing_ack WHERE message_id=?",
                 (message_id,)) == [("processing",)]


def pod_of(sup: Supervisor, session_id: str) -> str | None:
    for handle in sup.runtime.running():
        if handle.session_id == session_id:
            return handle.ident
    return None


def our_pods(cluster: Cluster, namespace: str, instance: str) -> list[str]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{LABEL_INSTANCE}={instance}",
                          "-o", "json").stdout
    return [p["metadata"]["name"] for p in json.loads(out)["items"]]


def statuses(sup: Supervisor, session_id: str) -> list[tuple[str, str]]:
    return [(c["new"], c["reason"]) for c in sup.registry.status_changes(session_id)]


def with_once_agent(cfg: Config, group: str) -> None:
    folder = cfg.data_dir / "groups" / group
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ONCE, folder / "once_agent.py")
    (folder / "once_agent.py").chmod(0o644)


ONCE_COMMAND = ["python3", "/workspace/agent/once_agent.py", "--workspace", "/workspace"]


def test_a_message_starts_a_pod_that_answers_and_idle_deletes_it(
        tmp_path, kube_cluster, kube_namespace, image):
    cfg = kube_config(tmp_path, kube_cluster, kube_namespace, image,
                      lifecycle={"pause_idle_after": 0.2})  # not on Kubernetes: said, ignored

    async def body() -> None:
        async with supervised(cfg) as sup:
            assert sup.cfg.lifecycle.pause_idle_after == 0  # the paused tier is off
            row = session(sup, "helpers")
            t0 = time.monotonic()
            mid = send(sup, row, "hello kubernetes")
            name = await until(lambda: pod_of(sup, row.id), 60, "a Pod started")
            [reply] = await until(lambda: replies_to(cfg, mid), 60, "the reply delivered")
            print(f"cold round trip {time.monotonic() - t0:.2f}s")
            assert reply["content"]["text"] == "echo: hello kubernetes"
            await until(lambda: sup.tracked[row.id].status == "stopped", 30, "stopped idle")
            await until(lambda: in_thread(lambda: name not in our_pods(
                kube_cluster, kube_namespace, cfg.kubernetes.instance)), 30, "Pod deleted")
            changes = statuses(sup, row.id)
            assert changes[-1][1].startswith("stopped: idle for"), changes
            assert all(s != "paused" for s, _ in changes)

    run(body(), 150)


def test_a_stuck_claim_is_killed_and_retried_once(tmp_path, kube_cluster, kube_namespace,
                                                  image):
    cfg = kube_config(tmp_path, kube_cluster, kube_namespace, image,
                      kubernetes={"command": ONCE_COMMAND},
                      lifecycle={"claim_stuck": 2.0, "idle_after": 30.0})
    with_once_agent(cfg, "stuck")

    async def body() -> None:
        async with supervised(cfg) as sup:
            row = session(sup, "stuck")
            mid = send(sup, row, "hang please")
            first = await until(lambda: pod_of(sup, row.id), 60, "a Pod started")
            await until(lambda: claimed(sup, row, mid), 60, "the agent claimed (and hangs)")
            [reply] = await until(lambda: replies_to(cfg, mid), 90, "the retried reply")
            assert reply["content"]["text"] == "echo: hang please"
            assert message_row(sup, row, mid)["tries"] == 1
            changes = statuses(sup, row.id)
            assert any(r.startswith("killed:") for _, r in changes), changes
            assert pod_of(sup, row.id) in (None, first)  # same name, a new Pod
            assert Counter(r["in_reply_to"] for r in replies(cfg)) == {mid: 1}

    run(body(), 180)


def test_oom_and_a_pod_deleted_by_hand_are_seen_and_their_work_retried(
        tmp_path, kube_cluster, kube_namespace, image):
    data = config_data(tmp_path, kube_cluster, kube_namespace, image,
                       kubernetes={"command": ONCE_COMMAND},
                       lifecycle={"idle_after": 30.0})
    data["groups"] = {"hog": {"memory_limit": "64Mi", "memory_request": "64Mi"},
                      "slow": {"command": AGENT + ["--work-seconds", "4"]}}
    cfg = load_config(data, tmp_path)
    with_once_agent(cfg, "hog")

    async def body() -> None:
        async with supervised(cfg) as sup:
            hog, slow = session(sup, "hog"), session(sup, "slow")
            big = send(sup, hog, "hog memory")
            mid = send(sup, slow, "slow one")
            name = await until(lambda: pod_of(sup, slow.id), 60, "the slow Pod")
            await until(lambda: claimed(sup, slow, mid), 60, "the slow agent claimed")
            await in_thread(lambda: kube_cluster.kubectl(
                "delete", "pod", "-n", kube_namespace, name, "--wait=false"))
            [a] = await until(lambda: replies_to(cfg, big), 120, "the OOM-killed work answered")
            [b] = await until(lambda: replies_to(cfg, mid), 120, "the deleted work answered")
            assert (a["content"]["text"], b["content"]["text"]) == ("echo: hog memory",
                                                                    "echo: slow one")
            hog_log, slow_log = statuses(sup, hog.id), statuses(sup, slow.id)
            assert ("stopped", "agent oom, exit code 137") in hog_log, hog_log
            assert any(s == "stopped" and r.startswith("agent vanished")
                       for s, r in slow_log), slow_log
            assert message_row(sup, hog, big)["tries"] == 1
            assert message_row(sup, slow, mid)["tries"] == 1
            assert Counter(r["in_reply_to"] for r in replies(cfg)) == {big: 1, mid: 1}

    run(body(), 240)


def test_an_image_that_is_not_there_keeps_the_work(tmp_path, kube_cluster, kube_namespace,
                                                   image):
    cfg = kube_config(tmp_path, kube_cluster, kube_namespace, "orchestrator-agent:not-there")

    async def body() -> None:
        async with supervised(cfg) as sup:
            row = session(sup, "waiting")
            mid = send(sup, row, "still here?")
            await until(lambda: row.id in sup.tracked and sup.tracked[row.id].start.failures >= 2, 90,
                        "two failed starts (retried with backoff)")
            assert message_row(sup, row, mid) == {"status": "pending", "tries": 0}

            async def none_left() -> bool:  # a failed start's Pod is deleted; the next
                # start (after its backoff) may have made a new one meanwhile, so wait
                # for a moment between starts rather than look once
                return await in_thread(our_pods, kube_cluster, kube_namespace,
                                       cfg.kubernetes.instance) == []
            await until(none_left, 60, "no Pod left between failed starts")
            assert message_row(sup, row, mid) == {"status": "pending", "tries": 0}

    run(body(), 150)


def test_sigkill_of_the_orchestrator_while_five_pods_work(tmp_path, kube_cluster,
                                                          kube_namespace, image):
    data = config_data(tmp_path, kube_cluster, kube_namespace, image,
                       agent_args=["--work-seconds", "8"],
                       runtime={"on_shutdown": "leave"},
                       lifecycle={"idle_after": 30.0, "stop_idle_after": 60.0})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(data))
    cfg = load_config(data, tmp_path)
    instance = cfg.kubernetes.instance
    first = OrchestratorProcess(config_file, tmp_path / "first.log")
    client = Client(cfg)
    try:
        first.wait_up()
        sent = [client.send(f"g{i}", f"work {i}")[1] for i in range(5)]
        wait_for(lambda: len(our_pods(kube_cluster, kube_namespace, instance)) == 5, 90,
                 0.25, "five Pods")
        wait_for(lambda: all(query(client.paths(client.session(f"g{i}")).outbound_db,
                                   "SELECT 1 FROM processing_ack") for i in range(5)), 90,
                 0.25, "every agent claimed its message")
        first.end(signal.SIGKILL)
        before = set(our_pods(kube_cluster, kube_namespace, instance))
        second = OrchestratorProcess(config_file, tmp_path / "second.log")
        try:
            second.wait_up()
            wait_for(lambda: {r["in_reply_to"] for r in replies(cfg)} >= set(sent), 120, 0.25,
                     "every message answered")
            text = second.text()
            assert text.count("adopted Pod") == 5, text
            assert set(our_pods(kube_cluster, kube_namespace, instance)) <= before
            assert Counter(r["in_reply_to"] for r in replies(cfg)) == {m: 1 for m in sent}
        finally:
            second.end(signal.SIGTERM, timeout=60)
    finally:
        if first.proc.poll() is None:
            first.end(signal.SIGKILL)
        client.close()
