"""Shared by the retention tests: sessions that are settled (nothing pending, every reply
delivered) and old, made on real files as a finished conversation leaves them."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from orchestrator.contract.layout import session_paths
from orchestrator.host import inbound
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup, Sessions

OLD = "2020-01-01 00:00:00.000"


def settled_session(sessions: Sessions, reg: Registry, data: Path, platform: str = "p",
                    group: str = "g", payload: int = 0) -> str:
    """A stopped session with one message answered and its reply delivered; ``payload``
    bytes of random data in ``notes/blob`` (what an agent might leave behind)."""
    s = sessions.resolve(group, MessagingGroup("cli", platform), None, "shared")
    mid, _ = sessions.write_message(s, {"text": "hello"})
    paths = session_paths(data, group, s.id)
    with sqlite3.connect(paths.inbound_db) as c:
        c.execute("UPDATE messages_in SET status='completed' WHERE id=?", (mid,))
    c.close()
    with sqlite3.connect(paths.outbound_db) as c:
        c.execute("CREATE TABLE IF NOT EXISTS messages_out (id TEXT PRIMARY KEY, seq INTEGER,"
                  " timestamp TEXT, kind TEXT, content TEXT)")
        c.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                  " VALUES ('out-1', 3, '2026-01-01 00:00:00', 'chat', '{\"text\":\"hi\"}')")
    c.close()
    inbound.record_delivery(paths.inbound_db, "out-1", "delivered")
    reg.set_container_status(s.id, "stopped", "test")
    if payload:
        (paths.root / "notes").mkdir()
        (paths.root / "notes" / "blob").write_bytes(os.urandom(payload))
    return s.id


def age(reg: Registry, session_ids: list[str], when: str = OLD) -> None:
    """Their last activity long ago (as if untouched for years)."""
    with reg.transaction() as c:
        c.executemany("UPDATE sessions SET created_at=?, last_active=NULL,"
                      " last_heartbeat=NULL WHERE id=?", [(when, s) for s in session_ids])
