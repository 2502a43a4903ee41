"""Files and folders the host writes are private: 0700 folders, 0600 files.

Whatever the umask, the data dir, the registry, the event log, ``delivered/``,
channel files, the sessions root and the agent group folders are created with
these modes and set to them explicitly (``mkdir``'s mode is masked by the umask;
``chmod`` is not). ``tighten_data_dir`` brings a data dir made before this
(0644 files in 0755 folders under the usual umask) to the same modes at start,
and logs once what it changed.

``clear_special_bits`` is how a file that came out of a session folder (an
agent wrote it) loses any setuid, setgid or sticky bit: by descriptor, never
through a link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loguru import logger

from orchestrator.contract.layout import REGISTRY_DB, delivered_root, sessions_root

DIR_MODE = 0o700
FILE_MODE = 0o600
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
# host files beside the registry: its WAL/SHM, the event log and its WAL/SHM, the lock
_HOST_FILES = (REGISTRY_DB, f"{REGISTRY_DB}-wal", f"{REGISTRY_DB}-shm", "events.db",
               "events.db-wal", "events.db-shm", "orchestrator.lock")


def make_dirs(path: Path) -> Path:
    """``mkdir -p`` whose new folders are 0700 whatever the umask (folders already there
    are left as they are: ``tighten_data_dir`` tightens those at start)."""
    missing = []
    p = Path(path)
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)  # just made by us, a folder: the umask masked mkdir's mode
    if not os.path.isdir(path):
        raise NotADirectoryError(20, "Not a directory", str(path))
    return Path(path)


def sync_dir(path: Path) -> None:
    """fsync a folder the host wrote: a rename or a new file in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_mode(path: Path, mode: int) -> bool:
    """chmod a folder or regular file we own to ``mode`` (never through a link);
    True if it changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
        return False
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        return False
    os.chmod(path, mode)
    return True


def private_file(path: Path) -> None:
    """Make sure ``path`` exists as a 0600 file (created empty if missing), so that a
    database SQLite then opens (and the ``-wal``/``-journal`` files it makes with the
    database's mode) is private from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def clear_special_bits(dir_fd: int, name: str) -> bool:
    """Drop setuid, setgid and sticky (and every bit for others) from the regular file
    ``name`` in the folder ``dir_fd``, by descriptor, never following a link; True if
    it changed. Anything but a regular file is left alone (the caller refuses it).
    PermissionError if a special bit is set and cannot be cleared."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        mode = stat.S_IMODE(st.st_mode)
        wanted = mode & ~SPECIAL_BITS & ~0o077
        if wanted == mode:
            return False
        try:
            os.fchmod(fd, wanted)
        except PermissionError:  # not ours (a non-root host, another uid): only the
            if mode & SPECIAL_BITS:  # special bits matter, and those must not stay
                raise
            return False
        return True
    finally:
        os.close(fd)


def _targets(data_dir: Path, extra_files: tuple[Path, ...]) -> list[tuple[Path, int]]:
    """What ``tighten_data_dir`` makes private, with the mode each gets."""
    targets = [(data_dir, DIR_MODE)] + [(data_dir / n, FILE_MODE) for n in _HOST_FILES]
    targets += [(Path(f), FILE_MODE) for f in extra_files]
    root = sessions_root(data_dir)
    targets.append((root, DIR_MODE))
    targets += [(Path(e.path), DIR_MODE) for e in _entries(root)
                if e.is_dir(follow_symlinks=False)]
    for folder in (delivered_root(data_dir), data_dir / "logs"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        targets.append((folder, DIR_MODE))
        for dirpath, dirnames, filenames in os.walk(folder):
            targets += [(Path(dirpath) / d, DIR_MODE) for d in dirnames]
            targets += [(Path(dirpath) / f, FILE_MODE) for f in filenames]
    return targets


def tighten_data_dir(data_dir: Path, extra_files: tuple[Path, ...] = ()) -> list[Path]:
    """At start: the data dir, its host files, ``delivered/`` and ``logs/`` (every
    folder and file in them), the sessions root and each agent group folder to
    0700/0600; ``extra_files`` (channel files) to 0600. Logs once what changed and
    returns it. Session folders are not walked: their modes are set as they are made
    and given to their agent's uid by the runtime."""
    changed: list[Path] = []
    for path, mode in _targets(data_dir, extra_files):
        try:
            if _set_mode(path, mode):
                changed.append(path)
        except OSError as exc:
            logger.warning("cannot make {} private ({})", path, exc.strerror)
    if changed:
        shown = ", ".join(str(p) for p in changed[:10])
        more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        logger.info("made {} path(s) private (0700 folders, 0600 files): {}{}", len(changed),
                    shown, more)
    return changed


def _entries(root: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(root) as it:
            return list(it)
    except OSError:
        return []
