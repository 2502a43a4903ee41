"""Host-side operations on a session's inbound.db (the host is its only writer).

Every function does one transaction on the file it is given. A path is opened and
closed again around it; a session's pass hands its ``safefs.SafeDb``, whose
connection may be kept open between passes (``host.kept_dbs``: checked against the
folder on every use, no lock held between transactions; in rollback-journal mode
SQLite re-validates its cached pages by the file change counter at each one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from orchestrator.contract import schema
from orchestrator.contract.schema import opened, transaction
from orchestrator.rules.messages import NewMessage

if TYPE_CHECKING:
    from orchestrator.contract.schema import DbFile


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    type: str  # channel | agent
    display_name: str | None = None
    channel_type: str | None = None
    platform_id: str | None = None
    agent_group_id: str | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0


def init(path: DbFile) -> list[str]:
    """Create or upgrade; returns the columns an older file was missing."""
    return schema.init_inbound(path)


def next_even_seq(current_max: int | None) -> int:
    """Host seqs are even: 2, 4, 6 … the next even number above the max."""
    m = current_max or 0
    return m + 2 if m % 2 == 0 else m + 1


def insert_message(path: DbFile, msg: NewMessage, now: datetime | None = None, *,
                   destinations: Iterable[Destination] | None = None) -> int:
    """Insert with the next even seq; returns the seq.

    ``series_id`` defaults to the message's own id, as NanoClaw's host sets it: a
    recurring message's later occurrences carry the first one's id. ``destinations``:
    the table rewritten in the same transaction, before the row (a chat new to the
    group: its destination is there before the message that names it; one commit,
    where two were 4 more fsyncs on a brand-new session's way to its first answer).
    """
    json.loads(msg.content)  # the contract says JSON; refuse anything else before writing
    rows = None if destinations is None else _destination_rows(destinations)
    with opened(path) as conn, transaction(conn):
        if rows is not None:
            _replace_destinations(conn, rows)
        return _insert(conn, msg, now)


def _insert(conn: Any, msg: NewMessage, now: datetime | None, *, or_ignore: bool = False
            ) -> int:
    """One row with the next even seq, inside the caller's transaction."""
    ts = schema.format_ts(now or schema.utcnow())
    (cur,) = conn.execute("SELECT MAX(seq) FROM messages_in").fetchone()
    seq = next_even_seq(cur)
    conn.execute(
        f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO messages_in (id, seq, kind, timestamp,"
        " status, process_after, recurrence, series_id, tries, \"trigger\", platform_id,"
        " channel_type, thread_id, content, source_session_id, on_wake)"
        " VALUES (?,?,?,?, 'pending', ?,?,?, 0, ?,?,?,?,?,?,?)",
        (msg.id, seq, msg.kind, ts, msg.process_after, msg.recurrence, msg.series_id or msg.id,
         msg.trigger, msg.platform_id, msg.channel_type, msg.thread_id, msg.content,
         msg.source_session_id, msg.on_wake),
    )
    return seq


FollowUp = Callable[[dict[str, Any]], "NewMessage | None"]


def _follow_up(conn: Any, mid: str, follow_up: FollowUp | None, now: datetime | None
               ) -> None:
    """A row just settled: insert what follows it (a recurring series' next
    occurrence), in the same transaction, at most once (``INSERT OR IGNORE``)."""
    if follow_up is None:
        return
    row = conn.execute("SELECT * FROM messages_in WHERE id=?", (mid,)).fetchone()
    nxt = follow_up(dict(row)) if row is not None else None
    if nxt is not None:
        _insert(conn, nxt, now, or_ignore=True)


def due_state(path: DbFile, now: datetime) -> tuple[int, datetime | None]:
    """(messages due now, earliest future ``process_after``) in one read-only query.

    Called on every pass that may wake an agent, so it is one connection, one scan.
    """
    with opened(path, readonly=True) as conn:
        n, jd = conn.execute(
            "SELECT COALESCE(SUM(process_after IS NULL OR julianday(process_after) <= "
            "julianday(:now)), 0), MIN(CASE WHEN julianday(process_after) > julianday(:now) "
            "THEN julianday(process_after) END) FROM messages_in WHERE status = 'pending' AND "
            "\"trigger\" = 1 AND kind != 'system'", {"now": schema.format_ts(now)}).fetchone()
    return n, (_from_julian(jd) if jd is not None else None)


def oldest_due_at(path: Path, now: datetime) -> datetime | None:
    """When the oldest due message became due: max(written, ``process_after``).

    The admission queue's order (oldest waiting work first). Read once when a
    session joins the queue: no agent runs then, so the answer cannot get older.
    """
    with opened(path, readonly=True) as conn:
        (jd,) = conn.execute(
            "SELECT MIN(MAX(COALESCE(julianday(timestamp), 0), "
            "COALESCE(julianday(process_after), 0))) FROM messages_in WHERE status = 'pending' "
            "AND \"trigger\" = 1 AND kind != 'system' AND (process_after IS NULL OR "
            "julianday(process_after) <= julianday(:now))", {"now": schema.format_ts(now)}
        ).fetchone()
    return _from_julian(jd) if jd else None


DUE_SQL = ("SELECT id FROM messages_in WHERE status = 'pending' AND \"trigger\" = 1 AND "
           "kind != 'system' AND (process_after IS NULL OR julianday(process_after) <= "
           "julianday(?)) ORDER BY seq")


def due_ids(path: DbFile, now: datetime) -> list[str]:
    """The messages ``due_state`` counts as due now (read only)."""
    with opened(path, readonly=True) as conn:
        return [r[0] for r in conn.execute(DUE_SQL, (schema.format_ts(now),))]


def fail_messages(path: DbFile, ids: Iterable[str], now: datetime,
                  follow_up: FollowUp | None = None) -> list[str]:
    """Mark failed those of ``ids`` still pending; returns them.

    For a session whose agent can never be started (``due_ids`` first, their failure
    reported, then this: a crash in between reports again, never loses the record).
    Each failed row gets its ``follow_up`` like in ``settle`` (a series goes on).
    """
    failed: list[str] = []
    with opened(path) as conn, transaction(conn):
        for mid in ids:
            if conn.execute("UPDATE messages_in SET status='failed' WHERE id=? AND "
                            "status='pending'", (mid,)).rowcount:
                failed.append(mid)
                _follow_up(conn, mid, follow_up, now)
    return failed


def count_due(path: Path, now: datetime) -> int:
    return due_state(path, now)[0]


def next_due_at(path: Path, now: datetime | None = None) -> datetime | None:
    """The earliest ``process_after`` still in the future (for a timer)."""
    return due_state(path, now or schema.utcnow())[1]


def _from_julian(jd: float) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=jd - 2440587.5)


def status_counts(path: DbFile, processing_ids: Iterable[str] = ()) -> Counts:
    """Counts by status; ``processing`` = pending rows the agent has claimed."""
    claimed = set(processing_ids)
    with opened(path, readonly=True) as conn:  # for ``status``, which never writes
        rows = conn.execute("SELECT id, status FROM messages_in WHERE kind != 'system'").fetchall()
    pending = processing = completed = failed = 0
    for row in rows:
        st = row["status"]
        if st == "pending":
            if row["id"] in claimed:
                processing += 1
            else:
                pending += 1
        elif st == "completed":
            completed += 1
        elif st == "failed":
            failed += 1
    return Counts(pending, processing, completed, failed)


def settle(path: DbFile, records: Iterable[tuple[str, str, str | None]],
           acks: dict[str, str], follow_up: FollowUp | None = None,
           now: datetime | None = None) -> int:
    """Delivery records (``(message_out_id, status, platform_message_id)``, first
    record wins) and the agent's final acks mirrored into ``messages_in.status``, in
    ONE transaction: a reply and the ack the agent committed with it cost one fsync'd
    commit, not two. Returns the messages_in rows the acks changed.

    ``follow_up(row)`` is called for each row an ack settles, inside the same
    transaction: what it returns (a series' next occurrence) is inserted with it,
    so a crash can never leave a settled row without its successor, or the reverse.
    """
    stamp = schema.format_ts(now or schema.utcnow())
    rows = [(mid, pmid, st, stamp) for mid, st, pmid in records]
    if any(r[2] not in ("delivered", "failed") for r in rows):
        raise ValueError("delivery status must be 'delivered' or 'failed'")
    final = [(st, mid) for mid, st in acks.items() if st in ("completed", "failed")]
    if not rows and not final:
        return 0
    changed = 0
    with opened(path) as conn, transaction(conn):
        if rows:
            conn.executemany(
                "INSERT OR IGNORE INTO delivered (message_out_id, platform_message_id, status,"
                " delivered_at) VALUES (?,?,?,?)", rows)
        for st, mid in final:
            cur = conn.execute(
                "UPDATE messages_in SET status=? WHERE id=?"
                " AND status NOT IN ('completed','failed') AND status != ?", (st, mid, st))
            changed += cur.rowcount
            if cur.rowcount:
                _follow_up(conn, mid, follow_up, now)
    return changed


def retry_delay(tries: int, base: float) -> float:
    """Backoff for a reset claim: ``base × 2^tries`` (tries before this reset)."""
    return base * (2 ** tries)


def claims_to_fail(path: DbFile, ids: Iterable[str], *, max_tries: int,
                   statuses: tuple[str, ...] = ("pending",)) -> list[str]:
    """Which of ``ids`` ``reset_claims`` would turn failed (read only), so their failure
    is reported before the write: a crash in between reports again (the channel knows
    what it has), never loses the record."""
    rows = _rows_for(path, ids, "SELECT id, tries, status FROM messages_in WHERE id IN ({})")
    return [mid for mid, tries, status in rows
            if status in statuses and (tries or 0) + 1 >= max_tries]


def reset_claims(path: DbFile, ids: Iterable[str], *, max_tries: int, backoff_base: float,
                 now: datetime, follow_up: FollowUp | None = None,
                 statuses: tuple[str, ...] = ("pending",)) -> dict[str, str]:
    """Give a dead agent's claims back: pending with backoff, or failed at max_tries.

    Returns {message_id: new status}. Only rows in ``statuses`` change: a claim is
    still ``pending`` here; a message the agent acknowledged ``completed`` but never
    answered is reopened with ``statuses=("completed",)``. A row failed here gets
    its ``follow_up`` like in ``settle`` (at most once: a series' next occurrence
    made when the row first completed is not made again).
    """
    result: dict[str, str] = {}
    with opened(path) as conn, transaction(conn):
        for mid in ids:
            row = conn.execute("SELECT tries, status FROM messages_in WHERE id=?",
                               (mid,)).fetchone()
            if row is None or row["status"] not in statuses:
                continue
            tries = row["tries"] or 0
            if tries + 1 >= max_tries:
                conn.execute("UPDATE messages_in SET tries=?, status='failed' WHERE id=?",
                             (tries + 1, mid))
                _follow_up(conn, mid, follow_up, now)
                result[mid] = "failed"
            else:
                due = schema.after(retry_delay(tries, backoff_base), now)
                conn.execute("UPDATE messages_in SET tries=?, process_after=?, status='pending'"
                             " WHERE id=?", (tries + 1, due, mid))
                result[mid] = "pending"
    return result


def cancel_series(path: DbFile, series_id: str, keep: Iterable[str] = ()) -> tuple[int, int]:
    """End a recurring series: no row of it recurs any more, and its pending rows
    are removed except ``keep`` (those an agent has claimed: they finish, and
    nothing follows them). Returns (rows that recurred, pending rows removed)."""
    kept = list(keep)
    marks = ",".join("?" * len(kept))
    with opened(path) as conn, transaction(conn):
        ended = conn.execute("UPDATE messages_in SET recurrence=NULL WHERE series_id=? AND"
                             " recurrence IS NOT NULL", (series_id,)).rowcount
        removed = conn.execute(
            "DELETE FROM messages_in WHERE series_id=? AND status='pending'"
            + (f" AND id NOT IN ({marks})" if kept else ""), (series_id, *kept)).rowcount
    return ended, removed


def series_state(path: DbFile, series_id: str) -> dict[str, Any]:
    """Counts by status, the next pending due time and whether it still recurs."""
    with opened(path, readonly=True) as conn:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM messages_in WHERE series_id=?"
                                   " GROUP BY status", (series_id,)).fetchall())
        nxt, recurring = conn.execute(
            "SELECT MIN(CASE WHEN status='pending' THEN process_after END),"
            " MAX(recurrence IS NOT NULL) FROM messages_in WHERE series_id=?",
            (series_id,)).fetchone()
    return {"counts": counts, "next": nxt, "recurring": bool(recurring)}


