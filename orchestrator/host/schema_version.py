"""Schema versions of the host's own SQLite stores: ordered migrations, ``user_version``.

The registry (``orchestrator.db``) and the event store (``events.db``) each carry
their schema version in SQLite's ``PRAGMA user_version`` (the file's header, 0 in a
file from before versions). A store's migrations are a list: migration ``k`` takes
the file from version ``k - 1`` to ``k``, runs in its own transaction together with
the new version number, and is written so that it also holds on a file from before
versions (``CREATE TABLE IF NOT EXISTS``, a column added only when missing) — those
files are at version 0 whatever columns they already have. So an upgrade is: open
the file with the new code. A crash in a migration leaves the last version that
committed, and the next open goes on from there.

A file whose version is higher than the code knows was written by a newer version
of this project: it is refused (``SchemaTooNew``, one line naming the file, both
versions and the fix) rather than read with a wrong idea of its columns, and
nothing in it is changed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable, Sequence

from orchestrator.contract.schema import transaction
from orchestrator.support.errors import UserError

Migration = Callable[[sqlite3.Connection], None]


class SchemaTooNew(UserError):
    """A store written by a newer version of the orchestrator: one line, exit code 2."""


def version_of(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def too_new(path: Path | str, found: int, known: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"{path}: schema version {found} is newer than this orchestrator knows ({known}): "
        "it was written by a newer version; run that version (or newer), or restore a "
        "backup made by this one (README: Operating it)")


def check(conn: sqlite3.Connection, path: Path | str, migrations: Sequence[Migration]) -> int:
    """The file's version; ``SchemaTooNew`` when it is newer than ``migrations`` reach.
    Reads only (for read-only opens)."""
    found = version_of(conn)
    if found > len(migrations):
        raise too_new(path, found, len(migrations))
    return found


def migrate(conn: sqlite3.Connection, path: Path | str,
            migrations: Sequence[Migration]) -> int:
    """Bring the file to the newest version, one migration per transaction (with its
    version number); returns the version it had. Refuses a newer file unchanged. Two
    processes opening the same old file at once: each step re-reads the version
    inside its write transaction, so each migration runs once."""
    before = check(conn, path, migrations)
    for target in range(before + 1, len(migrations) + 1):
        with transaction(conn) as c:
            now = version_of(c)
            if now >= target:  # another process did it meanwhile
                continue
            migrations[target - 1](c)
            c.execute(f"PRAGMA user_version = {int(target)}")
    return before


def add_column(conn: sqlite3.Connection, table: str, column: str, declaration: str) -> None:
    """``ALTER TABLE ADD COLUMN`` unless the column is there (a file from before versions
    may have it already)."""
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    if column not in have:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def script(sql: str) -> Migration:
    """A migration made of DDL statements (run one by one: ``executescript`` would
    commit the migration's transaction)."""
    statements = [s.strip() for s in sql.split(";") if s.strip()]

    def run(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return run
