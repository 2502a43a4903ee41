"""Each agent run's output, kept per session on the host side: ``logs/<group>/<session>/``.

Why here and not in the session folder: the agent owns its folder (it could replace
a log with a link, or fill it past its quota); ``<data_dir>/logs/`` is the host's,
0700, and an agent reaches its file only through its stdout and stderr.

One file per run, ``run-<N>.log`` (N counts up from 1 per session), and only the
newest ``keep_runs`` runs are kept: a session that ran ten thousand times keeps ten
files. A run's file is capped at ``max_bytes``: Docker's output is collected once,
its tail cut to the cap (``keep``); a local agent writes its file itself (so it
survives a restart of the orchestrator), and ``cap`` trims it in place when it has
grown past the cap, keeping its newest half (the mark included) — its writes are
``O_APPEND``, so they carry on at the new end. A cut is marked by one line saying how
many bytes went (local: the sweep's round, ``[watch] sweep_interval``, and each next
start cap it; what an agent writes faster than that is on the disk until then).

Log text is agent output: every byte hostile. It is only ever copied, never parsed;
``read`` is bounded; ``shown`` escapes control characters for a terminal.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.model import Config
from orchestrator.contract.layout import validate_id
from orchestrator.host.private import FILE_MODE, make_dirs

LOGS_DIR = "logs"
MAX_BYTES = 1024 * 1024  # [sessions] max_agent_log_bytes
KEEP_RUNS = 10  # [sessions] agent_log_runs
_RUN = re.compile(r"run-([0-9]{1,9})\.log")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_COPY = 64 * 1024


def cut_mark(cut: int) -> bytes:
    return f"[orchestrator: {cut} earlier bytes of this run's output cut]\n".encode()


def shown(data: bytes) -> str:
    """Agent output as a terminal may show it: UTF-8 (bad bytes replaced), and every
    control character but newline and tab escaped (no escape sequence reaches the
    terminal: no cleared screen, retitled window or faked prompt)."""
    text = data.decode("utf-8", "replace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass(frozen=True, slots=True)
class RunLog:
    """One run's kept output, as read: at most ``max_bytes`` of its end."""

    run: int
    data: bytes
    size: int  # the file's size (``data`` is its tail)
    runs: tuple[int, ...]  # every run kept for the session, oldest first


@dataclass(frozen=True)
class AgentLogs:
    """The agent-log store of one data dir."""

    data_dir: Path
    max_bytes: int = MAX_BYTES
    keep_runs: int = KEEP_RUNS

    @classmethod
    def of(cls, cfg: Config) -> "AgentLogs":
        """The store with the configured cap and runs kept (``[sessions]``)."""
        return cls(cfg.data_dir, cfg.sessions.max_agent_log_bytes, cfg.sessions.agent_log_runs)

    def folder(self, group: str, session_id: str) -> Path:
        validate_id(group, "agent group")
        validate_id(session_id, "session id")
        return Path(self.data_dir) / LOGS_DIR / group / session_id

    def runs(self, group: str, session_id: str) -> list[int]:
        """The kept runs of a session, oldest first (none: [])."""
        try:
            names = os.listdir(self.folder(group, session_id))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for n in names if (m := _RUN.fullmatch(n)))

    def path(self, group: str, session_id: str, run: int) -> Path:
        return self.folder(group, session_id) / f"run-{run}.log"

    def begin(self, group: str, session_id: str) -> tuple[int, int]:
        """A new run's file: (its number, a descriptor open for appending). The oldest
        runs beyond ``keep_runs`` are removed. The caller closes the descriptor."""
        folder = make_dirs(self.folder(group, session_id))
        self._adopt_legacy(group, session_id)
        runs = self.runs(group, session_id)
        for old in runs[:max(0, len(runs) - self.keep_runs + 1)]:
            self._unlink(self.path(group, session_id, old))
        if runs and runs[-1] in self.runs(group, session_id):  # the last run is over
            self.cap(group, session_id, runs[-1])
        run = (runs[-1] if runs else 0) + 1
        while True:
            try:
                fd = os.open(folder / f"run-{run}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
                return run, fd
            except FileExistsError:  # a concurrent begin took it
                run += 1

    def keep(self, group: str, session_id: str, data: bytes, cut: int = 0) -> int:
        """Keep one finished run's output (Docker's, collected at its end): its last
        ``max_bytes``, marked when anything was cut. Returns the run's number."""
        total = len(data) + cut
        if cut or len(data) > self.max_bytes:  # the mark counts within the cap
            room = max(0, self.max_bytes - len(cut_mark(total)))
            data = data[len(data) - min(room, len(data)):]
            cut = total - len(data)
        run, fd = self.begin(group, session_id)
        try:
            with open(fd, "ab", closefd=False) as fh:
                if cut:
                    fh.write(cut_mark(cut))
                fh.write(data)
        finally:
            os.close(fd)
        return run

    def cap(self, group: str, session_id: str, run: int | None = None) -> int:
        """Trim a run's file (default: the newest) that grew past ``max_bytes`` to its
        newest half, in place; the bytes cut (0: none). For a file its agent still
        writes: its ``O_APPEND`` writes go on at the new end."""
        runs = self.runs(group, session_id) if run is None else [run]
        if not runs:
            return 0
        try:
            fd = os.open(self.path(group, session_id, runs[-1]),
                         os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            size = os.fstat(fd).st_size
            if size <= self.max_bytes:
                return 0
            keep = max(0, self.max_bytes // 2 - len(cut_mark(size)))  # the mark within
            tail = os.pread(fd, keep, size - keep) if keep else b""
            mark = cut_mark(size - len(tail))
            # mark + tail written over the start, then the rest cut off: the agent's
            # appends meanwhile land after ``size`` and are lost with the cut
            os.pwrite(fd, mark + tail, 0)
            os.ftruncate(fd, len(mark) + len(tail))
            return size - len(tail)
        finally:
            os.close(fd)

    def read(self, group: str, session_id: str, run: int | None = None,
             max_bytes: int | None = None, offset: int | None = None) -> RunLog | None:
        """A run's output (default: the newest run): its last ``max_bytes`` (default
        the cap), or from ``offset`` on (``-f``) at most that much; None if the session
        has no such run. Never follows a link."""
        runs = tuple(self.runs(group, session_id))
        if not runs or (run is not None and run not in runs):
            return None
        run = runs[-1] if run is None else run
        limit = self.max_bytes if max_bytes is None else max_bytes
        try:
            fd = os.open(self.path(group, session_id, run),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:  # removed by a rotation meanwhile
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{self.path(group, session_id, run)}: not a regular file")
            start = max(0, st.st_size - limit) if offset is None else min(offset, st.st_size)
            chunks, left = [], min(limit, st.st_size - start)
            while left > 0:
                chunk = os.pread(fd, min(_COPY, left), start)
                if not chunk:
                    break
                chunks.append(chunk)
                start += len(chunk)
                left -= len(chunk)
            return RunLog(run, b"".join(chunks), st.st_size, runs)
        finally:
            os.close(fd)

    def _adopt_legacy(self, group: str, session_id: str) -> None:
        """A session's log from before runs were kept apart (``logs/<group>/<id>.log``,
        every local run appended) becomes its run 0, cut to the cap."""
        old = Path(self.data_dir) / LOGS_DIR / group / f"{session_id}.log"
        try:
            if not stat.S_ISREG(os.lstat(old).st_mode):
                return
            os.rename(old, self.path(group, session_id, 0))
        except FileNotFoundError:
            return
        self.cap(group, session_id, 0)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
