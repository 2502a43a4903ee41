"""Copying received attachments into ``outbox/<out_id>/`` without trusting them.

Attachment paths come from inbound content, so they are checked against the
workspace: no absolute paths, no ``..``, and no symlink anywhere on the way
(a peer system copied through symlinks; the contract says never follow one
found in a session folder). Files are opened with ``O_NOFOLLOW`` so a symlink
swapped in after the check is still refused.
"""

from __future__ import annotations

import os
import stat

from orchestrator.agent.decide import Attachment, check_relative_path, safe_file_name

TYPE_CHECKING = False  # typing stays off the agent's cold start
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Iterable

_CHUNK = 1 << 20


class Refused(Exception):
    """An attachment that will not be copied; the message says why."""


def _open_inside(workspace: Path, rel: str) -> int:
    """Open ``workspace/rel`` for reading, refusing escapes and symlinks; return an fd."""
    pure = check_relative_path(rel)
    if pure is None:
        raise Refused("path is absolute, empty or leaves the workspace")
    current = workspace
    for part in pure.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise Refused("file not found") from None
        if stat.S_ISLNK(st.st_mode):
            raise Refused("path goes through a symlink")
    if not current.resolve().is_relative_to(workspace):
        raise Refused("path resolves outside the workspace")
    try:
        fd = os.open(current, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("not a regular file")
    return fd


def _copy_fd(src_fd: int, dest: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    out_fd = os.open(dest, flags, 0o644)
    with os.fdopen(src_fd, "rb", closefd=False) as src, os.fdopen(out_fd, "wb") as out:
        while chunk := src.read(_CHUNK):  # shutil.copyfileobj, without importing shutil
            out.write(chunk)


def copy_attachments(
    workspace: Path, attachments: Iterable[Attachment], dest_dir: Path
) -> tuple[list[str], list[str]]:
    """Copy each attachment to ``dest_dir/<name>``; return (names copied, refusals).

    ``workspace`` must already be resolved. ``dest_dir`` is created only when
    there is something to copy, so a reply without files leaves no folder.
    Refusals read ``"<name or path>: <reason>"``.
    """
    files: list[str] = []
    refused: list[str] = []
    for item in attachments:
        label = item.name or item.path or "?"
        name = safe_file_name(item.name)
        try:
            if name is None:
                raise Refused("unsafe file name")
            if name in files:
                raise Refused("duplicate file name")
            fd = _open_inside(workspace, item.path)
            try:
                dest_dir.mkdir(parents=False, exist_ok=True)
                _copy_fd(fd, dest_dir / name)
            finally:
                os.close(fd)
        except Refused as exc:
            refused.append(f"{label}: {exc}")
            continue
        files.append(name)
    return files, refused
