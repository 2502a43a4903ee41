"""Where things live in a data dir, and the reverse: what a changed path means.

Everything here is pure path arithmetic (no I/O), so the watcher can classify
thousands of paths per batch cheaply and tests need no filesystem at all.

    <data_dir>/orchestrator.db                               registry (host only)
    <data_dir>/sessions/<agent_group>/<session>/inbound.db   host writes
    <data_dir>/sessions/<agent_group>/<session>/outbound.db  agent writes
    <data_dir>/sessions/<agent_group>/<session>/.heartbeat
    <data_dir>/sessions/<agent_group>/<session>/inbox/<message_id>/<file>
    <data_dir>/sessions/<agent_group>/<session>/outbox/<message_id>/<file>
    <data_dir>/delivered/<message_id>/<file>                 files handed to a channel

This module is stdlib-only on purpose: the reference agent imports it inside a
container that has nothing but python3. It is also on the agent's cold start
path, so it imports nothing the agent would not load anyway (``re``, ``enum`` and
``collections`` come with ``json`` and ``signal``): no ``dataclasses`` (its
``inspect`` import alone is ~6 ms of every agent start), no ``pathlib``. The two
records are named tuples instead; paths are whatever the caller passes in.
"""

from __future__ import annotations

import enum
import os
import re
from collections import namedtuple

TYPE_CHECKING = False  # typing / pathlib only for the type checker: see below
if TYPE_CHECKING:
    from pathlib import Path, PurePath

SESSIONS_DIR = "sessions"
REGISTRY_DB = "orchestrator.db"
DELIVERED_DIR = "delivered"

INBOUND_DB = "inbound.db"
OUTBOUND_DB = "outbound.db"
HEARTBEAT = ".heartbeat"
INBOX = "inbox"
OUTBOX = "outbox"
PID_FILE = ".agent.pid"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


class InvalidId(ValueError):
    """An agent group, session or message id that cannot safely be a path component."""


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is safe as one path component, else raise InvalidId.

    Ids become folder names, so they must not contain separators, ``..``,
    control characters or start with a dot (hidden / relative names).
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidId(
            f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ @ + -, "
            "starting with a letter or digit, without '..'"
        )
    return value


class Kind(enum.Enum):
    """What a path under the sessions root is, as far as the supervisor cares."""

    HEARTBEAT = "heartbeat"
    OUTBOUND_DB = "outbound_db"
    OUTBOX = "outbox"
    INBOUND_DB = "inbound_db"
    INBOX = "inbox"
    SESSION = "session"  # the session folder itself
    GROUP = "group"  # an agent group folder
    OTHER = "other"


class PathInfo(namedtuple("PathInfo", "agent_group session_id kind message_id",
                          defaults=(None,))):
    """(agent group, session id or None, Kind, message id for inbox/outbox entries)."""

    __slots__ = ()
    agent_group: str
    session_id: str | None
    kind: Kind
    message_id: str | None


def sessions_root(data_dir: Path) -> Path:
    return data_dir / SESSIONS_DIR


def registry_path(data_dir: Path) -> Path:
    return data_dir / REGISTRY_DB


def delivered_root(data_dir: Path) -> Path:
    return data_dir / DELIVERED_DIR


class SessionPaths(namedtuple("SessionPaths", "root")):
    """The fixed file names inside one session folder (``root``: a Path)."""

    __slots__ = ()
    root: Path

    @property
    def inbound_db(self) -> Path:
        return self.root / INBOUND_DB

    @property
    def outbound_db(self) -> Path:
        return self.root / OUTBOUND_DB

    @property
    def heartbeat(self) -> Path:
        return self.root / HEARTBEAT

    @property
    def inbox(self) -> Path:
        return self.root / INBOX

    @property
    def outbox(self) -> Path:
        return self.root / OUTBOX

    @property
    def pid_file(self) -> Path:
        return self.root / PID_FILE

    def inbox_dir(self, message_id: str) -> Path:
        return self.inbox / validate_id(message_id, "message id")

    def outbox_dir(self, message_id: str) -> Path:
        return self.outbox / validate_id(message_id, "message id")


def session_dir(data_dir: Path, agent_group: str, session_id: str) -> Path:
    return (
        sessions_root(data_dir)
        / validate_id(agent_group, "agent group")
        / validate_id(session_id, "session id")
    )


def session_paths(data_dir: Path, agent_group: str, session_id: str) -> SessionPaths:
    return SessionPaths(session_dir(data_dir, agent_group, session_id))


_FILE_KINDS = {
    HEARTBEAT: Kind.HEARTBEAT,
    OUTBOUND_DB: Kind.OUTBOUND_DB,
    INBOUND_DB: Kind.INBOUND_DB,
    OUTBOX: Kind.OUTBOX,
    INBOX: Kind.INBOX,
}


def classify(root: PurePath | str, path: PurePath | str) -> PathInfo | None:
    """Map a path under the sessions ``root`` to (agent group, session, kind).

    Returns None for paths outside the root, the root itself, or components
    that are not valid ids (a stray ``.DS_Store`` is not an agent group).
    SQLite's ``-journal`` side files count as OTHER: a commit also reports the
    ``.db`` itself as modified, which is the event that matters.
    """
    # plain string work: the watcher classifies every heartbeat, and pathlib's
    # relative_to was the largest part of that cost
    prefix = os.path.normpath(os.fspath(root))
    full = os.path.normpath(os.fspath(path))
    if not full.startswith(prefix) or full[len(prefix):len(prefix) + 1] not in ("/", ""):
        return None
    parts = [p for p in full[len(prefix):].split("/") if p]
    if not parts or not _ID_RE.fullmatch(parts[0]):
        return None
    group = parts[0]
    if len(parts) == 1:
        return PathInfo(group, None, Kind.GROUP)
    if not _ID_RE.fullmatch(parts[1]):
        return None
    session = parts[1]
    if len(parts) == 2:
        return PathInfo(group, session, Kind.SESSION)
    kind = _FILE_KINDS.get(parts[2], Kind.OTHER)
    message_id = None
    if kind in (Kind.INBOX, Kind.OUTBOX):
        if len(parts) >= 4:
            message_id = parts[3]
    elif len(parts) > 3:
        kind = Kind.OTHER
    return PathInfo(group, session, kind, message_id)
