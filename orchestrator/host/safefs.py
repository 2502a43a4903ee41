"""Reach into a session folder without ever following a link the agent planted.

Everything under ``sessions/`` is agent-controlled (design.md part 5): any name
may at any moment be a symlink to ``/etc``, another session or the Docker
socket, a FIFO, or a new inode. So the host never resolves a path under
``sessions/`` by name. It opens the sessions root, then the group and session
folders one component at a time with ``O_NOFOLLOW | O_DIRECTORY`` relative to
the descriptor before (``dir_fd``), and works inside the session folder by
descriptor: ``lstat``/``open``/``rename``/``unlink`` with ``dir_fd=``, checking
``st_mode`` of what was actually opened. There is no check-then-open on a path.

SQLite cannot be given a descriptor, so a database is opened as
``/proc/self/fd/<session dir fd>/<name>`` (the kernel names the folder we hold,
wherever it has been moved) and then *verified*: the descriptor SQLite itself
opened is looked up (``SQLITE_FCNTL_FILE_POINTER``) and must be the regular,
singly linked file that ``<name>`` is inside the folder we hold. A mismatch
closes the connection before a single page is trusted or written. Residual risk
(see README "Hostile agents"): SQLite derives its ``-journal`` name from the
path text, so an agent that wins a race between SQLite's path walk and its
``open`` can make SQLite open a FIFO there (that open blocks) or look for a hot
journal beside another file; the database file itself is never read or written
unless it is the one in the session folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from orchestrator.contract.layout import INBOUND_DB, sessions_root
from orchestrator.host.filesig import Signature, file_signature
from orchestrator.host.kept_dbs import keeps

if TYPE_CHECKING:
    from orchestrator.host.kept_dbs import KeptDbs

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


# A host write to a session DB waits at most this long for readers to finish (SQLite's
# busy timeout; reads wait not at all). Not zero: the agent reads inbound.db every few
# ms with sub-millisecond transactions, and a commit refused at once would make a
# channel that cannot recognise a reply it already took (log, webhook) send it twice.
# A few ms bound what an agent that holds a read lock forever costs the event loop:
# one such wait per retry, and retries back off to one a second.
HOST_WRITE_BUSY_MS = 5

# What one reader that is not the supervisor (``status``, the API, ``series``, the
# bench) may spend inside one session's database: SQLite's progress handler interrupts
# a query past it (a huge table, a pathological file), so a session's bad files cost
# that session's row, never the command or a worker thread. Readers never wait on a
# lock (busy timeout 0): a database the agent keeps locked is an error in its row.
READ_DEADLINE = 2.0

# Files SQLite opens beside a database by name (a hot journal is opened to be rolled
# back, a WAL database's -wal and -shm always): one that is not a regular file (a FIFO
# blocks SQLite's open forever) refuses the database before SQLite is called.
SIDE_FILES = ("-journal", "-wal", "-shm")

KEPT_CACHE_KIB = 128  # SQLite's page cache of a connection kept between passes


class Refused(OSError):
    """A name under ``sessions/`` is a symlink or not the kind of file the contract says.

    Permanent until the agent (or an operator) puts the right thing there: the
    caller logs it once and leaves the thing alone.
    """


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def open_dir(name: str, dir_fd: int | None, where: str) -> int:
    """``openat(dir_fd, name, O_DIRECTORY|O_NOFOLLOW)``; a link or non-folder is Refused.

    FileNotFoundError passes through (absent is not hostile); other errors too.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(exc.errno, f"{where} is a symlink or not a directory; "
                          "refusing to follow it") from None
        raise


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def regular_or_refuse(st: os.stat_result, where: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Refused(errno.EINVAL, f"{where} is {_kind(st.st_mode)}, not a regular file; "
                      "refusing to use it")
    if st.st_nlink > 1:
        raise Refused(errno.EMLINK, f"{where} has {st.st_nlink} hard links; refusing a file "
                      "that may also live outside the session folder")


def open_group(data_dir: Path, agent_group: str) -> int:
    """An agent group folder's descriptor, reached without following a link (Refused)."""
    root = os.open(sessions_root(data_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_dir(agent_group, root, f"sessions/{agent_group}")
    finally:
        os.close(root)


class SessionDir:
    """One session folder, opened from the sessions root without following links.

    Cheap (three ``openat`` calls): opened per pass and closed at its end, so a
    folder swapped for a link between passes is refused by the next pass. ``kept``:
    the pass's own databases are served by connections kept between passes
    (``kept_dbs``: checked again against this very folder on each use).
    """

    def __init__(self, data_dir: Path, agent_group: str, session_id: str,
                 kept: KeptDbs | None = None) -> None:
        self.where = f"sessions/{agent_group}/{session_id}"
        self.kept = kept
        group = open_group(data_dir, agent_group)
        try:
            self.fd = open_dir(session_id, group, self.where)
        finally:
            os.close(group)
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)
        self.times = (st.st_mtime_ns, st.st_ctime_ns)  # as opened: before any file is read

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SessionDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lstat(self, name: str) -> os.stat_result | None:
        return lstat_at(self.fd, name)

    def signature(self, name: str) -> Signature:
        """(mtime_ns, size, inode) of ``name`` itself (never what a link points at)."""
        return file_signature(name, self.fd)

    def inode(self, name: str) -> int | None:
        st = lstat_at(self.fd, name)
        return st.st_ino if st is not None else None

    def open_dir(self, name: str) -> int:
        return open_dir(name, self.fd, f"{self.where}/{name}")

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)  # unlink never follows: a link itself goes
        except FileNotFoundError:
            pass

    def db(self, name: str, *, busy_ms: int = 0, create: bool = False) -> SafeDb:
        return SafeDb(self, name, busy_ms, create)

    def reader(self, name: str, deadline: float = READ_DEADLINE) -> SafeDb:
        """A database for a reader that is not the supervisor: read-only use, no wait
        on a lock, every query interrupted once ``deadline`` seconds have passed since
        the open."""
        return SafeDb(self, name, 0, False, deadline)

    def regular(self, name: str) -> os.stat_result | None:
        """``lstat`` of ``name``; None if absent, Refused unless a regular file."""
        st = self.lstat(name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise Refused(errno.EINVAL, f"{self.where}/{name} is {_kind(st.st_mode)}, not a "
                          "regular file; refusing to use it")
        return st


class FolderStat:
    """A session folder seen through its group folder's descriptor (``open_group``) by
    ``stat`` alone: nothing is opened (``SessionDir``'s three opens and closes were most
    of what a swept session cost), nothing is read.

    For change detection only (the sweep, the start-up check); a pass opens the folder
    with ``SessionDir``. The folder itself is ``lstat``-ed first: a link is Refused. A
    folder swapped for a link between that ``lstat`` and a file's ``stat`` can make
    that ``stat`` look through the link: it then reports another file's signature,
    which at worst causes or (for the very same inodes, moved) skips a pass — no data
    is ever read through it.
    """

    def __init__(self, group_fd: int, agent_group: str, session_id: str) -> None:
        self.where = f"sessions/{agent_group}/{session_id}"
        st = os.stat(session_id, dir_fd=group_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise Refused(errno.ENOTDIR, f"{self.where} is {_kind(st.st_mode)}, not a folder; "
                          "refusing to follow it")
        self.identity = (st.st_dev, st.st_ino)
        self._fd = group_fd
        self._prefix = session_id + "/"

    def signature(self, name: str) -> Signature:
        return file_signature(self._prefix + name, self._fd)


class SafeDb:
    """A database in a session folder, opened so that only that very file is used.

    Passed where ``store`` functions take a path (``schema.opened`` calls
    ``connect``). ``exists`` is an ``lstat`` (a dangling link is "there" and then
    refused, never created through).
    """

    def __init__(self, folder: SessionDir, name: str, busy_ms: int = 0,
                 create: bool = False, deadline: float | None = None) -> None:
        self.folder = folder
        self.name = name
        self.busy_ms = busy_ms
        self.create = create  # only the host's own files, and outbound.db while no agent runs
        self.deadline = deadline  # seconds from the open after which queries are interrupted
        self._kept: list[sqlite3.Connection] = []  # handed out by ``folder.kept``

    def __fspath__(self) -> str:
        return f"{self.folder.where}/{self.name}"

    def __str__(self) -> str:
        return self.__fspath__()

    def exists(self) -> bool:
        return self.folder.lstat(self.name) is not None

    def connect(self, readonly: bool) -> sqlite3.Connection:
        kept = self.folder.kept
        if kept is not None and self.deadline is None \
                and keeps(self.name, readonly, self.busy_ms, self.create) \
                and not (self.name == INBOUND_DB and self._hot_journal()):
            # (a hot journal: a fresh open below rolls it back, which a read-only
            # connection cannot)
            conn = kept.connection(self, self._open_kept)
            self._kept.append(conn)
            return conn
        create = self.create and not readonly
        st = self.checked()
        if st is None and not create:
            raise sqlite3.OperationalError(f"{self}: no such file")
        if readonly and self.name == INBOUND_DB and self._hot_journal():
            self._roll_back()
        return self._open(self.folder.fd, readonly, create)[0]

    def release(self, conn: sqlite3.Connection, failed: bool) -> None:
        """The end of a use (``schema.opened``): a kept connection goes back to
        ``folder.kept`` (dropped if the use failed), any other is closed."""
        if self._kept and conn is self._kept[-1]:
            self._kept.pop()
            if self.folder.kept is not None:
                self.folder.kept.release(self, conn, failed)
                return
        conn.close()

    def checked(self) -> os.stat_result | None:
        """``lstat`` of the file (None: absent), Refused unless it is a regular file
        with one link, or while a file SQLite opens beside it by name is not a
        regular file: what every open, and every use of a kept one, checks first."""
        where = self.__fspath__()
        st = self.folder.lstat(self.name)
        if st is not None:
            regular_or_refuse(st, where)
        for suffix in SIDE_FILES:
            side = self.folder.lstat(self.name + suffix)
            if side is not None and not stat.S_ISREG(side.st_mode):
                raise Refused(errno.EINVAL, f"{where}{suffix} is {_kind(side.st_mode)}, not a "
                              f"regular file; refusing to open {self.name} beside it")
        return st

    def _open_kept(self, dir_fd: int) -> tuple[sqlite3.Connection, os.stat_result]:
        """A read-only connection for ``kept_dbs`` (``checked`` just now), named through
        its own duplicate of the folder's descriptor (read-only: a descriptor opened for
        writing raises ``IN_CLOSE_WRITE`` at its close, a change for the host's watch;
        see ``kept_dbs``). Its page cache is small (``KEPT_CACHE_KIB``): a pass reads a
        few pages, and 256 kept connections with SQLite's default 2 MiB each could hold
        512 MiB after reads of big files."""
        conn, st = self._open(dir_fd, True, False)
        try:
            conn.execute(f"PRAGMA cache_size=-{KEPT_CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn, st

    def _open(self, dir_fd: int, readonly: bool,
              create: bool) -> tuple[sqlite3.Connection, os.stat_result]:
        where = self.__fspath__()
        mode = "ro" if readonly else ("rwc" if create else "rw")
        uri = f"file:/proc/self/fd/{dir_fd}/{self.name}?mode={mode}"
        busy_ms = self.busy_ms if readonly else max(self.busy_ms, HOST_WRITE_BUSY_MS)
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_ms / 1000.0)
        try:
            st = verify(conn, dir_fd, self.name, where)
            if not readonly:
                conn.execute("PRAGMA journal_mode=DELETE")
            if self.deadline is not None:
                end = time.monotonic() + self.deadline
                conn.set_progress_handler(lambda: time.monotonic() > end, 1000)
        except BaseException:
            conn.close()
            raise
        conn.row_factory = sqlite3.Row
        return conn, st

    def _hot_journal(self) -> bool:
        st = self.folder.lstat(self.name + "-journal")
        return st is not None and stat.S_ISREG(st.st_mode) and st.st_size > 0

    def _roll_back(self) -> None:
        """A host write cut short (SIGKILL, power loss) leaves a hot journal in
        inbound.db, and no read-only connection may roll it back: every reader, the
        host's own and the agent's, would get "attempt to write a readonly database"
        until the host writes that session again. The host is the one writer, so it
        rolls the journal back itself with a read-write open and one read (SQLite does
        nothing if the journal belongs to a write still in progress elsewhere)."""
        conn = self.connect(readonly=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()


# --- which file did SQLite open? ------------------------------------------------------

_SQLITE_FCNTL_FILE_POINTER = 7
_UNIX_FILE_FD_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)  # unixFile: 3 pointers, then h


def _load_file_fd() -> Callable[[sqlite3.Connection], int | None] | None:
    """A function giving the descriptor of a connection's main database file.

    Uses the ``sqlite3 *`` that CPython keeps right after the object header of a
    Connection and SQLite's public ``sqlite3_file_control``; the unix VFS's
    ``unixFile`` begins with three pointers, then the descriptor. Checked once
    against a file we open ourselves; None where that check fails.
    """
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        fc = lib.sqlite3_file_control
    except (OSError, AttributeError):
        return None
    fc.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
    fc.restype = ctypes.c_int

    def file_fd(conn: sqlite3.Connection) -> int | None:
        db = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not db:
            return None
        pfile = ctypes.c_void_p()
        if fc(db, b"main", _SQLITE_FCNTL_FILE_POINTER, ctypes.byref(pfile)) != 0 \
                or not pfile.value:
            return None
        return ctypes.c_int.from_address(pfile.value + _UNIX_FILE_FD_OFFSET).value

    import tempfile
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = os.path.join(tmp, "probe.db")
            conn = sqlite3.connect(probe)
            try:
                fd = file_fd(conn)
                ok = fd is not None and fd >= 0 and os.path.samestat(os.fstat(fd),
                                                                     os.stat(probe))
            finally:
                conn.close()
    except (OSError, ValueError, sqlite3.Error):
        ok = False
    return file_fd if ok else None


_file_fd = _load_file_fd()
VERIFIED_OPEN = _file_fd is not None


def verify(conn: sqlite3.Connection, dir_fd: int, name: str, where: str) -> os.stat_result:
    """The file SQLite holds must be ``name`` in the folder ``dir_fd``, regular, one link;
    returns its ``lstat``."""
    current = lstat_at(dir_fd, name)
    if current is None:
        raise Refused(errno.ENOENT, f"{where} vanished while being opened")
    regular_or_refuse(current, where)
    if _file_fd is None:
        return current  # no way to ask SQLite: the lstat before and after is all we have
    fd = _file_fd(conn)
    if fd is None or fd < 0:
        raise Refused(errno.EBADF, f"{where}: cannot tell which file SQLite opened")
    opened = os.fstat(fd)
    if not os.path.samestat(opened, current):
        raise Refused(errno.EXDEV, f"{where} was swapped while being opened; refusing the "
                      "file SQLite reached")
    return current
