"""Who holds a TCP port: the process listening on it, and its data dir if it is an
orchestrator — for the one-line "address in use" error.

Linux only, best effort (a process of another user cannot be looked into without
root): ``/proc/net/tcp{,6}`` gives the listening socket's inode, ``/proc/<pid>/fd``
the process holding it, and an orchestrator is recognised by the lock it holds on
its data dir (``<data_dir>/orchestrator.lock``, see host/data_lock.py) — no file
has to be written for this, and it cannot be stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "orchestrator.lock"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


@dataclass(frozen=True)
class PortHolder:
    pid: int
    command: str
    data_dir: Path | None  # set when the holder is an orchestrator

    def describe(self) -> str:
        if self.data_dir is not None:
            return f"another orchestrator (pid {self.pid}, data dir {self.data_dir}) holds it"
        return f"held by pid {self.pid} ({self.command})"


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    inodes: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local_port = fields[1].rpartition(":")[2]
            if int(local_port, 16) == port and fields[9] != "0":
                inodes.add(fields[9])
    return inodes


def _fd_targets(pid_dir: Path) -> list[str]:
    try:
        names = os.listdir(pid_dir / "fd")
    except OSError:
        return []
    targets = []
    for fd in names:
        try:
            targets.append(os.readlink(pid_dir / "fd" / fd))
        except OSError:
            continue
    return targets


def _command(pid_dir: Path) -> str:
    """The program's name only: another program's arguments may hold its secrets
    (a token on the command line), and this text goes into an error line."""
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return "?"
    name = os.path.basename(raw.split(b"\0", 1)[0].decode(errors="replace"))
    return "".join(c for c in name if c.isprintable())[:64] or "?"


def port_holder(port: int, proc: Path = Path("/proc")) -> PortHolder | None:
    """The process listening on ``port``, or None when it cannot be found."""
    inodes = listening_inodes(port, proc)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        pid_dir = proc / pid
        targets = _fd_targets(pid_dir)
        if not wanted.intersection(targets):
            continue
        data_dir = next((Path(t).parent for t in targets
                         if t.endswith("/" + LOCK_NAME)), None)
        return PortHolder(int(pid), _command(pid_dir), data_dir)
    return None
