"""``Idempotency-Key`` for ``POST /v1/messages``: a retried POST returns the first
result and writes nothing again.

Keys live in the registry (``orchestrator.db``, table ``api_idempotency``) for at
least ``KEEP`` (48 h; the promise is 24 h), pruned at start-up and then by the
writes themselves, at most once per ``PRUNE_EVERY`` (a long-running orchestrator
would otherwise keep every key it was ever sent). A key is written *before* the message,
with the message id chosen for it, and marked done after: a crash in between leaves
a pending key whose retry writes the same message id again — refused by inbound.db's
primary key if the first write did land — so a retried POST can never write twice.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from loguru import logger

from orchestrator.contract.schema import format_ts

KEEP = timedelta(hours=48)
PRUNE_EVERY = 600.0  # seconds between prunes, on the write path
MAX_KEY = 200

DDL = """
CREATE TABLE IF NOT EXISTS api_idempotency (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, message_id TEXT NOT NULL,
    session_id TEXT, done INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS idx_api_idempotency_created ON api_idempotency(created_at);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    fingerprint: str
    message_id: str
    session_id: str | None
    done: bool


def check_key(key: str) -> str | None:
    """One-line error for an unusable key, or None."""
    if not key or len(key) > MAX_KEY or not key.isascii() or not key.isprintable():
        return f"Idempotency-Key must be 1-{MAX_KEY} printable ASCII characters"
    return None


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class IdempotencyKeys:
    def __init__(self, registry_db: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._conn = sqlite3.connect(str(registry_db), isolation_level=None, timeout=10,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # as the registry (WAL): durable
        self._lock = threading.Lock()  # API requests call in from worker threads
        self._ready = False  # the table exists (durable across crashes, not power loss)
        self._clock = clock
        self._pruned_at = clock()
        try:
            self.prune()
        except sqlite3.Error as exc:  # e.g. a full disk at start-up: serve all the same;
            logger.warning("idempotency keys in {}: {}; keyed POSTs fail until it "
                           "clears", registry_db, exc)  # each keyed call tries again

    def _table(self) -> None:
        if not self._ready:
            self._conn.executescript(DDL)
            self._ready = True

    def get(self, key: str) -> Entry | None:
        with self._lock:
            self._table()
            row = self._conn.execute("SELECT fingerprint, message_id, session_id, done FROM "
                                     "api_idempotency WHERE key=?", (key,)).fetchone()
        return Entry(row[0], row[1], row[2], bool(row[3])) if row else None

    def begin(self, key: str, fp: str, message_id: str) -> None:
        if self._clock() - self._pruned_at >= PRUNE_EVERY:
            self.prune()
        with self._lock:
            self._table()
            self._conn.execute("INSERT OR IGNORE INTO api_idempotency (key, fingerprint,"
                               " message_id, created_at) VALUES (?,?,?,?)",
                               (key, fp, message_id, format_ts(datetime.now(timezone.utc))))

    def finish(self, key: str, session_id: str) -> None:
        with self._lock:
            self._table()
            self._conn.execute("UPDATE api_idempotency SET done=1, session_id=? WHERE key=?",
                               (session_id, key))

    def prune(self) -> None:
        cutoff = format_ts(datetime.now(timezone.utc) - KEEP)
        self._pruned_at = self._clock()
        with self._lock:
            self._table()
            self._conn.execute("DELETE FROM api_idempotency WHERE created_at < ?", (cutoff,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
