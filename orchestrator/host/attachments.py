"""Inbound attachments: base64 in the message content → files in ``inbox/<message_id>/``.

Names come from outside (a chat platform, a CLI user), so they are treated as
hostile: only a basename survives, control characters are replaced, and files
are created with ``O_EXCL | O_NOFOLLOW`` relative to directory fds we opened
ourselves, so neither ``../`` nor a pre-placed symlink can steer a write out of
the session folder. All files of a message are written to a hidden staging
folder first and renamed into place in one step: a refused message leaves
nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator.contract.layout import INBOX, SessionPaths
from orchestrator.support.errors import UserError

MAX_NAME_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_EXTRA = ("name", "data", "path", "localPath", "size")  # an item's keys that are not extras


class AttachmentError(UserError, ValueError):
    """One line, names the attachment and the fix; the whole message is refused."""


@dataclass(frozen=True, slots=True)
class Decoded:
    name: str
    data: bytes
    extra: dict


def safe_name(raw: object, index: int) -> str:
    """A basename that is safe to create inside one folder.

    Separators keep only the last component (``../../x`` → ``x``, ``/etc/passwd`` →
    ``passwd``); NUL and control characters become ``_``; an empty, ``.`` or ``..``
    result becomes ``attachment-<index>``; very long names are cut.
    """
    name = raw if isinstance(raw, str) else ""
    name = _CONTROL.sub("_", name.replace("\\", "/")).rsplit("/", 1)[-1].strip()
    if name in ("", ".", ".."):
        name = f"attachment-{index}"
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        keep = ext if dot and len(ext) <= 16 else ""
        name = encoded[: MAX_NAME_BYTES - len(keep) - 1].decode("utf-8", "ignore") + (
            "." + keep if keep else "")
    return name


def unique_names(names: list[str]) -> list[str]:
    """Two attachments called ``a.png`` become ``a.png`` and ``a-1.png``."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 0
        while candidate in seen:
            n += 1
            stem, dot, ext = name.rpartition(".")
            candidate = f"{stem}-{n}.{ext}" if dot and stem else f"{name}-{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def decode(items: object, max_bytes: int) -> list[Decoded]:
    """Validate and decode ``[{"name": …, "data": <base64>}, …]`` entirely in memory."""
    if not isinstance(items, list):
        raise AttachmentError("content.attachments must be a list of {name, data} objects")
    decoded: list[Decoded] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            raise AttachmentError(
                f"attachment #{i + 1} must be an object with a base64 'data' string")
        label = repr(item.get("name", f"#{i + 1}"))
        # 4 base64 chars carry 3 bytes: refuse oversize before decoding it all
        if len(item["data"]) * 3 // 4 > max_bytes + 3:
            raise AttachmentError(f"attachment {label} is larger than the {max_bytes}-byte "
                                  "limit ([sessions] max_attachment_bytes)")
        try:
            data = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError):
            raise AttachmentError(f"attachment {label} is not valid base64; "
                                  "encode the file with standard base64") from None
        if len(data) > max_bytes:
            raise AttachmentError(f"attachment {label} is larger than the {max_bytes}-byte "
                                  "limit ([sessions] max_attachment_bytes)")
        extra = {k: v for k, v in item.items() if k not in _NOT_EXTRA}
        decoded.append(Decoded(safe_name(item.get("name"), i + 1), data, extra))
    names = unique_names([d.name for d in decoded])
    return [Decoded(n, d.data, d.extra) for n, d in zip(names, decoded, strict=True)]


# Attachments are the host's files for one agent to read: nothing for others. The
# group bits matter only with a uid per session (``host/uids``: the inbox is the
# host's, in the agent's gid); otherwise the agent runs as the host's own uid.
ATTACHMENT_DIR_MODE = 0o750
ATTACHMENT_MODE = 0o640


def _open_dir(path: Path, dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def write_inbox(paths: SessionPaths, message_id: str, files: list[Decoded]) -> list[dict]:
    """Write the files to ``inbox/<message_id>/`` atomically; return content entries.

    The entries replace the base64 in the stored content: ``{"name", "path",
    "localPath", "size"}`` with ``path`` relative to the session folder (valid in a
    container and locally); ``localPath`` is the same, under the name NanoClaw's
    runner reads (it prefixes ``/workspace/``).
    """
    if not files:
        return []
    final_rel = Path(INBOX) / message_id
    staging = f".tmp-{message_id}-{uuid.uuid4().hex[:8]}"
    try:
        root_fd = _open_dir(paths.root)
    except OSError as exc:
        raise AttachmentError(f"{paths.root}: session folder unusable ({exc.strerror})") from None
    try:
        try:
            inbox_fd = _open_dir(Path(INBOX), dir_fd=root_fd)
        except OSError:
            raise AttachmentError(
                f"{paths.inbox} is missing or is a symlink; refusing to write attachments "
                "(remove it; the orchestrator recreates it)") from None
        try:
            name = None
            try:
                os.mkdir(staging, ATTACHMENT_DIR_MODE, dir_fd=inbox_fd)
                stage_fd = _open_dir(Path(staging), dir_fd=inbox_fd)
                try:  # whatever the umask; the inbox's setgid bit (its agent's gid) is kept
                    os.fchmod(stage_fd, ATTACHMENT_DIR_MODE
                              | (os.fstat(inbox_fd).st_mode & stat.S_ISGID))
                    for f in files:
                        name = f.name
                        fd = os.open(f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW | os.O_CLOEXEC, ATTACHMENT_MODE,
                                     dir_fd=stage_fd)
                        with os.fdopen(fd, "wb") as out:
                            os.fchmod(out.fileno(), ATTACHMENT_MODE)
                            out.write(f.data)
                finally:
                    os.close(stage_fd)
            except OSError as exc:  # e.g. disk full: one line, not a traceback
                what = f"attachment {name!r}" if name else "attachments"
                raise AttachmentError(f"cannot write {what} to {paths.inbox} ({exc.strerror}); "
                                      "free space or fix the folder and send again") from None
            try:
                os.rename(staging, message_id, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd)
            except OSError:
                raise AttachmentError(
                    f"{paths.inbox / message_id} already exists; refusing to overwrite it "
                    "(message ids must be new)") from None
        except BaseException:
            shutil.rmtree(paths.inbox / staging, ignore_errors=True)
            raise
        finally:
            os.close(inbox_fd)
    finally:
        os.close(root_fd)
    return [{"name": f.name, "path": str(final_rel / f.name), "localPath": str(final_rel / f.name),
             "size": len(f.data), **f.extra} for f in files]


def remove_inbox(paths: SessionPaths, message_id: str) -> None:
    """Undo ``write_inbox`` when the message row could not be written."""
    target = paths.inbox / message_id
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