IN_CHUNK = 500  # ids per query: under SQLite's limit on bound parameters


def _rows_for(path: DbFile, ids: Iterable[str], select: str) -> list[tuple]:
    """Rows of ``select`` (its ``IN ({})`` filled with one ``?`` per id) for any number
    of ids, in one read-only open."""
    wanted = list(ids)
    rows: list[tuple] = []
    if not wanted:
        return rows
    with opened(path, readonly=True) as conn:
        for i in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[i:i + IN_CHUNK]
            rows.extend(tuple(r) for r in conn.execute(
                select.format(",".join("?" * len(chunk))), chunk))
    return rows


def triggering(path: DbFile, ids: Iterable[str]) -> set[str]:
    """Which of these messages are work an agent must answer (``trigger=1``, not
    ``system``): only those can be awaiting an answer after their ack."""
    return {r[0] for r in _rows_for(
        path, ids, "SELECT id FROM messages_in WHERE id IN ({}) AND \"trigger\" = 1"
                   " AND kind != 'system'")}


def message_routes(path: DbFile, ids: Iterable[str]) -> dict[str, tuple[str | None, str | None,
                                                                       str | None]]:
    """(channel_type, platform_id, thread_id) of some inbound messages, for a failure record."""
    return {r[0]: (r[1], r[2], r[3]) for r in _rows_for(
        path, ids, "SELECT id, channel_type, platform_id, thread_id FROM messages_in"
                   " WHERE id IN ({})")}


