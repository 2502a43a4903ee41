"""Two orchestrators as one service on the real test cluster (issue 23): each in its own
Pod, with its own data dir (a hostPath of its own) and its own ``[kubernetes] instance``,
both on the one node; they find each other through the API server (``[cluster]
discovery = "kubernetes"``, ``shard_ids = "pod"``: a shard's id is its Pod's name, from
the Downward API), and a message sent to either is answered by the agent Pod of the
shard that owns its conversation.

The Pods are the repository's DaemonSet template (deploy/kubernetes/) as two bare Pods
(a DaemonSet makes one per node), with the test overlay of tests/cluster/test_deploy.py
(host network, the API server on 127.0.0.1) and, per Pod, environment overrides: the
shard id and the instance label from ``metadata.name``, the data dir, the API port
(host network: two ports on one address; the members' URLs use each Pod's port named
``api``).

1. both Ready, each lists the other as a member (its log);
2. a chat that ranks ``orch-b`` first is POSTed to ``orch-a`` and one that ranks
   ``orch-a`` first to ``orch-b``: each is forwarded (``X-Orchestrator-Shard``), answered
   on the webhook by an agent Pod carrying the *owner's* instance label, its session
   folder in the owner's data dir only, ``GET /v1/sessions/{id}`` the same through
   either shard;
3. ``orch-b``'s Pod force-deleted (its process killed): a POST for b's chat to ``orch-a``
   is ``503`` with ``Retry-After`` and ``"shard": "orch-b"``; b's agent Pod is left alone
   (``orch-a`` never touches another instance's Pods);
4. ``orch-b`` back (the same Pod again: the same name, data dir and instance): the same
   ``Idempotency-Key`` is written once (a second retry replays the same message id),
   ``orch-a``'s agent Pod is the same Pod throughout (b's start-up reconcile left it
   alone), and b's agent answers the retried message.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import secrets
import shutil
import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from loguru import logger

from orchestrator.api.shard_router import conversation_of, key_of
from orchestrator.rules.placement import ranking
from tests.cluster.test_deploy import LABEL_INSTANCE, apply, manifests, one, overlay
from tests.support.api_helpers import Receiver, free_port
from tests.support.docker_fixtures import in_thread
from tests.support.helpers import until
from tests.support.kube import Cluster, condition_true, use_data_dir

pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(600)]

DATA_ROOT = Path("/var/lib/orchestrator-test")  # a folder per test under it, removed after
SHARDS = ("orch-a", "orch-b")
GROUP = "support"  # the ConfigMap's [groups] (see deploy/kubernetes/configmap.yaml)
LABEL_SESSION = "orchestrator.session"


def cluster_config(text: str) -> str:
    """The overlaid ConfigMap's config.toml with ``[cluster]`` on: Kubernetes discovery,
    shard ids by Pod name, quick probes (the test waits on them)."""
    config = tomllib.loads(text)
    config["cluster"] = {"discovery": "kubernetes", "shard_ids": "pod", "probe_interval": 0.5,
                         "peer_timeout": 2.0, "retry_after": 1}
    return tomli_w.dumps(config)


def shard_pod(daemonset: dict[str, Any], name: str, data_dir: Path, port: int
              ) -> dict[str, Any]:
    """The DaemonSet's (overlaid) Pod template as one bare Pod: its own name, data dir
    (a hostPath at the same path inside) and API port; shard id and instance from the
    Downward API."""
    template = copy.deepcopy(daemonset["spec"]["template"])
    spec = template["spec"]
    (container,) = spec["containers"]
    container["env"] += [
        {"name": "ORCHESTRATOR_CLUSTER__SHARD",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "ORCHESTRATOR_KUBERNETES__INSTANCE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "ORCHESTRATOR_DATA_DIR", "value": str(data_dir)},
        {"name": "ORCHESTRATOR_API__LISTEN", "value": f"0.0.0.0:{port}"},
    ]
    container["ports"][0]["containerPort"] = port
    use_data_dir(spec, container, data_dir)
    spec["restartPolicy"] = "Always"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": daemonset["metadata"]["namespace"],
                         "labels": template["metadata"]["labels"]},
            "spec": spec}


def chat_owned_by(owner: str, tag: str) -> dict[str, Any]:
    """A message body whose chat ranks ``owner`` first among the two shards."""
    for n in range(1000):
        body = {"agent_group": GROUP, "platform_id": f"{tag}-{n}",
                "content": {"text": f"hello {owner}, from chat {tag}-{n}"}}
        parts = conversation_of(json.dumps(body).encode(), "shared")
        assert parts is not None
        if ranking(key_of(parts), list(SHARDS))[0] == owner:
            return body
    raise AssertionError(f"no chat ranks {owner} first")


def pods_of(cluster: Cluster, namespace: str, instance: str) -> dict[str, str]:
    """session label -> Pod uid of the agent Pods carrying ``instance``."""
    proc = cluster.kubectl("get", "pods", "-n", namespace, "-l",
                           f"{LABEL_INSTANCE}={instance}", "-o", "json")
    return {p["metadata"]["labels"].get(LABEL_SESSION, ""): p["metadata"]["uid"]
            for p in json.loads(proc.stdout)["items"]
            if not p["metadata"].get("deletionTimestamp")}


def ready(cluster: Cluster, namespace: str, name: str) -> bool:
    pod = cluster.get("pod", name, namespace)
    return bool(pod) and condition_true(pod, "Ready")  # type: ignore[arg-type]


def sees_both(cluster: Cluster, namespace: str, name: str) -> bool:
    """Whether the shard's log lists both shards as members, the last time it listed."""
    logs = cluster.kubectl("logs", "-n", namespace, name, check=False).stdout
    listed = [line for line in logs.splitlines() if "cluster members:" in line]
    return bool(listed) and all(f"{s}=http://" in listed[-1] for s in SHARDS) \
        and "no running Pod" not in listed[-1]


