"""Retention's journal in the registry (``removals``, registry migration 5).

A session is taken out of the registry and written into the journal in **one**
transaction (``begin``): from that commit on, nothing of the orchestrator sees it as
a session any more (``session_index``, ``session``, a ``send`` by its chat), while
the journal row holds every registry row it had, as JSON. Its folder is then moved
out of ``sessions/``, archived, removed; ``finish`` drops the journal row last. A
crash anywhere leaves the journal row, and the next start finishes the removal or
undoes it (``host.retention.recover``): ``undo`` puts the rows back from the JSON.

The JSON is also what an archive carries as ``registry.json`` (``restore_rows`` puts
it back into a registry, possibly a fresh one).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from orchestrator.contract.schema import format_ts, utcnow
from orchestrator.host.registry import Registry

# the tables that hold a session's rows, keyed by its id (``session_state`` and
# ``delivery_attempts`` are caches of a live session: dropped, never restored)
KEPT_TABLES = ("sessions", "status_changes", "agent_settings", "agent_runs", "series")
DROPPED_TABLES = ("session_state", "delivery_attempts")


@dataclass(frozen=True, slots=True)
class Pending:
    """A journal row: a removal under way (or cut short by a crash)."""

    session_id: str
    agent_group_id: str
    action: str  # "archive" | "delete"
    rows: dict[str, Any]


def _key(table: str) -> str:
    return "id" if table == "sessions" else "session_id"


def begin(registry: Registry, session_id: str, action: str) -> Pending | None:
    """Journal the removal and take the session's rows out, in one transaction. None if
    the session is not in the registry (already removed, or never there)."""
    return begin_many(registry, [(session_id, action)])[0]


def begin_many(registry: Registry, asked: list[tuple[str, str]]) -> list[Pending | None]:
    """``begin`` for a batch of (session id, action), all in **one** transaction and a
    few statements per table for the whole batch (not per session): the registry's
    write lock, which live sessions' writes wait for, is held for a handful of
    statements. Each session is still journalled whole or not at all: the journal row
    and the row deletes commit together."""
    ids = list(dict.fromkeys(sid for sid, _ in asked))
    marks = ",".join("?" * len(ids))
    now = format_ts(utcnow())
    with registry.transaction() as c:
        snaps: dict[str, dict[str, Any]] = {sid: {"format": 1} for sid in ids}
        for table in KEPT_TABLES:
            for snap in snaps.values():
                snap[table] = []
            for r in c.execute(f"SELECT * FROM {table} WHERE {_key(table)} IN ({marks})",
                               ids):
                snaps[r[_key(table)]][table].append(dict(r))
        chats = {r[0]: [r[1], r[2]] for r in c.execute(
            "SELECT id, channel_type, platform_id FROM messaging_groups WHERE id IN"
            " (SELECT messaging_group_id FROM sessions WHERE id IN (" + marks + "))", ids)}
        found = [sid for sid in ids if snaps[sid]["sessions"]]
        for sid in found:
            mg = snaps[sid]["sessions"][0]["messaging_group_id"]
            if mg:
                snaps[sid]["messaging_group"] = chats.get(mg)
        actions = dict(reversed(asked))  # the first action asked for an id
        c.executemany("INSERT INTO removals (session_id, agent_group_id, action, rows,"
                      " started_at) VALUES (?,?,?,?,?)",
                      [(sid, snaps[sid]["sessions"][0]["agent_group_id"], actions[sid],
                        json.dumps(snaps[sid], separators=(",", ":")), now) for sid in found])
        if found:
            fmarks = ",".join("?" * len(found))
            for table in KEPT_TABLES + DROPPED_TABLES:
                c.execute(f"DELETE FROM {table} WHERE {_key(table)} IN ({fmarks})", found)
    out: list[Pending | None] = []
    first = set()
    for sid, _ in asked:
        snap = snaps[sid]
        if not snap["sessions"] or sid in first:
            out.append(None)  # not there (or asked twice: the first one takes it)
            continue
        first.add(sid)
        out.append(Pending(sid, snap["sessions"][0]["agent_group_id"], actions[sid], snap))
    return out


def pending(registry: Registry) -> list[Pending]:
    """Every removal the journal holds (at start: those a crash cut short)."""
    with registry.transaction() as c:
        rows = c.execute("SELECT session_id, agent_group_id, action, rows FROM removals"
                         " ORDER BY started_at, session_id").fetchall()
    return [Pending(r[0], r[1], r[2], json.loads(r[3])) for r in rows]


def pending_count(registry: Registry) -> int:
    with registry.transaction() as c:
        return int(c.execute("SELECT COUNT(*) FROM removals").fetchone()[0])


def finish(registry: Registry, session_ids: list[str]) -> None:
    """The removals are complete: their journal rows go, and the API's idempotency keys
    that point at them (same file, ``api.idempotency``), in one transaction."""
    ids = [(s,) for s in session_ids]
    with registry.transaction() as c:
        c.executemany("DELETE FROM removals WHERE session_id=?", ids)
        if c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND"
                     " name='api_idempotency'").fetchone():
            c.executemany("DELETE FROM api_idempotency WHERE session_id=?", ids)


def undo(registry: Registry, p: Pending) -> None:
    """Put the session's rows back and drop the journal row, in one transaction."""
    with registry.transaction() as c:
        _insert_rows(c, p.rows)
        c.execute("DELETE FROM removals WHERE session_id=?", (p.session_id,))


def restore_rows(registry: Registry, rows: dict[str, Any]) -> str:
    """An archive's ``registry.json`` back into the registry (``sessions restore``).
    A chat that has started a new session since keeps it: the restored one is then
    reachable by its id only (its resolution key is renamed). Returns the session id."""
    with registry.transaction() as c:
        _insert_rows(c, rows)
    return rows["sessions"][0]["id"]


def _insert_rows(c: sqlite3.Connection, rows: dict[str, Any]) -> None:
    now = format_ts(utcnow())
    session = dict(rows["sessions"][0])
    c.execute("INSERT OR IGNORE INTO agent_groups (id, name, created_at) VALUES (?,?,?)",
              (session["agent_group_id"], session["agent_group_id"], now))
    chat = rows.get("messaging_group")
    if session.get("messaging_group_id") and chat:
        c.execute("INSERT OR IGNORE INTO messaging_groups (id, channel_type, platform_id,"
                  " created_at) VALUES (?,?,?,?)",
                  (session["messaging_group_id"], chat[0], chat[1], now))
        found = c.execute("SELECT id FROM messaging_groups WHERE channel_type=? AND"
                          " platform_id=?", (chat[0], chat[1])).fetchone()
        session["messaging_group_id"] = found[0]
    taken = c.execute("SELECT id FROM sessions WHERE resolution_key=?",
                      (session["resolution_key"],)).fetchone()
    if taken is not None and taken[0] != session["id"]:
        session["resolution_key"] = f"restored:{session['id']}"
    session["container_status"] = "stopped"  # no agent can have survived the archive
    for table in KEPT_TABLES:
        for row in ([session] if table == "sessions" else rows.get(table, [])):
            cols = [k for k in row if k in _columns(c, table)]
            c.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES"
                      f" ({', '.join('?' * len(cols))})", [row[k] for k in cols])


def _columns(c: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