def delivered_ids(path: DbFile, ids: Iterable[str]) -> set[str]:
    """Which of these outbound ids already have a ``delivered`` row (any status)."""
    return {r[0] for r in _rows_for(
        path, ids, "SELECT message_out_id FROM delivered WHERE message_out_id IN ({})")}


def record_delivery(path: Path, message_out_id: str, status: str,
                    platform_message_id: str | None = None, now: datetime | None = None) -> None:
    """Record delivered/failed. First record wins: a reply is settled once."""
    record_deliveries(path, [(message_out_id, status, platform_message_id)], now)


def record_deliveries(path: Path, records: Iterable[tuple[str, str, str | None]],
                      now: datetime | None = None) -> None:
    """Several ``(message_out_id, status, platform_message_id)`` in one transaction."""
    settle(path, records, {}, None, now)


_UPSERT_ROUTING = (
    "INSERT INTO session_routing (id, channel_type, platform_id, thread_id) VALUES (1,?,?,?)"
    " ON CONFLICT(id) DO UPDATE SET channel_type=excluded.channel_type,"
    " platform_id=excluded.platform_id, thread_id=excluded.thread_id")


def set_routing(conn: Any, routing: tuple[str | None, str | None, str | None]) -> None:
    """The session's default reply route (``session_routing``'s one row), inside the
    caller's transaction."""
    conn.execute(_UPSERT_ROUTING, tuple(routing))


