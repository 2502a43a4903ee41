"""The repository's Kubernetes manifests (deploy/kubernetes/) on the real test cluster.

- What the files say, without a cluster: the Role is exactly the runtime's calls, the
  DaemonSet mounts the data dir at the config's path, sets NODE_NAME, probes /healthz and
  /readyz, mounts the Secret's keys as plain files where the config reads them.
- RBAC on the cluster: the ServiceAccount's identity (impersonated by the admin) may do
  exactly the listed verbs, in its namespace only — ``kubectl auth can-i`` for a table of
  yes and no, and a SelfSubjectRulesReview for "nothing more".
- The DaemonSet end to end: the manifests applied to a fresh namespace with the test
  overlay (``overlay``), the orchestrator image imported, readiness, the Service's
  endpoint, a message through the API answered on a webhook by an agent Pod on the node.

The overlay, and why: this cluster has no kube-proxy and its API server listens on
127.0.0.1 only, so no Pod on the Pod network can reach it. The orchestrator Pod gets
``hostNetwork: true`` (``dnsPolicy: ClusterFirstWithHostNet``) and
``KUBERNETES_SERVICE_HOST=127.0.0.1`` / ``KUBERNETES_SERVICE_PORT=6443`` (the serving
certificate names 127.0.0.1). Host networking also puts the API on the machine: a free
port instead of 8750, and the webhook receiver on loopback. Everything else — config
keys aside (namespace, data dir, agent image, instance, port, webhook URL) — is the
repository's files as they are.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import secrets
import shutil
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import yaml
from loguru import logger

from orchestrator.config.load import load_config
from tests.support.api_helpers import Receiver, free_port
from tests.support.docker_fixtures import in_thread
from tests.support.helpers import REPO, until
from tests.support.kube import Cluster, use_data_dir

MANIFESTS = REPO / "deploy" / "kubernetes"
SA = "orchestrator"
DATA_ROOT = Path("/var/lib/orchestrator-test")  # a folder per test under it, removed after
LABEL_INSTANCE = "orchestrator.instance"

RUNTIME_RULES = {("", "pods", v) for v in ("create", "get", "list", "watch", "delete")} | {
    ("", "pods/log", "get")}
# what every authenticated identity may do (system:basic-user): review its own access
SELF_REVIEW = {("authorization.k8s.io", r, "create")
               for r in ("selfsubjectaccessreviews", "selfsubjectrulesreviews")}


def manifests() -> list[dict[str, Any]]:
    """Every object of kustomization.yaml's resources, in order."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects in deploy/kubernetes"
    return found[0]


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["config.toml"])


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [""])
            for r in rule.get("resources", []) for v in rule["verbs"]}


# --- the files -----------------------------------------------------------------------------


def test_the_role_is_exactly_what_the_runtime_calls() -> None:
    docs = manifests()
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert rule_set(role["rules"]) == RUNTIME_RULES
    assert not any(r.get("resourceNames") or r.get("nonResourceURLs") for r in role["rules"])
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SA,
                                    "namespace": "orchestrator"}]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} \
        == {one(docs, "Namespace")["metadata"]["name"]} == {config_of(docs)["kubernetes"]
                                                            ["namespace"]}


def test_the_configs_in_the_repository_load() -> None:
    """The ConfigMap's config.toml and deploy/compose-config.toml are valid configs."""
    k8s = load_config(config_of(manifests()), Path("/etc/orchestrator"))
    assert k8s.runtime.kind == "kubernetes" and k8s.delivery.channel == "webhook"
    assert str(k8s.data_dir) == "/var/lib/orchestrator/data"
    compose = tomllib.loads((REPO / "deploy" / "compose-config.toml").read_text())
    assert load_config(compose, Path("/srv/orchestrator/data")).runtime.kind == "docker"


def test_the_daemonset_runs_the_orchestrator_on_each_nodes_data_dir() -> None:
    docs = manifests()
    config, spec = config_of(docs), pod_spec(docs)
    assert config["runtime"]["kind"] == "kubernetes" and config["kubernetes"]["kubeconfig"] == ""
    assert spec["serviceAccountName"] == SA
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    data = mounts[config["data_dir"]]
    assert volumes[data["name"]]["hostPath"]["path"] == config["data_dir"]  # the same path
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    # the token and webhook secret: Secret keys as plain files (subPath: no symlink),
    # 0400, where the config reads them
    secret_volume = next(v for v in spec["volumes"] if "secret" in v)
    assert secret_volume["secret"]["defaultMode"] == 0o400
    for path in (config["api"]["token_file"], *config["delivery"]["secret_files"]):
        assert mounts[path]["name"] == secret_volume["name"] and mounts[path]["subPath"]
    port = container["ports"][0]
    assert config["api"]["listen"] == f"0.0.0.0:{port['containerPort']}"
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= one(docs, "DaemonSet")["spec"]["template"][
        "metadata"]["labels"].items()


# --- the test overlay ------------------------------------------------------------------------


