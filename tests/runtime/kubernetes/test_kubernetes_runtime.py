"""KubernetesRuntime against the real test cluster, with the real reference agent.

Each test gets a fresh namespace (``kube_namespace``) and a unique instance label;
the agent image is imported into the cluster's containerd and run with
``imagePullPolicy: Never`` (nothing is ever pulled). Every wait is a condition with
a deadline while the event loop keeps running.
"""

from __future__ import annotations

import dataclasses
import json
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.groups import AgentSettings
from orchestrator.config.sections import (
    DockerConfig,
    KubernetesConfig,
    LifecycleConfig,
    RuntimeConfig,
)
from orchestrator.runtime.base import AgentExit, RuntimeUnavailable, SessionRef
from orchestrator.runtime.kubernetes.calls import ApiUnavailable
from orchestrator.runtime.kubernetes.runtime import KubernetesRuntime, StartFailed
from orchestrator.runtime.kubernetes.spec import LABEL_INSTANCE, pod_manifest, pod_name
from tests.support.docker_fixtures import in_thread, insert_message, make_session
from tests.support.helpers import holds, needs_root, ro_db, until
from tests.support.kube import Cluster

pytestmark = pytest.mark.kubernetes

UID_RANGE = (200100, 200199)
AGENT = ("python3", "-m", "orchestrator.agent", "--workspace", "/workspace",
         "--poll-interval", "0.05", "--heartbeat-interval", "0.2")


@pytest.fixture
def image(kube_cluster: Cluster, agent_image: str) -> str:
    kube_cluster.import_image(agent_image)
    return agent_image


def make_runtime(cluster: Cluster, namespace: str, data_dir: Path, image: str,
                 **overrides: Any) -> tuple[KubernetesRuntime, list[AgentExit], str]:
    instance = overrides.pop("instance", f"t{uuid.uuid4().hex[:8]}")
    first_version = overrides.pop("first_version", None)
    uid_range = overrides.pop("uid_range", None)
    values: dict[str, Any] = {
        "namespace": namespace, "kubeconfig": str(cluster.kubeconfig),
        "node_name": cluster.node_name, "instance": instance, "image": image,
        "image_pull_policy": "Never", "command": AGENT, "start_timeout": 60.0,
        "cpu_request": "10m", "memory_request": "32Mi"}
    values.update(overrides)
    exits: list[AgentExit] = []
    rt = KubernetesRuntime(KubernetesConfig(**values), data_dir, exits.append, stop_grace=2.0,
                           first_version=first_version, uid_range=uid_range)
    return rt, exits, instance


def settings(k8s: KubernetesConfig) -> AgentSettings:
    """A group's settings with these [kubernetes] values."""
    return AgentSettings("g", "kubernetes", RuntimeConfig(), DockerConfig(), LifecycleConfig(),
                         kubernetes=k8s)


def pods(cluster: Cluster, namespace: str) -> dict[str, dict]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
    return {p["metadata"]["name"]: p for p in json.loads(out)["items"]}


def replies(folder: Path) -> list[tuple]:
    with ro_db(folder / "outbound.db") as conn:
        return conn.execute("SELECT in_reply_to, content FROM messages_out").fetchall()


async def test_a_pod_runs_the_agent_locked_down_and_stops(tmp_path, kube_cluster, kube_namespace,
                                                          image):
    folder = make_session(tmp_path, "g1", "user@example.com")
    insert_message(folder, "m2", "hi there")
    rt, exits, instance = make_runtime(kube_cluster, kube_namespace, tmp_path, image)
    try:
        handle = await rt.start(SessionRef("g1", "user@example.com", folder))
        assert rt.is_running("user@example.com") and not handle.adopted
        rows = await until(lambda: replies(folder), 60, "the reply in outbound.db")
        assert rows[0][0] == "m2" and "echo: hi there" in rows[0][1]
        pod = (await in_thread(pods, kube_cluster, kube_namespace))[handle.ident]
        spec = pod["spec"]
        assert spec["nodeName"] == kube_cluster.node_name
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsNonRoot"] is True
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert not any(v["mountPath"].startswith("/var/run/secrets")
                       for v in c["volumeMounts"])
        assert pod["metadata"]["labels"][LABEL_INSTANCE] == instance
        assert pod["metadata"]["annotations"]["orchestrator.session"] == "user@example.com"
        # the agent cannot write inbound.db nor the root file system
        probe = kube_cluster.kubectl(
            "exec", "-n", kube_namespace, handle.ident, "--", "python3", "-c",
            "import sqlite3; c = sqlite3.connect('/workspace/inbound.db'); "
            "c.execute(\"UPDATE messages_in SET status='completed'\"); c.commit()",
            check=False)
        assert probe.returncode != 0 and "readonly" in probe.stderr.replace("-", "").lower()
        touch = kube_cluster.kubectl("exec", "-n", kube_namespace, handle.ident, "--",
                                     "sh", "-c", "touch /etc/owned", check=False)
        assert touch.returncode != 0
        await rt.stop("user@example.com", grace=2)
        assert [(e.session_id, e.reason) for e in exits] == [("user@example.com", "stopped")]
        assert not rt.is_running("user@example.com")
        assert await in_thread(pods, kube_cluster, kube_namespace) == {}
    finally:
        await rt.close()


