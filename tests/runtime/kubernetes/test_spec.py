"""kubernetes spec: Pod names, label values, the manifest's least-privilege defaults (pure)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lightkube.core.selector import build_selector

from orchestrator.config.groups import resolve
from orchestrator.config.load import load_config
from orchestrator.config.sections import KubernetesConfig
from orchestrator.runtime.base import RuntimeUnavailable, SessionRef
from orchestrator.runtime.identity import FALLBACK_GID, FALLBACK_UID, AgentIds
from orchestrator.runtime.kubernetes import spec
from orchestrator.runtime.kubernetes.spec import (
    ANNOTATION_SESSION,
    LABEL_GROUP,
    LABEL_INSTANCE,
    LABEL_SESSION,
    LABEL_SETTINGS,
    ids_of,
    label_value,
    owned,
    pod_manifest,
    pod_name,
    pod_selectors,
    selector_text,
)

DNS_1123 = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_OK = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


@pytest.mark.parametrize("value, kept", [
    ("s1", True),
    ("A.b_c-9", True),
    ("x" * 63, True),
    ("x" * 64, False),  # too long
    ("user@example.com", False),  # '@' is not allowed in a label value
    ("a+b", False),
    ("end-", False),  # must end alphanumeric
    ("9" * 128, False),
])
def test_a_label_value_is_the_id_itself_only_when_kubernetes_accepts_it(value, kept):
    got = label_value(value)
    assert LABEL_OK.fullmatch(got)
    assert (got == value) is kept
    if not kept:
        assert got.startswith("h-") and label_value(value) == got  # stable


def test_ids_that_do_not_fit_a_label_get_different_hashes():
    assert label_value("a@b") != label_value("a+b")


@pytest.mark.parametrize("instance, group, session", [
    ("default", "g", "s1"),
    ("default", "Support", "User@Example.com"),
    ("ci-" + "x" * 40, "group" * 20, "s" * 128),
    ("default", "g", "-x"),
    ("a.b", "g_1", "x+y"),
])
def test_pod_names_are_dns_1123_and_at_most_63(instance, group, session):
    name = pod_name(instance, "node-" + "n" * 200, group, session)
    assert DNS_1123.fullmatch(name) and len(name) <= 63
    assert name.startswith("orch-")


@pytest.mark.parametrize("a, b", [
    (("default", "n", "g", "s"), ("default", "n", "g", "S")),  # case only
    (("default", "n", "g", "a@b"), ("default", "n", "g", "a+b")),  # replaced characters
    (("default", "n", "g", "s" * 100 + "1"), ("default", "n", "g", "s" * 100 + "2")),  # cut
    (("default", "n", "g-h", "s"), ("default", "n", "g", "h-s")),  # where the dash falls
    (("one", "n", "g", "s"), ("two", "n", "g", "s")),  # instances
    # one DaemonSet, one instance label: two nodes' sessions of one id are two Pods
    (("default", "node-a", "g", "s"), ("default", "node-b", "g", "s")),
])
def test_pod_names_differ_per_session(a, b):
    assert pod_name(*a) != pod_name(*b)


@pytest.mark.parametrize("labels, notes, expected", [
    ({LABEL_GROUP: "g", LABEL_SESSION: "s"}, {"orchestrator.agent_group": "g",
                                              ANNOTATION_SESSION: "s"}, ("g", "s")),
    ({LABEL_GROUP: "g", LABEL_SESSION: label_value("a@b")},
     {"orchestrator.agent_group": "g", ANNOTATION_SESSION: "a@b"}, ("g", "a@b")),
    # an annotation edited to name another session does not match the label
    ({LABEL_GROUP: "g", LABEL_SESSION: "s"}, {"orchestrator.agent_group": "g",
                                              ANNOTATION_SESSION: "other"}, None),
    ({LABEL_GROUP: "g", LABEL_SESSION: "s"}, {}, None),
    ({}, {"orchestrator.agent_group": "g", ANNOTATION_SESSION: "s"}, None),
])
def test_ids_are_read_from_annotations_checked_against_labels(labels, notes, expected):
    assert ids_of({"labels": labels, "annotations": notes}) == expected


@pytest.mark.parametrize("session, labels", [
    (None, "orchestrator.instance=default"),
    ("s1", "orchestrator.instance=default,orchestrator.session=s1"),
    ("a@b", f"orchestrator.instance=default,orchestrator.session={label_value('a@b')}"),
])
def test_lists_and_watches_select_our_label_on_our_node(session, labels):
    label_sel, field_sel = pod_selectors("default", "node-a", session)
    assert selector_text(label_sel) == labels
    assert selector_text(field_sel) == "spec.nodeName=node-a"
    # what lightkube puts in the query is the same text
    assert build_selector(label_sel) == labels
    assert build_selector(field_sel, for_fields=True) == "spec.nodeName=node-a"


@pytest.mark.parametrize("labels, node, mine", [
    ({LABEL_INSTANCE: "default"}, "node-a", True),
    ({LABEL_INSTANCE: "default"}, "node-b", False),  # the orchestrator on node-b owns it
    ({LABEL_INSTANCE: "default"}, None, False),  # not bound to a node: nobody's to take
    ({LABEL_INSTANCE: "other"}, "node-a", False),  # another instance on our node
    ({}, "node-a", False),  # no label at all
])
def test_a_pod_is_ours_only_with_our_label_on_our_node(labels, node, mine):
    pod = {"metadata": {"name": "p", "labels": labels},
           "spec": {} if node is None else {"nodeName": node}}
    assert owned(pod, "default", "node-a") is mine


@pytest.mark.parametrize("configured, env, expected", [
    ("node-a", {"NODE_NAME": "node-b"}, "node-a"),
    ("", {"NODE_NAME": "node-b"}, "node-b"),
])
def test_the_node_is_the_config_else_node_name(configured, env, expected):
    assert spec.node_name(configured, env) == expected


def test_without_either_the_node_is_the_host_name():
    assert spec.node_name("", {}) == spec.socket.gethostname().lower()


@pytest.mark.parametrize("user, owner, expected", [
    ("auto", (1000, 1000), (1000, 1000)),
    ("auto", (0, 0), (FALLBACK_UID, FALLBACK_GID)),  # never root
    ("auto", (1000, 0), (1000, FALLBACK_GID)),
    ("2000:3000", (0, 0), (2000, 3000)),
    ("2000", (0, 0), (2000, 2000)),
    ("0:0", (1000, 1000), (FALLBACK_UID, FALLBACK_GID)),  # a Pod never as root (runAsNonRoot)
])
def test_the_agent_user(tmp_path, user, owner, expected):
    """The one rule of runtime.identity (Docker's too), then numeric and never 0."""
    import os

    if os.geteuid() != 0 and owner != (os.geteuid(), os.getegid()):
        pytest.skip("chown needs root")  # the rule itself is the same either way
    os.chown(tmp_path, *owner)
    assert spec.pod_user(*AgentIds(tmp_path, user, None).user_of("s")) == expected


def test_a_user_name_is_refused_in_one_line():
    with pytest.raises(RuntimeUnavailable, match=r"\[kubernetes\] user 'nobody': write 'auto'"):
        spec.pod_user("nobody", None, None)


@pytest.mark.parametrize("groups, expected", [
    ((), None),  # one uid for every agent: the group folder is that uid's
    ((200005,), [200005]),  # a uid per session: the group's gid, shared through the folder
])
def test_the_group_folder_gid_is_a_supplemental_group(tmp_path, groups, expected):
    k8s, session = _session(tmp_path)
    m = pod_manifest(k8s, session, node="n", uid=200001, gid=200001, folder=tmp_path,
                     group=(tmp_path / "g", False), groups=groups)
    assert m["spec"]["securityContext"].get("supplementalGroups") == expected
    assert m["spec"]["securityContext"]["runAsGroup"] == 200001


def _session(tmp_path: Path, **group: object) -> tuple[KubernetesConfig, SessionRef]:
    raw = {"runtime": {"kind": "kubernetes"}, "kubernetes": {"namespace": "agents"}}
    if group:
        raw["groups"] = {"support": dict(group)}
    cfg = load_config(raw, tmp_path)
    settings = resolve(cfg, "support")
    return settings.kubernetes, SessionRef("support", "user@x", tmp_path / "s", settings)


def test_the_manifest_is_least_privilege_by_default(tmp_path):
    k8s, session = _session(tmp_path)
    m = pod_manifest(k8s, session, node="localhost", uid=200001, gid=200001,
                     folder=tmp_path / "s", env={"MODEL": "small"})
    assert m["apiVersion"] == "v1" and m["kind"] == "Pod"
    meta, pod = m["metadata"], m["spec"]
    assert meta["namespace"] == "agents"
    assert meta["labels"][LABEL_INSTANCE] == "default"
    assert meta["labels"][LABEL_SESSION] == label_value("user@x")
    assert meta["labels"][LABEL_SETTINGS] == session.settings.digest
    assert meta["annotations"][ANNOTATION_SESSION] == "user@x"
    assert all(LABEL_OK.fullmatch(v) for v in meta["labels"].values())
    assert pod["nodeName"] == "localhost"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert not (pod["hostNetwork"] or pod["hostPID"] or pod["hostIPC"])
    assert "serviceAccountName" not in pod and "runtimeClassName" not in pod
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 200001,
                                      "runAsGroup": 200001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 200001, "runAsGroup": 200001, "privileged": False,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"HOME": "/tmp", "MODEL": "small", "ORCHESTRATOR_AGENT_GROUP": "support",
                   "ORCHESTRATOR_SESSION": "user@x"}
    mounts = {(v["mountPath"], v.get("subPath"), v.get("readOnly", False))
              for v in c["volumeMounts"]}
    assert mounts == {("/workspace", None, False), ("/tmp", None, False),
                      ("/workspace/inbound.db", "inbound.db", True)}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["hostPath"] == {"path": str(tmp_path / "s"),
                                                "type": "Directory"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": spec.TMP_SIZE}


def test_a_groups_kubernetes_settings_reach_its_pods(tmp_path):
    k8s, session = _session(
        tmp_path, image="support:2", command=["bot"], cpu_limit="2", memory_request="",
        node_selector={"pool": "agents"}, service_account="support-agent",
        runtime_class="gvisor",
        tolerations=[{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}])
    m = pod_manifest(k8s, session, node="n1", uid=5, gid=6, folder=tmp_path,
                     group=(tmp_path / "g", True), grace=7.4)
    pod = m["spec"]
    (c,) = pod["containers"]
    assert (c["image"], c["command"]) == ("support:2", ["bot"])
    assert c["resources"] == {"requests": {"cpu": "100m"},
                              "limits": {"cpu": "2", "memory": "512Mi"}}
    assert pod["nodeSelector"] == {"pool": "agents"}
    assert pod["tolerations"] == [{"effect": "NoSchedule", "key": "agents",
                                   "operator": "Exists"}]
    assert pod["serviceAccountName"] == "support-agent"
    assert pod["automountServiceAccountToken"] is False  # even with an account
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["terminationGracePeriodSeconds"] == 7
    group_mounts = [(v["mountPath"], v.get("subPath"), v.get("readOnly", False))
                    for v in c["volumeMounts"] if v["name"] == "group"]
    assert group_mounts == [("/workspace/agent", None, False),
                            ("/workspace/agent/container.json", "container.json", True)]


def test_the_session_folder_must_hold_a_regular_inbound_db(tmp_path):
    folder = tmp_path / "sessions" / "g" / "s"
    folder.mkdir(parents=True)
    with pytest.raises(spec.FolderRefused, match="does not exist"):
        spec.check_session_folder(folder, tmp_path)
    (tmp_path / "elsewhere").write_text("x")
    (folder / "inbound.db").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(spec.FolderRefused, match="not a regular file"):
        spec.check_session_folder(folder, tmp_path)
    with pytest.raises(spec.FolderRefused, match="not under data_dir"):
        spec.check_session_folder(tmp_path, tmp_path / "sessions")
