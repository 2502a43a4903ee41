"""``orchestrator backup DEST``: a consistent copy of the host's SQLite stores, live.

The host-side SQLite files under the data dir (``STORES``) are the registry
(``orchestrator.db``: agent and messaging groups, sessions and their statuses, the
status log, delivery attempts, series, destinations, the session uid map, the API's
idempotency keys, the start-up state) and the event log (``events.db``). Each is
copied with SQLite's online backup API in one step: one read transaction, so the
copy is the file as of one commit, and — both run in WAL mode — ``run`` keeps
writing meanwhile (a backup of a 10 000-session registry takes well under a second
and never blocks a delivery record). The copy is a single self-contained file
(rollback journal, not WAL), ``quick_check``-ed, written under a temporary name and
renamed into place, 0600; ``backup.json`` lists what was copied with each file's
schema version (``schema_version``).

Everything else a data dir holds is plain files, copied as files (README, "Operating
it"): the session folders (each agent's ``inbound.db``/``outbound.db`` belong to the
folder contract, not to the host), ``delivered/``, the jsonl channel's file,
``logs/``, ``local-agents/``, the API token and webhook keys.

This runs in its own process (``orchestrator backup``), never on ``run``'s event loop.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.contract.layout import REGISTRY_DB
from orchestrator.host.private import make_dirs, private_file, sync_dir
from orchestrator.host.schema_version import version_of
from orchestrator.support.errors import UserError

EVENTS_DB = "events.db"
STORES = (REGISTRY_DB, EVENTS_DB)  # every host-side SQLite file under the data dir
MANIFEST = "backup.json"


class BackupError(UserError):
    """One line, exit code 2."""


@dataclass(frozen=True, slots=True)
class Copied:
    name: str
    path: str  # the copy
    bytes: int
    schema_version: int
    seconds: float


def backup(data_dir: Path, dest: Path, *, version: str = "") -> list[Copied]:
    """Copy every store that exists into ``dest`` (created 0700; it must not hold a
    copy already) and write its manifest. Returns what was copied."""
    found = [name for name in STORES if (data_dir / name).is_file()]
    if not found:
        raise BackupError(f"{data_dir}: no {' or '.join(STORES)} to back up (is this the "
                          "data dir? check data_dir in the config)")
    try:
        make_dirs(dest)
    except OSError as exc:
        raise BackupError(f"{dest}: cannot create the backup folder ({exc.strerror})") from None
    for name in found + [MANIFEST]:
        if os.path.lexists(dest / name):
            raise BackupError(f"{dest / name} exists: back up into a new or empty folder")
    copied = [_copy(data_dir / name, dest / name) for name in found]
    manifest = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "orchestrator": version, "data_dir": str(data_dir),
                "files": [asdict(c) for c in copied]}
    tmp = dest / f".{MANIFEST}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest / MANIFEST)
    sync_dir(dest)
    return copied


def _copy(source: Path, target: Path) -> Copied:
    started = time.monotonic()
    tmp = target.with_name(f".{target.name}.partial")
    for leftover in (tmp, Path(f"{tmp}-journal")):
        if os.path.lexists(leftover):
            os.unlink(leftover)
    private_file(tmp)
    try:
        src = sqlite3.connect(f"{Path(os.path.abspath(source)).as_uri()}?mode=ro", uri=True,
                              timeout=30)
        try:
            dst = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                src.backup(dst)  # pages=-1: all in one step, one read transaction
                dst.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
                problem = dst.execute("PRAGMA quick_check").fetchone()[0]
                if problem != "ok":
                    raise BackupError(f"{source}: the copy fails its check ({problem})")
                schema = version_of(dst)
            finally:
                dst.close()
        finally:
            src.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except sqlite3.Error as exc:
        _unlink(tmp)
        raise BackupError(f"{source}: cannot back it up ({exc})") from None
    except BaseException:
        _unlink(tmp)
        raise
    return Copied(source.name, str(target), target.stat().st_size, schema,
                  round(time.monotonic() - started, 3))


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