def _destination_rows(destinations: Iterable[Destination]) -> list[tuple]:
    return [(d.name, d.display_name, d.type, d.channel_type, d.platform_id, d.agent_group_id)
            for d in destinations]


def _replace_destinations(conn: Any, rows: list[tuple]) -> None:
    conn.execute("DELETE FROM destinations")
    conn.executemany(
        "INSERT INTO destinations (name, display_name, type, channel_type, platform_id,"
        " agent_group_id) VALUES (?,?,?,?,?,?)", rows)


def replace_destinations(path: DbFile, destinations: Iterable[Destination]) -> None:
    """Rewrite the whole table in one transaction (the agent never sees half a set)."""
    rows = _destination_rows(destinations)
    with opened(path) as conn, transaction(conn):
        _replace_destinations(conn, rows)


def sync_routing(path: DbFile, routing: tuple[str | None, str | None, str | None],
                 destinations: Iterable[Destination]) -> bool:
    """The session's default route (``session_routing``, one row) and its
    ``destinations``, in one transaction that writes only what differs from what is
    there; True if it wrote anything.

    Why: it runs before every agent start, on the cold round trip's path, and nearly
    always finds both unchanged; two unconditional write transactions were ~2 ms
    (journal, fsyncs) and two inotify events for the host's own watcher."""
    rows = _destination_rows(destinations)
    changed = False
    with opened(path) as conn, transaction(conn):
        current = conn.execute("SELECT channel_type, platform_id, thread_id FROM session_routing"
                               " WHERE id = 1").fetchone()
        if current is None or tuple(current) != tuple(routing):
            set_routing(conn, routing)
            changed = True
        have = [tuple(r) for r in conn.execute(
            "SELECT name, display_name, type, channel_type, platform_id, agent_group_id"
            " FROM destinations ORDER BY rowid")]
        if have != rows:
            _replace_destinations(conn, rows)
            changed = True
    return changed


def chat_of(path: DbFile, message_id: str) -> tuple[str | None, str | None, str | None] | None:
    """The chat a message came from (channel_type, platform_id, thread_id), or None."""
    with opened(path, readonly=True) as conn:
        row = conn.execute("SELECT channel_type, platform_id, thread_id FROM messages_in"
                           " WHERE id=?", (message_id,)).fetchone()
    return (row[0], row[1], row[2]) if row else None


def read_messages(path: Path) -> list[dict[str, Any]]:
    with opened(path) as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM messages_in ORDER BY seq")]


def read_routing(path: Path) -> dict[str, Any] | None:
    with opened(path) as conn:
        row = conn.execute("SELECT * FROM session_routing WHERE id=1").fetchone()
    return dict(row) if row else None
