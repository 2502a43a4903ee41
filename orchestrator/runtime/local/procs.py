"""Which local processes are our agents: read from /proc, never from the session folder.

A session folder is its agent's to write, so nothing there may decide which process
the host adopts (and later signals): a pid file an agent wrote could name any process
of the host's user. Instead each agent is started with ``ORCHESTRATOR_AGENT`` =
``<group>/<session>@<data dir>`` in its environment, and after a restart the host
adopts exactly the process-group leaders whose ``/proc/<pid>/environ`` carries the
marker of one of its sessions. That also covers an agent whose pid file was never
written (the host SIGKILLed between the spawn and the write): it is found and
adopted, not doubled by a second agent for the same session.

The pid file (``.agent.pid``: pid and the kernel's start time) is still written,
for people and tools looking at a folder, by descriptor and without following a
link; it is only ever read to be removed.
"""

from __future__ import annotations

import os

from orchestrator.contract.layout import PID_FILE, InvalidId, validate_id
from orchestrator.host.safefs import SessionDir

MARKER = "ORCHESTRATOR_AGENT"
_MARKER_PREFIX = MARKER.encode() + b"="


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


def process_marker(pid: int) -> str | None:
    """The ``ORCHESTRATOR_AGENT`` value a process was started with, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(_MARKER_PREFIX):
            return item[len(_MARKER_PREFIX):].decode("utf-8", "replace")
    return None


def marked_agents(data_dir: os.PathLike[str] | str) -> dict[tuple[str, str], int]:
    """{(group, session): pid} of the live agents started for ``data_dir``: process-group
    leaders (an agent's own children inherit the marker; its group leader is the
    agent) whose environment carries the marker."""
    suffix = "@" + os.path.abspath(data_dir)
    found: dict[tuple[str, str], int] = {}
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        value = process_marker(pid)
        if value is None or not value.endswith(suffix):
            continue
        try:
            if os.getpgid(pid) != pid or process_start_time(pid) is None:
                continue
        except OSError:
            continue
        group, _, session = value[:-len(suffix)].partition("/")
        try:  # any process of the host's user can carry a marker: it names folders
            validate_id(group, "agent group")
            validate_id(session, "session id")
        except InvalidId:
            continue
        found[(group, session)] = pid
    return found


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
