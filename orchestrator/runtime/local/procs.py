"""Which local processes are our agents: read from /proc, never from the session folder.

A session folder is its agent's to write, so nothing there may decide which process
the host adopts (and later signals): a pid file an agent wrote could name any process
of the host's user. Instead each agent is started with ``ORCHESTRATOR_AGENT`` =
``<group>/<session>@<data dir>`` in its environment, and after a restart the host
adopts exactly the process-group leaders whose ``/proc/<pid>/environ`` carries the
marker of one of its sessions. That also covers an agent whose pid file was never
written (the host SIGKILLed between the spawn and the write): it is found and
adopted, not doubled by a second agent for the same session.

A marker alone is not enough, because the agent knows it: an agent's child that
calls ``setsid`` and sets *another* session's marker would be adopted as that
session's agent after a restart and hold it up. So each start also carries a fresh
random token (``ORCHESTRATOR_AGENT_TOKEN``), recorded by the host *before* the spawn
in a private file outside ``sessions/`` (``<data dir>/local-agents/<group>/<session>``,
0600); a process is adopted only when its token is the one recorded for the session
it names. Recording first keeps the crash window closed: a host killed between the
record and the spawn finds a record and no process, and simply starts again.

The pid file (``.agent.pid``: pid and the kernel's start time) is still written,
for people and tools looking at a folder, by descriptor and without following a
link; it is only ever read to be removed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from loguru import logger

from orchestrator.contract.layout import PID_FILE, InvalidId, validate_id
from orchestrator.host.private import FILE_MODE, make_dirs
from orchestrator.host.safefs import SessionDir

MARKER = "ORCHESTRATOR_AGENT"
TOKEN = "ORCHESTRATOR_AGENT_TOKEN"
_MARKER_PREFIX = MARKER.encode() + b"="
_TOKEN_PREFIX = TOKEN.encode() + b"="
RECORDS_DIR = "local-agents"


def marker(data_dir: os.PathLike[str] | str, agent_group: str, session_id: str) -> str:
    return f"{agent_group}/{session_id}@{os.path.abspath(data_dir)}"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if gone."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 and fields[0] != "Z" else None


def process_stopped(pid: int) -> bool:
    """Whether the process is in state T (stopped by a signal)."""
    fields = _stat_fields(pid)
    return bool(fields and fields[0] == "T")


def process_marker(pid: int) -> tuple[str, str] | None:
    """The ``ORCHESTRATOR_AGENT`` value and token a process was started with, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read()
    except OSError:
        return None
    value = token = None
    for item in env.split(b"\0"):
        if item.startswith(_MARKER_PREFIX):
            value = item[len(_MARKER_PREFIX):].decode("utf-8", "replace")
        elif item.startswith(_TOKEN_PREFIX):
            token = item[len(_TOKEN_PREFIX):].decode("ascii", "replace")
    return (value, token or "") if value is not None else None


class StartRecords:
    """The host's own record of each local agent start: the token it was given.

    Files under ``<data dir>/local-agents/`` (0700 folders, 0600 files), outside every
    session folder: an agent that runs as its own uid cannot read or write them.
    """

    def __init__(self, data_dir: os.PathLike[str] | str) -> None:
        self.root = Path(data_dir) / RECORDS_DIR

    def begin(self, agent_group: str, session_id: str) -> str:
        """A fresh token for a start of this session, recorded before the spawn."""
        token = secrets.token_hex(16)
        folder = make_dirs(self.root / agent_group)
        tmp = folder / f".{session_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            os.write(fd, token.encode())
        finally:
            os.close(fd)
        os.replace(tmp, folder / session_id)
        return token

    def token(self, agent_group: str, session_id: str) -> str | None:
        try:
            with open(os.open(self.root / agent_group / session_id,
                              os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
                return fh.read(64).decode("ascii", "replace")
        except OSError:
            return None

    def recorded(self) -> list[tuple[str, str]]:
        """Every (group, session) with a record (names as found, not yet validated)."""
        try:
            groups = [g for g in os.scandir(self.root) if g.is_dir(follow_symlinks=False)]
            return [(g.name, s.name) for g in groups for s in os.scandir(g.path)
                    if not s.name.startswith(".")]
        except OSError:
            return []

    def end(self, agent_group: str, session_id: str) -> None:
        try:
            os.unlink(self.root / agent_group / session_id)
        except OSError:
            pass


def marked_agents(data_dir: os.PathLike[str] | str,
                  records: StartRecords | None = None) -> dict[tuple[str, str], int]:
    """{(group, session): pid} of the live agents started for ``data_dir``: process-group
    leaders (an agent's own children inherit the marker; its group leader is the
    agent) whose environment carries the marker *and* the token recorded for that
    session (a process carrying a marker without it is left alone, with one line).
    Of several candidates for one session, the earliest started is the agent."""
    records = records or StartRecords(data_dir)
    suffix = "@" + os.path.abspath(data_dir)
    found: dict[tuple[str, str], tuple[int, int]] = {}
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        marked = process_marker(pid)
        if marked is None or not marked[0].endswith(suffix):
            continue
        try:
            started = process_start_time(pid)
            if os.getpgid(pid) != pid or started is None:
                continue
        except OSError:
            continue
        group, _, session = marked[0][:-len(suffix)].partition("/")
        try:  # any process of the host's user can carry a marker: it names folders
            validate_id(group, "agent group")
            validate_id(session, "session id")
        except InvalidId:
            continue
        expected = records.token(group, session)
        if not expected or not secrets.compare_digest(marked[1], expected):
            logger.warning("process {} carries the marker of session {} but not the token "
                           "this host gave that session's agent: left alone, not adopted",
                           pid, session)
            continue
        if (group, session) not in found or int(started) < found[(group, session)][1]:
            found[(group, session)] = (pid, int(started))
    return {key: pid for key, (pid, _) in found.items()}


def write_pid_file(folder: SessionDir, pid: int) -> None:
    """``.agent.pid`` = "<pid> <start time>", by descriptor: created fresh (``O_EXCL``,
    so a link an agent left in its place is never written through), then renamed."""
    tmp = f"{PID_FILE}.tmp"
    folder.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=folder.fd)
    try:
        os.write(fd, f"{pid} {process_start_time(pid) or '0'}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, PID_FILE, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