def chat_messages(data_dir: Path, session_id: str) -> list[str]:
    """Ids of the chat messages in a session's inbound.db (on the node's disk)."""
    db = data_dir / "sessions" / GROUP / session_id / "inbound.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM messages_in WHERE kind = 'chat'")]


def refused(resp: httpx.Response) -> bool:
    return resp.status_code == 503


async def test_two_shards_on_one_node_answer_each_others_chats(
        kube_cluster: Cluster, kube_namespace: str, orchestrator_image: str,
        agent_image: str) -> None:
    ns, root = kube_namespace, DATA_ROOT / kube_namespace
    ports = {s: free_port() for s in SHARDS}
    data = {s: root / s / "data" for s in SHARDS}
    token = secrets.token_hex(24)
    hook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    receiver = await Receiver(hook_secret).start()
    auth = {"Authorization": f"Bearer {token}"}
    began = time.monotonic()
    try:
        for tag in (orchestrator_image, agent_image):
            await in_thread(kube_cluster.import_image, tag)
        kube_cluster.kubectl("-n", ns, "create", "secret", "generic", "orchestrator-secrets",
                             f"--from-literal=api-token={token}",
                             f"--from-literal=webhook-secret={hook_secret}")
        docs = overlay(manifests(), namespace=ns, data_dir=root / "unused", port=ports["orch-a"],
                       instance="unused", agent_image=agent_image, hook=receiver.url,
                       server_image=orchestrator_image)
        config_map = one(docs, "ConfigMap")
        config_map["data"]["config.toml"] = cluster_config(config_map["data"]["config.toml"])
        daemonset = one(docs, "DaemonSet")
        pods = {s: shard_pod(daemonset, s, data[s], ports[s]) for s in SHARDS}
        apply(kube_cluster, [d for d in docs if d["kind"] not in ("DaemonSet", "Service")]
              + list(pods.values()))
        applied = time.monotonic()
        for s in SHARDS:
            await until(lambda s=s: in_thread(ready, kube_cluster, ns, s), 120,
                        f"orchestrator Pod {s} Ready (/readyz)", interval=0.5)
            await until(lambda s=s: in_thread(sees_both, kube_cluster, ns, s), 60,
                        f"{s} lists both shards as members (discovered through the API)",
                        interval=0.5)
        t_ready = time.monotonic() - applied
        url = {s: f"http://127.0.0.1:{ports[s]}" for s in SHARDS}

        async with httpx.AsyncClient(timeout=30, headers=auth) as api:
            # --- a message to either shard, answered by the owner's agent Pod ---------
            sent = time.monotonic()
            chats = {"orch-b": chat_owned_by("orch-b", "to-b"),
                     "orch-a": chat_owned_by("orch-a", "to-a")}
            posted: dict[str, dict[str, Any]] = {}
            for owner, other in (("orch-b", "orch-a"), ("orch-a", "orch-b")):
                r = await api.post(url[other] + "/v1/messages", json=chats[owner],
                                   headers={"Idempotency-Key": f"{owner}-1"})
                assert r.status_code == 201, r.text
                assert r.headers.get("x-orchestrator-shard") == owner  # forwarded
                posted[owner] = r.json()
            for owner, got in posted.items():
                replies = await until(lambda got=got: [
                    q for q in receiver.replies()
                    if q.json.get("in_reply_to") == got["message_id"]], 120,
                    f"the reply of {owner}'s agent on the webhook", interval=0.2)
                assert replies[0].signature_ok and replies[0].json["session_id"] == \
                    got["session_id"]
                sid = got["session_id"]
                assert sid in await in_thread(pods_of, kube_cluster, ns, owner)
                assert (data[owner] / "sessions" / GROUP / sid).is_dir()
                assert not [f for s in SHARDS if s != owner for f in data[s].glob(f"sessions/*/{sid}")]
                for s in SHARDS:  # the same session through either shard
                    r = await api.get(f"{url[s]}/v1/sessions/{sid}")
                    assert r.status_code == 200, r.text
                    assert r.json()["session_id"] == sid
                    if s != owner:
                        assert r.headers.get("x-orchestrator-shard") == owner
            t_replies = time.monotonic() - sent
            agents_a = await in_thread(pods_of, kube_cluster, ns, "orch-a")
            agents_b = await in_thread(pods_of, kube_cluster, ns, "orch-b")
            assert set(agents_a).isdisjoint(agents_b)

            # --- orch-b killed: its chat is refused, naming it --------------------------
            kube_cluster.kubectl("-n", ns, "delete", "pod", "orch-b", "--grace-period=0",
                                 "--force", "--wait=true", timeout=120)

            async def b_gone() -> bool:
                try:
                    await api.get(url["orch-b"] + "/healthz", timeout=1)
                except httpx.HTTPError:
                    return True
                return False

            await until(b_gone, 60, "orch-b's API gone", interval=0.2)
            again = {"Idempotency-Key": "orch-b-2"}
            second = {**chats["orch-b"], "content": {"text": "the second message"}}
            r = await api.post(url["orch-a"] + "/v1/messages", json=second, headers=again)
            assert r.status_code == 503, r.text
            assert r.headers.get("retry-after") == "1"
            assert r.json()["shard"] == "orch-b" and "shard orch-b" in r.json()["error"]
            # orch-a leaves b's agent Pod alone (another instance's)
            assert await in_thread(pods_of, kube_cluster, ns, "orch-b") == agents_b

            # --- orch-b back: the same key is written once --------------------------------
            kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(pods["orch-b"]))
            back = time.monotonic()
            await until(lambda: in_thread(ready, kube_cluster, ns, "orch-b"), 120,
                        "orch-b Ready again", interval=0.5)
            written = await until(lambda: _accepted(api, url["orch-a"], second, again), 60,
                                  "the retried message accepted once orch-b is back",
                                  interval=0.5)
            t_back = time.monotonic() - back
            assert written.headers.get("x-orchestrator-shard") == "orch-b"
            replay = await api.post(url["orch-b"] + "/v1/messages", json=second, headers=again)
            assert replay.status_code == 201 and replay.json() == written.json()
            sid = posted["orch-b"]["session_id"]
            assert written.json()["session_id"] == sid
            assert sorted(chat_messages(data["orch-b"], sid)) == sorted(
                [posted["orch-b"]["message_id"], written.json()["message_id"]])
            await until(lambda: [q for q in receiver.replies() if q.json.get("in_reply_to")
                                 == written.json()["message_id"]], 120,
                        "orch-b's agent answering the retried message", interval=0.2)
            # b's start-up reconcile left a's agent Pod alone
            assert await in_thread(pods_of, kube_cluster, ns, "orch-a") == agents_a
        logger.info("two shards: Ready and discovered {:.1f}s after apply, both replies {:.1f}s "
                    "after the POSTs, orch-b back and the retry written {:.1f}s after its "
                    "Pod was re-created; {:.0f}s in all", t_ready, t_replies, t_back,
                    time.monotonic() - began)
    except BaseException:
        for s in SHARDS:
            proc = kube_cluster.kubectl("logs", "-n", ns, s, "--tail=80", check=False)
            logger.info("kubectl logs {}:\n{}{}", s, proc.stdout[-8000:], proc.stderr)
        raise
    finally:
        await receiver.stop()
        kube_cluster.kubectl("-n", ns, "delete", "pods", "--all", "--wait=true",
                             check=False, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # another test's folder may still be there
            DATA_ROOT.rmdir()


async def _accepted(api: httpx.AsyncClient, url: str, body: dict[str, Any],
                    headers: dict[str, str]) -> httpx.Response | None:
    """The POST's answer once it is not a 503 (the same key every time: a replay-safe
    retry, as a client would do after Retry-After)."""
    r = await api.post(url + "/v1/messages", json=body, headers=headers)
    if refused(r):
        return None
    assert r.status_code == 201, r.text
    return r
