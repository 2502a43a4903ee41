"""Who an agent runs as, and how its group's folder is shared: one rule for every
container runtime (Docker and Kubernetes say it in their own words, not their own way).

    AgentIds(data_dir, user, uid_range)   ``[docker|kubernetes] user`` + ``[runtime] uid_range``
      .user_of(session_id)          -> (user text, uid, gid)
      .shared_gids(group, folder?)  -> supplementary gids: the group folder's gid
      .group_owner(group, uid, gid) -> (uid, gid, mode) the group folder is given
    resolve_user(user, data_dir)    the one uid every agent runs as (no uid range)
    group_folder(template, ...)     the group folder's path from its template
    prepare_group_folder(...)       create and check it, give it away, make the mount point

**One uid for every agent** (``user = "auto"`` without root or without a range, or
``UID[:GID]``): ``auto`` is the owner of ``data_dir``, so what the agent writes
belongs to the same account as the rest of the data; a root owner (or group) is
replaced by the fixed unprivileged 10001. The group folder is then that uid's.

**A uid per session** (root, ``[runtime] uid_range``, ``user = "auto"``:
``host.uids``): sessions must not share a uid, so a group's shared folder cannot be
one session's. The group gets a gid of its own from the same range
(``SessionUids.group_gid``), the folder is ``root:<gid>`` mode 02770 (setgid: what
an agent makes there takes the group), and every agent of the group carries that gid
as a supplementary group: Docker's ``group_add``, Kubernetes'
``securityContext.supplementalGroups``.

The group folder (``{data_dir}`` and ``{group}`` filled in; relative = under
``data_dir``) must lie under ``data_dir`` (or an allowed root the runtime names) and
outside ``sessions/``, which agents write. It is mounted at ``/workspace/agent`` with
its ``container.json`` read-only on top when that is a regular file (NanoClaw-built
images read it); the mount point in the session folder is made a plain folder first,
since the agent may have put anything there.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from orchestrator.config.mounts import MountNotAllowed, is_under
from orchestrator.contract import layout
from orchestrator.host.uids import SessionUids, open_uids
from orchestrator.runtime.base import RuntimeUnavailable

# Used when the data dir belongs to root: agents never run as root.
FALLBACK_UID = 10001
FALLBACK_GID = 10001
SHARED_MODE = 0o2770  # a group folder shared through the group's gid (setgid)
AGENT_DIR = "agent"  # the group folder's mount point: /workspace/agent


class FolderRefused(RuntimeUnavailable, MountNotAllowed):
    """A session or group folder that cannot be given to an agent (not under
    data_dir, under sessions/, a bad template): the start fails like any runtime
    outage, the work stays pending."""


def resolve_user(user: str, data_dir: Path) -> tuple[str, int | None, int | None]:
    """(user text ``uid:gid`` or a name, uid, gid); uid/gid None when given by name.
    ``auto`` = the owner of ``data_dir``, root replaced by ``FALLBACK_UID:FALLBACK_GID``
    (a root group by ``FALLBACK_GID``)."""
    if user == "auto":
        st = data_dir.stat()
        uid, gid = st.st_uid, st.st_gid
        if uid == 0:
            uid, gid = FALLBACK_UID, FALLBACK_GID
        elif gid == 0:
            gid = FALLBACK_GID
        return f"{uid}:{gid}", uid, gid
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if match:
        uid = int(match.group(1))
        gid = int(match.group(2)) if match.group(2) is not None else uid
        return f"{uid}:{gid}", uid, gid
    return user, None, None


class AgentIds:
    """The ids of a runtime's agents: one uid for all, or one per session (then the
    registry's ``SessionUids``, which ``close`` releases)."""

    def __init__(self, data_dir: Path, user: str, uid_range: tuple[int, int] | None) -> None:
        self.data_dir = Path(data_dir)
        self.user = user
        self.uids: SessionUids | None = open_uids(self.data_dir,
                                                  uid_range if user == "auto" else None)

    @property
    def per_session(self) -> bool:
        return self.uids is not None

    def user_of(self, session_id: str) -> tuple[str, int | None, int | None]:
        """(user text, uid, gid): the session's own uid (gid the same number), else
        the one every agent runs as (``resolve_user``)."""
        if self.uids is None:
            return resolve_user(self.user, self.data_dir)
        uid = self.uids.uid_for(session_id)
        return f"{uid}:{uid}", uid, uid

    def shared_gids(self, agent_group: str, group_folder: bool) -> tuple[int, ...]:
        """Supplementary gids of the group's agents: the gid its folder is shared
        through, when every session has its own uid and the group has a folder."""
        if self.uids is None or not group_folder:
            return ()
        return (self.uids.group_gid(agent_group),)

    def group_owner(self, agent_group: str, uid: int | None, gid: int | None
                    ) -> tuple[int | None, int | None, int | None]:
        """(uid, gid, mode) the group folder is given: ``root:<group gid>`` 02770 with a
        uid per session, else the agents' one uid:gid (mode left alone)."""
        if self.uids is None:
            return uid, gid, None
        return os.geteuid(), self.uids.group_gid(agent_group), SHARED_MODE

    def close(self) -> None:
        if self.uids is not None:
            self.uids.close()


def group_folder(template: str, data_dir: Path, agent_group: str,
                 section: str = "docker") -> Path | None:
    """The host folder ``[<section>] group_folder`` names for a group (None: none)."""
    if not template:
        return None
    layout.validate_id(agent_group, "agent group")
    try:
        text = template.format(data_dir=str(data_dir), group=agent_group)
    except (KeyError, IndexError, ValueError) as exc:
        raise FolderRefused(f"[{section}] group_folder {template!r}: only {{data_dir}} and "
                            f"{{group}} may be filled in ({exc})") from None
    path = Path(text).expanduser()
    return path if path.is_absolute() else data_dir / path


def prepare_group_folder(folder: Path, session_folder: Path, data_dir: Path,
                         allowed: tuple[str, ...] = (), uid: int | None = None,
                         gid: int | None = None, mode: int | None = None,
                         allowed_key: str = "") -> tuple[Path, bool]:
    """Create the group folder, check where it lies (under ``data_dir`` or an
    ``allowed`` root, named ``allowed_key`` in the error; never under sessions/), give
    it to ``uid``:``gid`` (and ``mode``) when we may chown, make the mount point
    ``agent/`` in the session folder a plain folder. Returns (the resolved folder,
    whether a regular ``container.json`` is in it: symlinks are not followed)."""
    folder.mkdir(parents=True, exist_ok=True)
    real = folder.resolve()
    roots = [data_dir.resolve()] + [Path(a).expanduser().resolve() for a in allowed]
    if not any(is_under(real, root) for root in roots) or is_under(
            real, layout.sessions_root(data_dir).resolve()):
        where = f"data_dir or {allowed_key}," if allowed_key else "data_dir"
        raise FolderRefused(f"group folder {real} must be under {where} and not under "
                            "sessions/")
    if uid is not None and gid is not None and os.geteuid() == 0:
        st = real.stat()
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(real, uid, gid)
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(real, mode)
    point = Path(session_folder) / AGENT_DIR
    try:
        if not stat.S_ISDIR(point.lstat().st_mode):
            point.unlink()
            point.mkdir()
    except FileNotFoundError:
        point.mkdir()
    try:
        has_settings = stat.S_ISREG((real / "container.json").lstat().st_mode)
    except FileNotFoundError:
        has_settings = False
    return real, has_settings
