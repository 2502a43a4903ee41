"""A reply's files: ``outbox/<id>/<name>`` moved into ``<data_dir>/delivered/<id>/``.

Delivery (``delivery.py``) decides what happens to each reply; this module is the
one part of it that touches the agent's files, so it is where the hostile-input
rules live: every name is a plain basename, everything under the session folder
is reached by descriptor (never a path, never a link followed), only a regular
file with one link is taken, and a file swapped while being moved is found out
and removed. Separate so those rules can be read (and tested) on their own,
apart from the planning and recording of replies.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from orchestrator.channels import DeliveryError, PermanentDeliveryError, StorageFull
from orchestrator.contract.layout import OUTBOX, InvalidId, delivered_root, validate_id
from orchestrator.host.attachments import safe_name
from orchestrator.host.private import clear_special_bits, make_dirs
from orchestrator.host.safefs import (
    DIR_FLAGS,
    FILE_FLAGS,
    Refused,
    SessionDir,
    lstat_at,
    open_dir,
    regular_or_refuse,
)
from orchestrator.support.errors import host_storage_failure


class FilesNotReady(DeliveryError):
    """A listed file is not in ``outbox/<id>/`` yet: the agent may write the row first.

    Not a failed attempt: the reply waits (no backoff) and the next ``outbox/``
    event retries it at once; only after ``[delivery] files_wait`` does a
    missing file count as an attempt like any other failure.
    """


def id_problem(out_id: str) -> str | None:
    """Reply ids name folders (``outbox/<id>``, ``delivered/<id>``)."""
    try:
        validate_id(out_id, "reply id")
    except InvalidId as exc:
        return str(exc)
    return None


def _open_step(name: str, dir_fd: int, where: str, out_id: str) -> int | None:
    """One folder of the walk to a reply's files, None if absent; a link, a non-folder or
    an unreadable one is permanent (it will not fix itself while the reply waits)."""
    try:
        return open_dir(name, dir_fd, where)
    except FileNotFoundError:
        return None
    except Refused as exc:
        raise PermanentDeliveryError(f"reply {out_id}: {exc.strerror}") from None
    except OSError as exc:
        raise PermanentDeliveryError(f"reply {out_id}: {where} cannot be read "
                                     f"({exc.strerror})") from None


def _open_outbox_dir(folder: SessionDir, out_id: str) -> int | None:
    """``outbox/<out_id>/`` as a descriptor, None if absent."""
    outbox = _open_step(OUTBOX, folder.fd, f"{folder.where}/{OUTBOX}", out_id)
    if outbox is None:
        return None
    try:
        return _open_step(out_id, outbox, f"{folder.where}/{OUTBOX}/{out_id}", out_id)
    finally:
        os.close(outbox)


def move_files(folder: SessionDir, data_dir: Path, out_id: str, names: list[str]) -> list[Path]:
    """Move ``outbox/<out_id>/<name>`` into ``delivered/<out_id>/``; idempotent.

    Everything under the session folder is reached by descriptor, never by a path:
    a name that is not a plain basename, a symlink, a FIFO or anything but a
    regular file with one link is refused for good (PermanentDeliveryError); a
    file not there yet raises FilesNotReady. A file swapped for something else
    while being moved is found out in ``delivered/`` (the host's own folder), by
    looking at what actually arrived, and removed again.
    """
    problem = id_problem(out_id)
    if problem:
        raise PermanentDeliveryError(f"reply {out_id!r}: {problem}")
    for name in names:
        if safe_name(name, 0) != name:
            raise PermanentDeliveryError(f"reply {out_id}: refusing file name {name!r} "
                                         "(must be a basename)")
    if not names:
        return []
    dst_dir = delivered_root(data_dir) / out_id
    src = _open_outbox_dir(folder, out_id)
    try:
        try:
            make_dirs(dst_dir)
            dst = os.open(dst_dir, DIR_FLAGS)
        except OSError as exc:
            error = StorageFull if host_storage_failure(exc) else DeliveryError
            raise error(f"reply {out_id}: cannot create {dst_dir} ({exc.strerror})") from None
        try:
            return [_move_one(src, dst, dst_dir, name, f"{folder.where}/{OUTBOX}/{out_id}",
                              out_id) for name in names]
        finally:
            os.close(dst)
    finally:
        if src is not None:
            os.close(src)


def _move_one(src: int | None, dst: int, dst_dir: Path, name: str, where: str,
              out_id: str) -> Path:
    st = lstat_at(src, name) if src is not None else None
    if src is None or st is None:  # (no outbox/<id>/ folder: no file in it either)
        have = lstat_at(dst, name)
        if have is not None and stat.S_ISREG(have.st_mode):
            return dst_dir / name  # moved by an earlier pass that crashed before recording
        raise FilesNotReady(f"reply {out_id}: file {name!r} is not in outbox/{out_id}/ yet")
    try:
        regular_or_refuse(st, f"{where}/{name}")
    except Refused as exc:
        raise PermanentDeliveryError(f"reply {out_id}: {exc.strerror}") from None
    try:
        os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            error = StorageFull if host_storage_failure(exc) else DeliveryError
            raise error(f"reply {out_id}: cannot move {name!r} ({exc.strerror})") from None
        _copy_across(src, dst, name, out_id)
    arrived = lstat_at(dst, name)  # what the rename really moved (the agent may race it)
    if arrived is None or not stat.S_ISREG(arrived.st_mode) or arrived.st_nlink > 1:
        if arrived is not None:
            os.unlink(name, dir_fd=dst)
        raise PermanentDeliveryError(f"reply {out_id}: {where}/{name} was swapped for "
                                     "something else while being moved")
    _private_or_remove(dst, name, out_id)
    return dst_dir / name


def _private_or_remove(dst: int, name: str, out_id: str) -> None:
    """No setuid/setgid/sticky bit and no access for others on a delivered file
    (``private.clear_special_bits``, by descriptor); one that keeps a bit is removed."""
    try:
        clear_special_bits(dst, name)
    except OSError as exc:
        os.unlink(name, dir_fd=dst)
        raise PermanentDeliveryError(f"reply {out_id}: cannot clear the setuid/setgid bits "
                                     f"of {name!r} ({exc.strerror})") from None


def _copy_across(src: int, dst: int, name: str, out_id: str) -> None:
    """Another file system: copy the bytes of the file we opened (never a link), under a
    hidden name first, so ``delivered/`` never holds a half-copied file (a full disk
    mid-copy leaves nothing)."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=src)
    except OSError as exc:
        raise PermanentDeliveryError(f"reply {out_id}: cannot open {name!r} "
                                     f"({exc.strerror})") from None
    try:
        regular_or_refuse(os.fstat(fd), name)
        part = f".part-{name}"
        out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o644, dir_fd=dst)
        try:
            with os.fdopen(os.dup(fd), "rb") as r, os.fdopen(out, "wb", closefd=False) as w:
                shutil.copyfileobj(r, w, 1 << 20)
                w.flush()
            os.rename(part, name, src_dir_fd=dst, dst_dir_fd=dst)
        except BaseException:
            try:
                os.unlink(part, dir_fd=dst)
            except OSError:
                pass
            raise
        finally:
            os.close(out)
        os.unlink(name, dir_fd=src)
    except Refused as exc:
        raise PermanentDeliveryError(f"reply {out_id}: {exc.strerror}") from None
    except OSError as exc:
        error = StorageFull if host_storage_failure(exc) else DeliveryError
        raise error(f"reply {out_id}: cannot copy {name!r} ({exc.strerror})") from None
    finally:
        os.close(fd)
