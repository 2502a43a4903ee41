"""One session as one compressed file: ``<archive_dir>/<group>/<session>.tar.gz``.

The archive holds ``registry.json`` (the session's registry rows, ``host.removals``)
and ``session/`` (its folder). Everything in the folder was made by an agent, so it is
read the supervisor's way: every folder opened ``O_NOFOLLOW | O_DIRECTORY`` relative
to the one above it (``safefs.open_dir``), every file ``O_NOFOLLOW`` and checked to be
a regular file after the open; a link is stored as a link (never followed), a FIFO,
socket or device is left out. Folders deeper than ``MAX_DEPTH`` are left out too (said
in the log): a 3 000-deep tree must not cost 3 000 descriptors.

Written to ``.part`` and renamed once complete and synced, so an archive that exists
under its name is whole: that is what lets ``host.retention.recover`` decide, after a
crash, whether an archive is done (finish the removal) or not (undo it).

Extraction (``sessions restore``) goes through ``tarfile``'s ``data`` filter: no
absolute name, nothing outside the target folder, no device; an entry it refuses (an
agent's link pointing out of its folder) is skipped and counted, not fatal.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

from loguru import logger

from orchestrator.host.private import make_dirs, sync_dir
from orchestrator.host.safefs import Refused, open_dir

MAX_DEPTH = 256
REGISTRY_JSON = "registry.json"
TOP = "session"
SUFFIX = ".tar.gz"
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def archive_path(archive_dir: Path, agent_group: str, session_id: str) -> Path:
    return archive_dir / agent_group / f"{session_id}{SUFFIX}"


def write_part(folder_fd: int, dest: Path, rows: dict[str, Any]) -> tuple[Path, int]:
    """Archive the folder open at ``folder_fd`` with ``rows`` into ``<dest>.part`` (not
    synced: ``commit`` syncs and renames a batch of them); returns the part's path and
    how many entries were left out (deep folders, special files)."""
    make_dirs(dest.parent)
    part = dest.with_name(dest.name + ".part")
    with open(part, "wb") as raw:
        # compresslevel 6: most of level 9's ratio at a fraction of its CPU (a sweep of
        # 10 000 sessions runs beside live ones); GNU format: long names without the
        # PAX header's cost per entry
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6,
                          format=tarfile.GNU_FORMAT) as tar:
            data = json.dumps(rows, separators=(",", ":")).encode()
            info = tarfile.TarInfo(REGISTRY_JSON)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
            skipped = _add_tree(tar, folder_fd)
    return part, skipped


def commit(parts: list[tuple[Path, Path]]) -> None:
    """Sync each ``(part, dest)``'s file, then rename it to ``dest`` and sync the folders:
    an archive under its final name is whole, even after a power cut. All files are
    written before the first sync, so one journal commit carries most of them."""
    for part, _ in parts:
        fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for part, dest in parts:
        os.replace(part, dest)
    for folder in {dest.parent for _, dest in parts}:
        sync_dir(folder)


def write_archive(folder_fd: int, dest: Path, rows: dict[str, Any]) -> int:
    """One archive, complete or absent; returns how many entries were left out."""
    part, skipped = write_part(folder_fd, dest, rows)
    commit([(part, dest)])
    return skipped


def _add_tree(tar: tarfile.TarFile, top_fd: int) -> int:
    skipped = 0
    st = os.fstat(top_fd)
    tar.addfile(_info(TOP, st, tarfile.DIRTYPE))
    stack: list[tuple[int, str, list[str]]] = [(os.dup(top_fd), TOP, _names(top_fd))]
    try:
        while stack:
            fd, rel, names = stack[-1]
            if not names:
                os.close(stack.pop()[0])
                continue
            name = names.pop()
            path = f"{rel}/{name}"
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if len(stack) >= MAX_DEPTH:
                    skipped += 1
                    continue
                try:
                    sub = open_dir(name, fd, path)
                except (Refused, FileNotFoundError):
                    skipped += 1
                    continue
                tar.addfile(_info(path, st, tarfile.DIRTYPE))
                stack.append((sub, path, _names(sub)))
            elif stat.S_ISLNK(st.st_mode):
                info = _info(path, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(name, dir_fd=fd)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                skipped += _add_file(tar, fd, name, path)
            else:
                skipped += 1  # a FIFO, socket or device: nothing to keep
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    if skipped:
        logger.info("archive: {} entries left out (deeper than {} levels, or not regular "
                    "files, folders or links)", skipped, MAX_DEPTH)
    return skipped


def _add_file(tar: tarfile.TarFile, dir_fd: int, name: str, path: str) -> int:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return 1  # swapped for a link or a FIFO since the stat
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 1
        tar.addfile(_info(path, st, tarfile.REGTYPE), fh)
    return 0


def _info(path: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & 0o777
    info.mtime = int(st.st_mtime)
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    return info


def _names(fd: int) -> list[str]:
    with os.scandir(fd) as it:
        return sorted((e.name for e in it), reverse=True)


def read_rows(archive: Path) -> dict[str, Any]:
    """The registry rows an archive carries."""
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(REGISTRY_JSON)
        if member is None:
            raise tarfile.ReadError(f"{archive}: no {REGISTRY_JSON}")
        return json.loads(member.read())


def extract_folder(archive: Path, staging: Path) -> tuple[Path, int]:
    """Unpack the archive's ``session/`` into ``staging`` (a new folder); returns the
    unpacked folder and how many entries the ``data`` filter refused."""
    refused = 0

    def only_safe(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        nonlocal refused
        if member.name != TOP and not member.name.startswith(TOP + "/"):
            return None  # registry.json: read separately
        try:
            return tarfile.data_filter(member, dest)
        except tarfile.FilterError:
            refused += 1
            return None

    make_dirs(staging)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(staging, filter=only_safe)
    return staging / TOP, refused