def overlay(docs: list[dict[str, Any]], *, namespace: str, data_dir: Path, port: int,
            instance: str, agent_image: str, hook: str,
            server_image: str = "orchestrator:latest") -> list[dict[str, Any]]:
    """The manifests for this test (see the module doc for each change and why)."""
    out: list[dict[str, Any]] = []
    for doc in copy.deepcopy(docs):
        if doc["kind"] == "Namespace":
            continue  # the kube_namespace fixture made one
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "RoleBinding":
            for subject in doc["subjects"]:
                subject["namespace"] = namespace
        elif doc["kind"] == "ConfigMap":
            config = tomllib.loads(doc["data"]["config.toml"])
            config["data_dir"] = str(data_dir)
            config["kubernetes"].update(namespace=namespace, instance=instance,
                                        image=agent_image, image_pull_policy="Never")
            config["api"]["listen"] = f"0.0.0.0:{port}"
            config["delivery"]["url"] = hook
            doc["data"]["config.toml"] = tomli_w.dumps(config)
        elif doc["kind"] == "DaemonSet":
            spec = doc["spec"]["template"]["spec"]
            spec.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
            (container,) = spec["containers"]
            container["image"] = server_image  # the tag conftest.py built
            container["imagePullPolicy"] = "Never"
            container["env"] += [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                                 {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]
            container["ports"][0]["containerPort"] = port
            use_data_dir(spec, container, data_dir)
        out.append(doc)
    return out


def apply(cluster: Cluster, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                          "items": docs}))


def test_the_overlay_changes_only_what_this_cluster_needs() -> None:
    docs = manifests()
    got = overlay(docs, namespace="t-x", data_dir=Path("/d"), port=9999, instance="i",
                  agent_image="a:t", hook="http://127.0.0.1:1/hook")
    assert [d["kind"] for d in got] == [d["kind"] for d in docs if d["kind"] != "Namespace"]
    assert one(got, "Role") == {**one(docs, "Role"), "metadata": {
        **one(docs, "Role")["metadata"], "namespace": "t-x"}}
    spec = pod_spec(got)
    assert spec["hostNetwork"] and spec["securityContext"] == pod_spec(docs)["securityContext"]
    assert spec["containers"][0]["securityContext"] == \
        pod_spec(docs)["containers"][0]["securityContext"]
    assert config_of(got)["data_dir"] == "/d"


# --- RBAC on the cluster ---------------------------------------------------------------------

CAN_I = [  # (verb, resource, namespace: "own" | "other" | "all", allowed)
    ("create", "pods", "own", True),
    ("get", "pods", "own", True),
    ("list", "pods", "own", True),
    ("watch", "pods", "own", True),
    ("delete", "pods", "own", True),
    ("get", "pods/log", "own", True),
    ("patch", "pods", "own", False),
    ("update", "pods", "own", False),
    ("deletecollection", "pods", "own", False),
    ("create", "pods/exec", "own", False),
    ("create", "pods/eviction", "own", False),
    ("list", "secrets", "own", False),
    ("get", "secrets", "own", False),
    ("get", "configmaps", "own", False),
    ("create", "deployments.apps", "own", False),
    ("create", "pods", "other", False),
    ("list", "pods", "other", False),
    ("list", "pods", "all", False),
    ("delete", "nodes", "all", False),
    ("create", "rolebindings.rbac.authorization.k8s.io", "own", False),
]


@pytest.mark.kubernetes
def test_the_service_account_may_do_exactly_the_listed_verbs(
        kube_cluster: Cluster, kube_namespace: str) -> None:
    docs = [d for d in overlay(manifests(), namespace=kube_namespace, data_dir=Path("/x"),
                               port=8750, instance="i", agent_image="a", hook="http://h/")
            if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    apply(kube_cluster, docs)
    who = f"--as=system:serviceaccount:{kube_namespace}:{SA}"
    wrong = []
    for verb, resource, where, allowed in CAN_I:
        scope = {"own": ["-n", kube_namespace], "other": ["-n", "default"],
                 "all": ["--all-namespaces"]}[where]
        # "pods/log" as one argument would mean the Pod named "log": a subresource is a flag
        kind, _, sub = resource.partition("/")
        subresource = [f"--subresource={sub}"] if sub else []
        proc = kube_cluster.kubectl("auth", "can-i", verb, kind, *subresource, *scope, who,
                                    check=False)
        answer = proc.stdout.strip()
        assert answer in ("yes", "no"), f"can-i {verb} {resource}: {proc.stderr.strip()}"
        if (answer == "yes") != allowed:
            wrong.append(f"{verb} {resource} ({where}): {answer}")
    assert not wrong, f"the Role grants other than listed: {wrong}"

    def rules(namespace: str) -> set[tuple[str, str, str]]:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                  "spec": {"namespace": namespace}}
        proc = kube_cluster.kubectl("create", "-f", "-", "-o", "json", who,
                                    input=json.dumps(review))
        return rule_set(json.loads(proc.stdout)["status"]["resourceRules"])

    assert rules(kube_namespace) - SELF_REVIEW == RUNTIME_RULES  # nothing more
    assert rules("default") - SELF_REVIEW == set()  # and nothing elsewhere


