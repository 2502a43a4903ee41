"""Secret files (the API token, the webhook key): created once with mode 0600, read
without following a symlink, never logged.

Both are read at start-up only. A file someone else can read is refused rather than
used: the token is the only thing between the network and every session.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable


class SecretFileError(ValueError):
    """One line naming the file and the fix."""


def _reason(exc: OSError) -> str:
    """The OS's reason, lower case ("permission denied"); strerror is None for some."""
    return (exc.strerror or str(exc)).lower()


def ensure_secret(path: Path, new: Callable[[], str] = lambda: secrets.token_urlsafe(32)
                  ) -> str:
    """The secret in ``path``; a new random one (mode 0600, made by ``new``) if the file
    is missing."""
    try:
        return read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = new()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # created meanwhile (another process): use that one
        return read_secret(path)
    except OSError as exc:
        raise SecretFileError(f"{path}: cannot create ({_reason(exc)})") from None
    try:
        os.write(fd, (value + "\n").encode("ascii"))
        os.fsync(fd)
    except OSError as exc:  # a full disk: leave no empty or torn secret behind
        path.unlink(missing_ok=True)
        raise SecretFileError(f"{path}: cannot write ({_reason(exc)})") from None
    finally:
        os.close(fd)
    return value


def read_secret(path: Path) -> str:
    """Raises FileNotFoundError if missing, SecretFileError if unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretFileError(f"{path}: cannot read ({exc.strerror}; it must be a regular "
                              "file, not a symlink)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise SecretFileError(f"{path}: readable by others (mode {mode:o}); "
                                  f"run: chmod 600 {path}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    value = data.decode("utf-8", "replace").strip()
    if not value:
        raise SecretFileError(f"{path}: empty; put a secret in it or delete it to have one made")
    return value
