"""What a session's Pod looks like, as pure functions of the config.

No API calls happen here (only the folder checks and the group folder's mkdir/chown
touch the disk), so every rule is table-tested without a cluster:

- ``pod_name``: DNS-1123, at most 63 characters, unique per (instance, node, group,
  session): a sanitized prefix plus a hash of the exact ids;
- ``pod_selectors`` / ``owned``: which Pods are this orchestrator's. The orchestrator
  runs as a DaemonSet, one per node, all with the same instance label, so "ours" is
  our instance label AND ``spec.nodeName`` = our node: lists and watches carry both
  a label and a field selector, and nothing is adopted, reported or deleted that
  fails ``owned`` (an orchestrator on another node owns it);
- ``label_value`` / ``pod_labels`` / ``pod_annotations``: the same
  ``orchestrator.*`` keys as the Docker runtime. A Kubernetes label value is at most
  63 characters of ``[A-Za-z0-9_.-]`` with alphanumeric ends; an id that does not
  fit (``@``, ``+``, longer ids) is labelled by a hash and kept whole in an
  annotation, which is what the runtime reads back;
- ``pod_user``: the uid/gid the agent runs as (``runtime.identity``'s rule, shared
  with Docker; numeric and never root here);
- ``pod_manifest``: the Pod (least privilege by default: non-root, read-only root,
  all capabilities dropped, no privilege escalation, RuntimeDefault seccomp, no
  service-account token, no host namespaces, ``restartPolicy: Never``), pinned to
  this orchestrator's node, the session folder a ``hostPath`` at /workspace with
  its ``inbound.db`` again read-only on top (``subPath``).

Only fields that exist in Kubernetes 1.20 are used (``seccompProfile`` is 1.19+).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

from orchestrator.config.groups import read_env
from orchestrator.config.mounts import WORKSPACE, is_under
from orchestrator.config.sections import KubernetesConfig
from orchestrator.contract import layout
from orchestrator.host.uids import give_folder
from orchestrator.runtime.base import RuntimeUnavailable, SessionRef
from orchestrator.runtime.identity import (
    AGENT_DIR,
    FALLBACK_GID,
    FALLBACK_UID,
    AgentIds,
    FolderRefused,
    group_folder,
    prepare_group_folder,
)

LABEL_INSTANCE = "orchestrator.instance"
LABEL_GROUP = "orchestrator.agent_group"
LABEL_SESSION = "orchestrator.session"
LABEL_SETTINGS = "orchestrator.settings"  # short hash of the group settings it runs with
# The exact ids, whatever their characters (labels may hold a hash instead).
ANNOTATION_GROUP = "orchestrator.agent_group"
ANNOTATION_SESSION = "orchestrator.session"

CONTAINER = "agent"
TMP_SIZE = "64Mi"

_LABEL_OK = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_DNS_BAD = re.compile(r"[^a-z0-9-]+")


def _digest(*parts: str, size: int = 10) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:size]


def label_value(value: str) -> str:
    """``value`` itself when Kubernetes accepts it as a label value, else ``h-`` plus a
    hash of it (the exact value then lives in an annotation)."""
    if _LABEL_OK.fullmatch(value):
        return value
    return "h-" + _digest(value, size=32)


def pod_name(instance: str, node: str, agent_group: str, session_id: str) -> str:
    """``orch-<instance>-<group>-<session>`` lower-cased, other characters as ``-``,
    cut to fit 63 with a hash of the exact ids and the node at the end (always: ids
    that differ only in case or in a replaced character must not share a Pod, nor
    may two nodes' sessions of the same id: every node has its own data dir)."""
    raw = f"orch-{instance}-{agent_group}-{session_id}".lower()
    stem = _DNS_BAD.sub("-", raw).strip("-")[:52].rstrip("-")
    return f"{stem}-{_digest(instance, agent_group, session_id, node)}"


NODE_FIELD = "spec.nodeName"


def pod_selectors(instance: str, node: str, session_id: str | None = None
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """(label selector, field selector) of this orchestrator's Pods, or of one
    session's: our instance label (and the session's) on our node only."""
    labels = {LABEL_INSTANCE: instance}
    if session_id is not None:
        labels[LABEL_SESSION] = label_value(session_id)
    return labels, {NODE_FIELD: node}


def selector_text(selector: dict[str, str]) -> str:
    """A selector as the API's query parameter holds it (``k=v,k2=v2``): for logs."""
    return ",".join(f"{key}={value}" for key, value in selector.items())


def owned(pod: dict[str, Any], instance: str, node: str) -> bool:
    """Whether ``pod`` is this orchestrator's: our instance label and pinned to our
    node. A Pod of another node's orchestrator (same label) is never ours to adopt,
    report or delete; neither is one without ``spec.nodeName``."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return (labels.get(LABEL_INSTANCE) == instance
            and (pod.get("spec") or {}).get("nodeName") == node)


def pod_labels(instance: str, agent_group: str, session_id: str,
               digest: str | None = None) -> dict[str, str]:
    labels = {LABEL_INSTANCE: instance, LABEL_GROUP: label_value(agent_group),
              LABEL_SESSION: label_value(session_id)}
    if digest is not None:
        labels[LABEL_SETTINGS] = label_value(digest)
    return labels


def pod_annotations(agent_group: str, session_id: str) -> dict[str, str]:
    return {ANNOTATION_GROUP: agent_group, ANNOTATION_SESSION: session_id}


def ids_of(metadata: dict[str, Any]) -> tuple[str, str] | None:
    """(agent group, session id) of a Pod of ours from its annotations, checked
    against its labels (so a Pod whose annotation was edited by hand to name another
    session is not taken for that session); None when they disagree or are missing."""
    labels = metadata.get("labels") or {}
    notes = metadata.get("annotations") or {}
    group, session = notes.get(ANNOTATION_GROUP), notes.get(ANNOTATION_SESSION)
    if not isinstance(group, str) or not isinstance(session, str):
        return None
    if (labels.get(LABEL_GROUP) != label_value(group)
            or labels.get(LABEL_SESSION) != label_value(session)):
        return None
    return group, session


def node_name(configured: str, environ: dict[str, str] | None = None) -> str:
    """The node agent Pods are pinned to: the config, else ``NODE_NAME`` (the
    DaemonSet sets it from ``spec.nodeName``), else this host's name."""
    env = os.environ if environ is None else environ
    return configured or env.get("NODE_NAME", "") or socket.gethostname().lower()


def pod_user(user: str, uid: int | None, gid: int | None) -> tuple[int, int]:
    """``runAsUser`` / ``runAsGroup`` from ``identity.AgentIds.user_of``: numeric (a
    Pod takes no user names) and never 0 (``runAsNonRoot``: root becomes 10001)."""
    if uid is None or gid is None:
        raise RuntimeUnavailable(f"[kubernetes] user {user!r}: write 'auto' or 'UID:GID' "
                                 "(a Pod runs as numeric ids)")
    return (uid or FALLBACK_UID), (gid or FALLBACK_GID)


def check_session_folder(folder: Path, data_dir: Path) -> Path:
    """The session folder, resolved; it must lie under ``data_dir`` and hold a regular
    ``inbound.db`` (a symlink is refused, not followed)."""
    real = folder.resolve()
    if not is_under(real, data_dir.resolve()):
        raise FolderRefused(f"session folder {folder} is not under data_dir {data_dir}")
    inbound = real / layout.INBOUND_DB
    try:
        st = inbound.lstat()
    except FileNotFoundError:
        raise FolderRefused(f"{inbound} does not exist: create the session (inbound.db) "
                            "before starting it") from None
    if not stat.S_ISREG(st.st_mode):
        raise FolderRefused(f"{inbound} is not a regular file (symlinks are not followed)")
    return real


def resources(cfg: KubernetesConfig) -> dict[str, dict[str, str]]:
    """requests/limits from the four quantities; an empty one is left out."""
    out: dict[str, dict[str, str]] = {}
    for part, cpu, memory in (("requests", cfg.cpu_request, cfg.memory_request),
                              ("limits", cfg.cpu_limit, cfg.memory_limit)):
        values = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
        if values:
            out[part] = values
    return out


def pod_manifest(cfg: KubernetesConfig, session: SessionRef, *, node: str, uid: int, gid: int,
                 folder: Path, group: tuple[Path, bool] | None = None,
                 env: dict[str, str] | None = None, grace: float = 10.0,
                 groups: tuple[int, ...] = ()) -> dict[str, Any]:
    """The Pod for ``session``. ``cfg`` is the group's effective [kubernetes] settings,
    ``folder`` the resolved session folder, ``group`` the group folder and whether a
    ``container.json`` is in it, ``env`` the group's variables (secrets included: the
    manifest is never logged), ``groups`` supplementary gids (the group folder's)."""
    digest = session.settings.digest if session.settings is not None else None
    workspace_mounts: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": WORKSPACE},
        {"name": "workspace", "mountPath": f"{WORKSPACE}/{layout.INBOUND_DB}",
         "subPath": layout.INBOUND_DB, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "hostPath": {"path": str(folder), "type": "Directory"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
    ]
    if group is not None:
        path, has_settings = group
        target = f"{WORKSPACE}/{AGENT_DIR}"
        workspace_mounts.append({"name": "group", "mountPath": target})
        if has_settings:
            workspace_mounts.append({"name": "group", "mountPath": f"{target}/container.json",
                                     "subPath": "container.json", "readOnly": True})
        volumes.append({"name": "group", "hostPath": {"path": str(path), "type": "Directory"}})
    variables = {"HOME": "/tmp", **(env or {}), "ORCHESTRATOR_AGENT_GROUP": session.agent_group,
                 "ORCHESTRATOR_SESSION": session.session_id}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": list(cfg.command),
        "workingDir": WORKSPACE,
        "env": [{"name": k, "value": v} for k, v in variables.items()],
        "volumeMounts": workspace_mounts,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}},
    }
    res = resources(cfg)
    if res:
        container["resources"] = res
    spec: dict[str, Any] = {
        "nodeName": node,
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "hostNetwork": False, "hostPID": False, "hostIPC": False,
        "terminationGracePeriodSeconds": max(0, int(round(grace))),
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid,
                            "seccompProfile": {"type": "RuntimeDefault"},
                            **({"supplementalGroups": list(groups)} if groups else {})},
        "containers": [container],
        "volumes": volumes,
    }
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    if cfg.runtime_class:
        spec["runtimeClassName"] = cfg.runtime_class
    if cfg.node_selector:
        spec["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        spec["tolerations"] = [dict(t) for t in cfg.tolerations]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name(cfg.instance, node, session.agent_group, session.session_id),
            "namespace": cfg.namespace,
            "labels": pod_labels(cfg.instance, session.agent_group, session.session_id, digest),
            "annotations": pod_annotations(session.agent_group, session.session_id),
        },
        "spec": spec,
    }


def prepare_pod(cfg: KubernetesConfig, session: SessionRef, data_dir: Path, *, node: str,
                ids: AgentIds, grace: float) -> dict[str, Any]:
    """The I/O edge of a start: the agent's ids (``identity``: the session's own uid or
    the one for all), check the session folder, give its writable parts to that uid
    (root only), prepare the group folder (``identity``'s rule: with a uid per session
    it is root:<the group's gid> 02770 and every Pod of the group carries that gid in
    ``supplementalGroups``), read the secret files; then the manifest."""
    uid, gid = pod_user(*ids.user_of(session.session_id))
    folder = check_session_folder(Path(session.folder), data_dir)
    give_folder(folder, uid, gid)
    group = None
    where = group_folder(cfg.group_folder, data_dir, session.agent_group, "kubernetes")
    if where is not None:
        owner = ids.group_owner(session.agent_group, uid, gid)
        group = prepare_group_folder(where, folder, data_dir, (), *owner)
    env = read_env(session.settings) if session.settings is not None else {}
    return pod_manifest(cfg, session, node=node, uid=uid, gid=gid, folder=folder, group=group,
                        env=env, grace=grace,
                        groups=ids.shared_gids(session.agent_group, where is not None))