# --- the DaemonSet end to end ----------------------------------------------------------------


def daemonset_ready(cluster: Cluster, namespace: str) -> bool:
    ds = cluster.get("daemonset", "orchestrator", namespace) or {}
    status = ds.get("status") or {}
    return status.get("desiredNumberScheduled", 0) >= 1 and \
        status.get("numberReady") == status.get("desiredNumberScheduled")


def ready_endpoints(cluster: Cluster, namespace: str) -> list[tuple[str, int]]:
    ep = cluster.get("endpoints", "orchestrator", namespace) or {}
    return [(a["ip"], p["port"]) for s in ep.get("subsets") or []
            for a in s.get("addresses") or [] for p in s.get("ports") or []]


def agent_pods(cluster: Cluster, namespace: str, instance: str) -> list[dict[str, Any]]:
    proc = cluster.kubectl("get", "pods", "-n", namespace, "-l",
                           f"{LABEL_INSTANCE}={instance}", "-o", "json")
    return json.loads(proc.stdout)["items"]


def diagnose(cluster: Cluster, namespace: str) -> None:
    """What the cluster says about the orchestrator Pod (logged when the test fails)."""
    for args in (("describe", "pods", "-n", namespace),
                 ("logs", "-n", namespace, "daemonset/orchestrator", "--tail=60")):
        proc = cluster.kubectl(*args, check=False)
        logger.info("kubectl {}:\n{}{}", " ".join(args), proc.stdout[-6000:], proc.stderr)


@pytest.mark.kubernetes
async def test_the_daemonset_from_the_manifests_answers_a_message_end_to_end(
        kube_cluster: Cluster, kube_namespace: str, orchestrator_image: str,
        agent_image: str) -> None:
    ns, instance, port = kube_namespace, f"t{uuid.uuid4().hex[:8]}", free_port()
    data_dir = DATA_ROOT / ns / "data"
    token = secrets.token_hex(24)
    hook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()  # as README
    receiver = await Receiver(hook_secret).start()
    started = time.monotonic()
    try:
        for tag in (orchestrator_image, agent_image):  # orchestrator_image: conftest.py
            await in_thread(kube_cluster.import_image, tag)
        t_import = time.monotonic() - started
        # the README's command, with this test's values
        kube_cluster.kubectl("-n", ns, "create", "secret", "generic", "orchestrator-secrets",
                             f"--from-literal=api-token={token}",
                             f"--from-literal=webhook-secret={hook_secret}")
        applied = time.monotonic()
        apply(kube_cluster, overlay(manifests(), namespace=ns, data_dir=data_dir, port=port,
                                    instance=instance, agent_image=agent_image,
                                    hook=receiver.url, server_image=orchestrator_image))
        await until(lambda: in_thread(daemonset_ready, kube_cluster, ns), 120,
                    "the orchestrator DaemonSet ready (/readyz)")
        t_ready = time.monotonic() - applied
        endpoints = await until(lambda: in_thread(ready_endpoints, kube_cluster, ns), 30,
                                "a ready endpoint of the orchestrator Service")
        assert [p for _, p in endpoints] == [port]
        # hostNetwork: the endpoint is this node's address; loopback is the same socket
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            assert (await api.get("/readyz")).status_code == 200
            sent = time.monotonic()
            r = await api.post("/v1/messages", headers={"Authorization": f"Bearer {token}"},
                               json={"agent_group": "support", "platform_id": "room-1",
                                     "content": {"text": "hello from outside the cluster"}})
            assert r.status_code == 201, r.text
            mid = r.json()["message_id"]
            got = await until(lambda: [q for q in receiver.replies()
                                       if q.json.get("in_reply_to") == mid], 90,
                              "the reply on the webhook receiver")
            t_reply = time.monotonic() - sent
        assert got[0].signature_ok
        assert "hello from outside the cluster" in got[0].json["content"]["text"]
        pods = await in_thread(agent_pods, kube_cluster, ns, instance)
        assert pods and all(p["spec"]["nodeName"] == kube_cluster.node_name for p in pods)
        logger.info("images imported in {:.1f}s, DaemonSet ready {:.1f}s after apply, reply "
                    "{:.2f}s after the POST", t_import, t_ready, t_reply)
    except BaseException:
        await in_thread(diagnose, kube_cluster, ns)
        raise
    finally:
        await receiver.stop()
        # the orchestrator leaves its agents on SIGTERM: delete both, then the data dir
        kube_cluster.kubectl("-n", ns, "delete", "daemonset", "orchestrator", "--wait=true",
                             "--ignore-not-found", check=False, timeout=120)
        kube_cluster.kubectl("-n", ns, "delete", "pods", "--all", "--wait=true",
                             check=False, timeout=120)
        shutil.rmtree(DATA_ROOT / ns, ignore_errors=True)
        with contextlib.suppress(OSError):  # another test's folder may still be there
            DATA_ROOT.rmdir()