async def test_oom_and_a_pod_deleted_by_hand_are_seen_as_such(tmp_path, kube_cluster,
                                                                kube_namespace, image):
    oom = make_session(tmp_path, "g", "oom")
    gone = make_session(tmp_path, "g", "gone")
    hog = ("python3", "-c", "b = []\nwhile True: b.append(bytearray(16 << 20))")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image)
    try:
        tiny = settings(dataclasses.replace(rt.config, command=hog, memory_limit="48Mi",
                                            memory_request="48Mi"))
        await rt.start(SessionRef("g", "oom", oom, tiny))
        handle = await rt.start(SessionRef("g", "gone", gone))
        await until(lambda: any(e.session_id == "oom" for e in exits), 60, "the OOM kill")
        await in_thread(lambda: kube_cluster.kubectl("delete", "pod", "-n", kube_namespace,
                                                     handle.ident, "--wait=false"))
        await until(lambda: any(e.session_id == "gone" for e in exits), 60, "the deletion")
        reasons = {e.session_id: e.reason for e in exits}
        assert reasons == {"oom": "oom", "gone": "vanished"}, exits
        assert next(e.exit_code for e in exits if e.session_id == "oom") == 137
        await until(lambda: _no_pods(kube_cluster, kube_namespace), 30, "finished Pods deleted")
        assert len(exits) == 2  # each end reported once
    finally:
        await rt.close()


async def _no_pods(cluster: Cluster, namespace: str) -> bool:
    return await in_thread(pods, cluster, namespace) == {}


async def test_an_image_that_is_not_there_fails_the_start_in_one_line(
        tmp_path, kube_cluster, kube_namespace, image, capfd):
    folder = make_session(tmp_path, "g", "s")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path,
                                "orchestrator-agent:does-not-exist")
    try:
        with pytest.raises(StartFailed) as failed:
            await rt.start(SessionRef("g", "s", folder))
        line = str(failed.value)
        assert "image orchestrator-agent:does-not-exist cannot be used" in line
        assert "ErrImageNeverPull" in line and "\n" not in line
        assert "work stays pending" in line
        assert not rt.is_running("s") and exits == []
        assert await _no_pods(kube_cluster, kube_namespace)  # deleted, not left pulling
        with pytest.raises(StartFailed):  # the next try fails the same way, said once
            await rt.start(SessionRef("g", "s", folder))
    finally:
        await rt.close()


async def test_a_pod_its_node_cannot_take_fails_the_start(tmp_path, kube_cluster,
                                                          kube_namespace, image):
    folder = make_session(tmp_path, "g", "s")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image,
                                cpu_request="500", cpu_limit="500")
    try:
        with pytest.raises(StartFailed, match="OutOfcpu|refused by its node"):
            await rt.start(SessionRef("g", "s", folder))
        assert exits == [] and await _no_pods(kube_cluster, kube_namespace)
    finally:
        await rt.close()


async def test_kill_reports_killed_and_the_pod_is_gone(tmp_path, kube_cluster, kube_namespace,
                                                       image):
    folder = make_session(tmp_path, "g", "s")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image)
    try:
        await rt.start(SessionRef("g", "s", folder))
        await rt.kill("s")
        assert [e.reason for e in exits] == ["killed"], exits
        assert await _no_pods(kube_cluster, kube_namespace)
        await rt.kill("s")  # absent = done
        await rt.stop("s", 1)
        assert len(exits) == 1
    finally:
        await rt.close()


