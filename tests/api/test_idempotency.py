"""Idempotency keys on a real registry file: kept for ``KEEP``, and pruned by the
write path while the orchestrator runs (not only at start-up)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.api.idempotency import KEEP, PRUNE_EVERY, IdempotencyKeys
from orchestrator.contract.schema import format_ts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backdate(db: Path, key: str) -> None:
    old = format_ts(datetime.now(timezone.utc) - KEEP - KEEP / 10)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE api_idempotency SET created_at=? WHERE key=?", (old, key))


def test_expired_keys_are_pruned_by_writes_while_running(tmp_path: Path) -> None:
    db, clock = tmp_path / "orchestrator.db", Clock()
    keys = IdempotencyKeys(db, clock=clock)
    keys.begin("old", "fp", "m-1")
    keys.finish("old", "s-1")
    backdate(db, "old")

    clock.now += PRUNE_EVERY / 2  # too soon: a write does not scan the table every time
    keys.begin("fresh-1", "fp", "m-2")
    assert keys.get("old") is not None

    clock.now += PRUNE_EVERY
    keys.begin("fresh-2", "fp", "m-3")
    assert keys.get("old") is None
    assert keys.get("fresh-1") is not None and keys.get("fresh-2") is not None
    keys.close()


def test_a_key_younger_than_keep_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "orchestrator.db"
    keys = IdempotencyKeys(db)
    keys.begin("k", "fp", "m-1")
    keys.finish("k", "s-1")
    keys.close()
    again = IdempotencyKeys(db)  # prunes at start-up: the key is within KEEP
    entry = again.get("k")
    assert entry is not None and (entry.message_id, entry.session_id, entry.done) == (
        "m-1", "s-1", True)
    again.close()
