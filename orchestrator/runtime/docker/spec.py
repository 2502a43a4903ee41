"""What a session's container looks like, as pure functions of the config.

No Docker calls happen here (only the folder checks and ``prepare_folder``'s
chown touch the disk), so every rule is tested without an engine:

- ``container_name`` / ``container_labels``: ``orch-<instance>-<group>-<session>``
  and the three ``orchestrator.*`` labels that mark the containers we own;
- ``session_mounts`` (the session folder rw at /workspace, its inbound.db ro on
  top) and ``parse_extra_mounts`` (``[docker] mounts``, only from under
  ``allowed_mounts``: the checks are ``config.mounts``', shared with ``preflight``);
- ``prepare_folder``: the parts of the folder the agent is given (which uid it runs
  as, and the group folder's rule, are ``runtime.identity``'s, shared with Kubernetes);
- ``container_spec`` / ``host_config_kwargs``: the create and host-config
  arguments (least privilege: cap_drop, no-new-privileges, read-only root, limits);
- ``exit_reason``: exited | killed | oom | stopped from what Docker reported.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any

from docker.types import Mount

from orchestrator.config.mounts import (
    WORKSPACE,
    MountNotAllowed,
    extra_mounts,
    is_under,
)
from orchestrator.config.sections import DockerConfig
from orchestrator.contract import layout
from orchestrator.host.uids import give_folder
from orchestrator.rules.egress import CA_MOUNT
from orchestrator.runtime.base import RuntimeUnavailable, SessionRef
from orchestrator.runtime.identity import (  # noqa: F401 - FALLBACK_*, group_folder and
    AGENT_DIR,  # resolve_user are this module's names too (callers, tests)
    FALLBACK_GID,
    FALLBACK_UID,
    FolderRefused,
    group_folder,
    prepare_group_folder,
    resolve_user,
)

LABEL_INSTANCE = "orchestrator.instance"
LABEL_GROUP = "orchestrator.agent_group"
LABEL_SESSION = "orchestrator.session"
LABEL_SETTINGS = "orchestrator.settings"  # short hash of the group settings it runs with
# set by Dockerfile.agent: the agent's __main__.py inside the image (see ``quick_command``)
LABEL_AGENT_MAIN = "orchestrator.agent-main"
REFERENCE_COMMAND = ("python3", "-m", "orchestrator.agent")

TMPFS_OPTIONS = "rw,nosuid,nodev,size=64m"
ALIVE_STATES = frozenset({"running", "paused", "restarting"})
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")


# A mount (extra, group or session folder) the config does not allow, found as an
# agent starts: a ``MountNotAllowed`` that fails the start like any runtime outage
# (the work stays pending). One class with the Kubernetes runtime's refusals.
MountRefused = FolderRefused


def container_name(instance: str, agent_group: str, session_id: str) -> str:
    raw = f"orch-{instance}-{agent_group}-{session_id}"
    name = _NAME_BAD.sub("_", raw)
    if name != raw:
        name += "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return name


def container_labels(instance: str, agent_group: str, session_id: str) -> dict[str, str]:
    return {LABEL_INSTANCE: instance, LABEL_GROUP: agent_group, LABEL_SESSION: session_id}


def parse_extra_mounts(config: DockerConfig) -> list[Mount]:
    """``[docker] mounts`` as docker Mounts: the records ``config.mounts.extra_mounts``
    checked (each host path under an allowed root, symlinks resolved, nothing at
    /workspace); a refused one raises ``MountRefused`` with its one-line message."""
    try:
        checked = extra_mounts(config)
    except MountNotAllowed as exc:
        raise MountRefused(str(exc)) from None
    return [Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
            for m in checked]


def prepare_folder(folder: Path, uid: int | None, gid: int | None) -> list[Path]:
    """Give the agent's uid the parts of the folder it must write; return what changed.

    Only when this process may chown (root) and ids are numeric (``uids.give_folder``):
    the session folder itself (0700; SQLite creates ``outbound.db-journal`` next to
    the db), ``outbound.db``, ``.heartbeat`` and ``outbox/`` with everything in it.
    ``inbound.db`` and ``inbox/`` stay host-owned, readable by the agent's gid only
    (the agent only reads them). Symlinks are never followed.
    """
    if uid is None or gid is None or os.geteuid() != 0:
        return []
    return give_folder(folder, uid, gid)


def exit_reason(exit_code: int | None, *, stopping: bool = False, killing: bool = False,
                oom: bool = False, kill_signal: str | None = None) -> str:
    """exited | killed | oom | stopped, from what we asked for and what Docker saw."""
    if stopping:
        return "stopped"
    if killing:
        return "killed"
    if oom:
        return "oom"
    if kill_signal is not None:
        sig = kill_signal.upper().removeprefix("SIG")
        if sig in ("9", "KILL"):
            return "killed"
        if sig in ("15", "TERM", "2", "INT"):
            return "stopped"
    if exit_code == 137:
        return "killed"
    return "exited"


def session_mounts(folder: Path, data_dir: Path) -> list[Mount]:
    """The session folder (rw) at /workspace and its inbound.db again, read-only, on top.

    The folder must resolve to a place under ``data_dir``, and inbound.db must be a
    regular file (a symlink is refused, not followed).
    """
    data_dir = data_dir.resolve()
    real = folder.resolve()
    if not is_under(real, data_dir):
        raise MountRefused(f"session folder {folder} is not under data_dir {data_dir}")
    inbound = real / layout.INBOUND_DB
    try:
        st = inbound.lstat()
    except FileNotFoundError:
        raise RuntimeUnavailable(
            f"{inbound} does not exist: create the session (inbound.db) before starting it"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise MountRefused(f"{inbound} is not a regular file (symlinks are not followed)")
    return [
        Mount(target=WORKSPACE, source=str(real), type="bind", read_only=False),
        Mount(target=f"{WORKSPACE}/{layout.INBOUND_DB}", source=str(inbound), type="bind",
              read_only=True),
    ]


def group_mounts(folder: Path | None, session_folder: Path, data_dir: Path,
                 allowed_mounts: tuple[str, ...] = (), uid: int | None = None,
                 gid: int | None = None, mode: int | None = None) -> list[Mount]:
    """A group's folder read-write at ``/workspace/agent`` and its ``container.json``
    read-only on top, as NanoClaw's host mounts them, so NanoClaw-built images find
    their settings. Every session of the group shares the folder; where it may lie and
    whose it is are ``identity.prepare_group_folder``'s (shared with Kubernetes), with
    ``[docker] allowed_mounts`` roots allowed besides ``data_dir``.
    """
    if folder is None:
        return []
    real, has_settings = prepare_group_folder(folder, session_folder, data_dir,
                                              allowed_mounts, uid, gid, mode,
                                              allowed_key="[docker] allowed_mounts")
    target = f"{WORKSPACE}/{AGENT_DIR}"
    mounts = [Mount(target=target, source=str(real), type="bind", read_only=False)]
    if has_settings:
        mounts.append(Mount(target=f"{target}/container.json",
                            source=str(real / "container.json"), type="bind", read_only=True))
    return mounts


def quick_command(command: tuple[str, ...] | list[str],
                  image_labels: dict[str, str] | None) -> list[str]:
    """The container command, with the reference agent started the quick way.

    ``python3 -m orchestrator.agent ARGS`` in an image that names its agent's
    ``__main__.py`` (label ``orchestrator.agent-main``, set by Dockerfile.agent)
    becomes ``python3 -S -P <that file> ARGS``: no ``site`` (Debian's python3 scans
    its dist-packages and .pth files) and no ``runpy``, ~25 ms of every container's
    cold start measured in the agent image; ``-P`` keeps /workspace, which the agent
    writes, off ``sys.path``. Any other command, or an image without the label (or
    with a label that is not an absolute ``__main__.py`` path), is left as it is.
    """
    main = (image_labels or {}).get(LABEL_AGENT_MAIN, "")
    if (tuple(command[:3]) != REFERENCE_COMMAND or not main.startswith("/")
            or not main.endswith("/__main__.py") or "\0" in main):
        return list(command)
    return ["python3", "-S", "-P", main, *command[3:]]


def container_spec(cfg: DockerConfig, session: SessionRef, user: str,
                   env: dict[str, str] | None = None,
                   image_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Arguments for ``APIClient.create_container`` minus host_config.

    ``cfg`` is the group's effective DockerConfig (``session.settings.docker``),
    ``env`` its variables (secrets included: the spec is never logged),
    ``image_labels`` the image's own (``quick_command``).
    """
    labels = container_labels(cfg.instance, session.agent_group, session.session_id)
    if session.settings is not None:
        labels[LABEL_SETTINGS] = session.settings.digest
    return {
        "image": cfg.image,
        "command": quick_command(cfg.command, image_labels),
        "name": container_name(cfg.instance, session.agent_group, session.session_id),
        "labels": labels,
        "user": user,
        "working_dir": WORKSPACE,
        "environment": {
            "HOME": "/tmp",
            **(env or {}),
            "ORCHESTRATOR_AGENT_GROUP": session.agent_group,
            "ORCHESTRATOR_SESSION": session.session_id,
        },
    }