async def test_recover_adopts_live_pods_deletes_finished_and_never_touches_foreign(
        tmp_path, kube_cluster, kube_namespace, image):
    live = make_session(tmp_path, "g", "live")
    done = make_session(tmp_path, "g", "done")
    rt, exits, instance = make_runtime(kube_cluster, kube_namespace, tmp_path, image)
    foreign = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "foreign", "labels": {LABEL_INSTANCE: "someone-else"}},
               "spec": {"nodeName": kube_cluster.node_name, "restartPolicy": "Never",
                        "automountServiceAccountToken": False,
                        "containers": [{"name": "c", "image": image,
                                        "imagePullPolicy": "Never",
                                        "command": ["sleep", "600"]}]}}
    unlabelled = json.loads(json.dumps(foreign))
    unlabelled["metadata"] = {"name": "unlabelled"}
    await in_thread(kube_cluster.apply, foreign, kube_namespace)
    await in_thread(kube_cluster.apply, unlabelled, kube_namespace)
    quick = ("python3", "-c", "import sys; sys.exit(3)")
    try:
        await rt.start(SessionRef("g", "live", live))
        ends = settings(dataclasses.replace(rt.config, command=quick))
        await rt.close()  # the orchestrator goes away; its Pods stay
        # while it is away, the second session's agent runs and ends
        rt2, exits2, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image,
                                      instance=instance)
        await rt2.start(SessionRef("g", "done", done, ends))
        await until(lambda: exits2, 60, "the quick agent's exit")
        await rt2.close()
        rt3, exits3, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image,
                                      instance=instance)
        try:
            adopted = await rt3.recover()
            assert [(h.session_id, h.adopted) for h in adopted] == [("live", True)]
            assert rt3.listed and rt3.is_running("live") and not rt3.is_running("done")
            await rt3.reconcile()
            await rt3.stop("live", 2)
            assert [e.reason for e in exits3] == ["stopped"]
            names = set(await in_thread(pods, kube_cluster, kube_namespace))
            assert names == {"foreign", "unlabelled"}, names
            await holds(lambda: rt3.running() == [], 0.5)
        finally:
            await rt3.close()
    finally:
        await rt.close()


async def test_a_pod_of_ours_on_another_node_is_never_adopted_reported_or_deleted(
        tmp_path, kube_cluster, kube_namespace, image):
    """One DaemonSet, one instance label: the orchestrator on node B must leave node A's
    Pods alone. A Pod with our label, group and session but bound to another node (it
    stays Pending: that node does not exist, the API accepts it) is invisible to us,
    while our own Pod of the same session id runs beside it."""
    folder = make_session(tmp_path, "g", "s")
    rt, exits, instance = make_runtime(kube_cluster, kube_namespace, tmp_path, image)
    theirs = pod_manifest(rt.config, SessionRef("g", "s", folder), node="elsewhere",
                          uid=10001, gid=10001, folder=folder)
    name = theirs["metadata"]["name"]
    await in_thread(kube_cluster.apply, theirs, kube_namespace)

    def untouched() -> bool:
        pod = kube_cluster.get("pod", name, kube_namespace)
        return (pod is not None and pod["spec"]["nodeName"] == "elsewhere"
                and not pod["metadata"].get("deletionTimestamp"))

    try:
        assert await rt.recover() == [] and rt.listed
        await until(lambda: rt.watch.connected, 30, "the watch")
        handle = await rt.start(SessionRef("g", "s", folder))  # same session id, our node
        assert handle.ident != name
        # a change to their Pod: no watch event reaches us (field selector)
        await in_thread(kube_cluster.kubectl, "annotate", "pod", "-n", kube_namespace, name,
                        "touched=1")
        await rt.reconcile()
        await rt.stop("s", 1)
        assert [(e.session_id, e.reason) for e in exits] == [("s", "stopped")]
        await rt.stop("s", 1)  # nothing of ours left; theirs is not ours to stop
        await rt.reconcile()
        assert rt.running() == [] and len(exits) == 1
        assert await in_thread(untouched)
        rt2, exits2, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image,
                                      instance=instance)
        try:
            assert await rt2.recover() == []
            await rt2.reconcile()
            await holds(lambda: rt2.running() == [] and exits2 == [], 1.0)
            assert await in_thread(untouched)
        finally:
            await rt2.close()
    finally:
        await rt.close()
        # no kubelet will ever confirm a graceful delete on a node that does not exist
        await in_thread(kube_cluster.kubectl, "delete", "pod", "-n", kube_namespace, name,
                        "--grace-period=0", "--force", "--ignore-not-found")


