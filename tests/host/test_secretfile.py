"""secretfile: created 0600 once, read without following links, never group-readable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.host.secretfile import SecretFileError, ensure_secret, read_secret


def test_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "token"
    first = ensure_secret(path)
    assert (path.stat().st_mode & 0o777) == 0o600 and len(first) >= 32
    assert ensure_secret(path) == first == read_secret(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_secret(tmp_path / "none")


@pytest.mark.parametrize("setup, fragment", [
    ("readable", "readable by others"), ("empty", "empty"), ("symlink", "symlink"),
    ("fifo", "not a regular file"),
])
def test_unusable_files_are_refused(tmp_path: Path, setup: str, fragment: str) -> None:
    path = tmp_path / "token"
    if setup == "readable":
        path.write_text("abc")
        path.chmod(0o644)
    elif setup == "empty":
        path.write_text("  \n")
        path.chmod(0o600)
    elif setup == "symlink":
        target = tmp_path / "real"
        target.write_text("abc")
        target.chmod(0o600)
        path.symlink_to(target)
    else:
        os.mkfifo(path, 0o600)
    with pytest.raises(SecretFileError, match=fragment):
        ensure_secret(path)


def test_a_full_disk_is_a_storage_error_and_leaves_no_empty_file(tmp_path: Path) -> None:
    from tests.support.mounts import fill, tmpfs

    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        with pytest.raises(SecretFileError) as caught:
            ensure_secret(disk / "token")
        assert "cannot" in str(caught.value) and "\n" not in str(caught.value)
        assert not (disk / "token").exists()