def host_config_kwargs(cfg: DockerConfig, mounts: list[Mount],
                       group_add: tuple[int, ...] = ()) -> dict[str, Any]:
    """Arguments for ``APIClient.create_host_config``: mounts, limits, least privilege;
    ``group_add``: supplementary gids (the group folder's shared gid)."""
    extra = {"group_add": [str(g) for g in group_add]} if group_add else {}
    return {
        **extra,
        "mounts": mounts,
        "network_mode": cfg.network,
        "cap_drop": list(cfg.cap_drop),
        "security_opt": ["no-new-privileges=true"] if cfg.no_new_privileges else [],
        "read_only": cfg.read_only_rootfs,
        "tmpfs": {"/tmp": TMPFS_OPTIONS},
        "mem_limit": cfg.memory,
        "nano_cpus": int(round(cfg.cpus * 1e9)),
        "pids_limit": cfg.pids_limit,
        "init": True,
        "auto_remove": False,
    }


def egress_mounts(session: SessionRef) -> list[Mount]:
    """The egress gateway's CA bundle (system CAs + the orchestrator's), read-only at
    ``CA_MOUNT``, for an agent of a group with egress (README, Egress gateway)."""
    if session.egress is None or not session.egress.ca_file:
        return []
    return [Mount(target=CA_MOUNT, source=session.egress.ca_file, type="bind", read_only=True)]