@needs_root("per-session uids")
async def test_sessions_with_uids_of_their_own_share_the_group_folder_through_its_gid(
        tmp_path, kube_cluster, kube_namespace, image, umask_022):
    """runtime.identity's rule, as Docker applies it: with a uid per session the group
    folder is root:<the group's gid> 02770 and each Pod carries that gid in
    supplementalGroups, so two sessions of one group (two uids) both write it and read
    each other's files."""
    data = tmp_path / "data"
    folders = [make_session(data, "grp", sid) for sid in ("sess-a", "sess-b")]
    script = ("id -G > /workspace/outbox/groups.txt; "
              "cat /workspace/agent/*.txt > /workspace/outbox/seen.txt 2>&1; "
              "echo from-$ORCHESTRATOR_SESSION > /workspace/agent/$ORCHESTRATOR_SESSION.txt")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, data, image,
                                uid_range=UID_RANGE, command=("sh", "-c", script),
                                group_folder="{data_dir}/groups/{group}")
    try:
        for n, folder in enumerate(folders, start=1):  # one after the other
            await rt.start(SessionRef("grp", folder.name, folder))
            await until(lambda n=n: len(exits) == n, 90, f"agent {n} ended")
    finally:
        await rt.close()
    assert [(e.reason, e.exit_code) for e in exits] == [("exited", 0), ("exited", 0)]
    shared = data / "groups" / "grp"
    st = shared.stat()
    gid = st.st_gid
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o2770)
    session_uids = {folder.stat().st_uid for folder in folders}
    assert len(session_uids) == 2 and gid not in session_uids
    assert UID_RANGE[0] <= gid <= UID_RANGE[1]
    for folder in folders:
        assert str(gid) in (folder / "outbox" / "groups.txt").read_text().split()
    assert (shared / "sess-a.txt").stat().st_gid == gid  # the setgid folder's group
    assert (shared / "sess-b.txt").stat().st_uid == folders[1].stat().st_uid
    assert (folders[1] / "outbox" / "seen.txt").read_text() == "from-sess-a\n"


async def test_a_name_taken_by_a_foreign_pod_is_refused(tmp_path, kube_cluster, kube_namespace,
                                                        image):
    folder = make_session(tmp_path, "g", "s")
    rt, exits, instance = make_runtime(kube_cluster, kube_namespace, tmp_path, image)
    squatter = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name(instance, kube_cluster.node_name, "g", "s")},
                "spec": {"nodeName": kube_cluster.node_name, "restartPolicy": "Never",
                         "containers": [{"name": "c", "image": image,
                                         "imagePullPolicy": "Never",
                                         "command": ["sleep", "600"]}]}}
    await in_thread(kube_cluster.apply, squatter, kube_namespace)
    try:
        with pytest.raises(RuntimeUnavailable, match="does not own"):
            await rt.start(SessionRef("g", "s", folder))
        await rt.stop("s", 1)
        assert set(await in_thread(pods, kube_cluster, kube_namespace)) == {squatter[
            "metadata"]["name"]}
    finally:
        await rt.close()


def server_says_gone(cluster: Cluster, namespace: str) -> bool:
    """Whether the API server answers a watch from resourceVersion 1 with 410 Gone (a
    young cluster's watch cache may still hold every event since then and replay them)."""
    out = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{namespace}/pods?watch=1"
                          "&resourceVersion=1&timeoutSeconds=1", check=False, timeout=30)
    return '"code":410' in out.stdout.replace(" ", "")


async def test_a_watch_from_an_old_version_relists_on_410_gone(tmp_path, kube_cluster,
                                                                 kube_namespace, image):
    """The first watch starts from resourceVersion 1. Where the API server answers 410
    Gone, the watch lists again; where it replays history instead, the stale events must
    not confuse the bookkeeping. Either way the exit is seen once. (The loop's relist on
    410 is pinned down with a fake stream in test_watch.)"""
    folder = make_session(tmp_path, "g", "s")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, image,
                                first_version="1", command=("sleep", "2"))
    try:
        gone = await in_thread(server_says_gone, kube_cluster, kube_namespace)
        await rt.recover()
        if gone:
            await until(lambda: rt.watch.gone >= 1, 30, "a 410 Gone answer")
            await until(lambda: rt.watch.lists >= 2, 30, "listed again")
        await until(lambda: rt.watch.connected, 30, "the watch")
        await rt.start(SessionRef("g", "s", folder))
        await until(lambda: exits, 60, "the exit, seen by the watch")
        assert [(e.reason, e.exit_code) for e in exits] == [("exited", 0)]
        print(f"API server answered 410 Gone to resourceVersion 1: {gone}")
    finally:
        await rt.close()


async def test_an_unreachable_api_server_is_one_line_and_reported_once(tmp_path, capfd):
    folder = make_session(tmp_path, "g", "s")
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "x"}}]}))
    rt = KubernetesRuntime(KubernetesConfig(kubeconfig=str(config), node_name="n"), tmp_path,
                           lambda e: None)
    try:
        for _ in range(2):
            with pytest.raises(ApiUnavailable) as failed:
                await rt.start(SessionRef("g", "s", folder))
            assert "Kubernetes API server unreachable at https://127.0.0.1:9" in str(
                failed.value)
            assert failed.value.reported
        with pytest.raises(ApiUnavailable):
            await rt.ping()
        assert not rt.listed
    finally:
        await rt.close()
    missing = KubernetesRuntime(KubernetesConfig(kubeconfig=str(tmp_path / "nope")), tmp_path,
                                lambda e: None)
    try:
        with pytest.raises(ApiUnavailable, match="set \\[kubernetes\\] kubeconfig"):
            await missing.ping()
    finally:
        await missing.close()

