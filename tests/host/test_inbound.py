"""store.inbound on real SQLite files: the host side of inbound.db."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.contract import schema
from orchestrator.host import inbound
from orchestrator.host.inbound import Destination, NewMessage
from tests.support.helpers import journal_mode, open_fds_to, query

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "inbound.db"
    inbound.init(path)
    return path


def msg(mid: str, **kw) -> NewMessage:
    return NewMessage(id=mid, kind=kw.pop("kind", "chat"),
                      content=kw.pop("content", json.dumps({"text": mid})), **kw)


def ts(dt: datetime) -> str:
    return schema.format_ts(dt)


# --- seq ---------------------------------------------------------------------------------

@pytest.mark.parametrize("current, expected", [
    (None, 2), (0, 2), (1, 2), (2, 4), (3, 4), (4, 6), (7, 8), (100, 102), (101, 102),
])
def test_next_even_seq(current, expected):
    assert inbound.next_even_seq(current) == expected


def test_insert_assigns_even_increasing_seqs(db):
    seqs = [inbound.insert_message(db, msg(f"m{i}"), now=NOW) for i in range(5)]
    assert seqs == [2, 4, 6, 8, 10]
    rows = query(db, "SELECT id, seq, status, tries, \"trigger\", on_wake, timestamp "
                     "FROM messages_in ORDER BY seq")
    assert rows == [(f"m{i}", 2 * (i + 1), "pending", 0, 1, 0, "2024-06-01 12:00:00.000")
                    for i in range(5)]


def test_insert_refuses_non_json_content_and_writes_nothing(db):
    with pytest.raises(ValueError):
        inbound.insert_message(db, msg("bad", content="{not json"))
    assert query(db, "SELECT COUNT(*) FROM messages_in") == [(0,)]


def test_insert_duplicate_id_is_refused(db):
    inbound.insert_message(db, msg("m1"))
    with pytest.raises(sqlite3.IntegrityError):
        inbound.insert_message(db, msg("m1"))
    assert query(db, "SELECT id, seq FROM messages_in") == [("m1", 2)]


def test_insert_keeps_all_fields(db):
    inbound.insert_message(db, NewMessage(
        id="m1", kind="task", content='{"a": 1}', process_after="2030-01-01 00:00:00.000",
        trigger=0, platform_id="p", channel_type="c", thread_id="t", series_id="s",
        recurrence="0 * * * *", source_session_id="other", on_wake=1), now=NOW)
    (row,) = inbound.read_messages(db)
    assert row == {
        "id": "m1", "seq": 2, "kind": "task", "timestamp": "2024-06-01 12:00:00.000",
        "status": "pending", "process_after": "2030-01-01 00:00:00.000",
        "recurrence": "0 * * * *", "series_id": "s", "tries": 0, "trigger": 0,
        "platform_id": "p", "channel_type": "c", "thread_id": "t", "content": '{"a": 1}',
        "source_session_id": "other", "on_wake": 1,
    }


def _agent_write_reply(outbound_db, inbound_db, out_id: str) -> int:
    """What an agent does: next odd seq above the max of BOTH tables, plain SQL."""
    with closing(sqlite3.connect(f"{inbound_db.as_uri()}?mode=ro", uri=True)) as ro:
        (max_in,) = ro.execute("SELECT MAX(seq) FROM messages_in").fetchone()
    with closing(sqlite3.connect(outbound_db, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        (max_out,) = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()
        top = max(max_in or 0, max_out or 0)
        seq = top + 1 if top % 2 == 0 else top + 2
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                     "VALUES (?, ?, datetime('now'), 'chat', '{}')", (out_id, seq))
        conn.execute("COMMIT")
    return seq


def test_seq_parity_with_an_interleaving_agent(tmp_path):
    """Host even, agent odd, unique across both tables, each side increasing."""
    in_db, out_db = tmp_path / "inbound.db", tmp_path / "outbound.db"
    inbound.init(in_db)
    schema.init_outbound(out_db)
    # host bursts and agent bursts of different lengths, interleaved
    pattern = "HHAHAAAHHHAHAHHHHAAH"
    host_seqs, agent_seqs, order = [], [], []
    for i, who in enumerate(pattern):
        if who == "H":
            seq = inbound.insert_message(in_db, msg(f"in-{i}"))
            host_seqs.append(seq)
        else:
            seq = _agent_write_reply(out_db, in_db, f"out-{i}")
            agent_seqs.append(seq)
        order.append(seq)
    stored_in = [r[0] for r in query(in_db, "SELECT seq FROM messages_in ORDER BY rowid")]
    stored_out = [r[0] for r in query(out_db, "SELECT seq FROM messages_out ORDER BY rowid")]
    assert stored_in == host_seqs and stored_out == agent_seqs
    assert all(s % 2 == 0 for s in stored_in)
    assert all(s % 2 == 1 for s in stored_out)
    assert len(set(stored_in) | set(stored_out)) == len(pattern)  # unique across both
    assert stored_in == sorted(stored_in) and len(set(stored_in)) == len(stored_in)
    assert stored_out == sorted(stored_out) and len(set(stored_out)) == len(stored_out)
    # every agent seq is above everything written before it (it reads both tables)
    for i, seq in enumerate(order):
        if pattern[i] == "A":
            assert seq > max(order[:i], default=0)
    assert journal_mode(in_db) == journal_mode(out_db) == "delete"


# --- open-write-close: another process sees a write at once ---------------------------------

READER = r"""
import sqlite3, sys
uri = sys.argv[1]
for line in sys.stdin:
    if line.strip() == "quit":
        break
    conn = sqlite3.connect(uri, uri=True)
    n = conn.execute("SELECT COUNT(*) FROM messages_in").fetchone()[0]
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    print(n, mode, flush=True)
"""


def test_host_write_is_visible_at_once_to_another_process(tmp_path):
    db = tmp_path / "inbound.db"
    inbound.init(db)
    reader = subprocess.Popen([sys.executable, "-c", READER, f"{db.as_uri()}?mode=ro"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def ask() -> str:
            reader.stdin.write("count\n")
            reader.stdin.flush()
            return reader.stdout.readline().strip()

        assert ask() == "0 delete"
        for i in range(1, 4):
            inbound.insert_message(db, msg(f"m{i}"))
            # no wait, no retry: the write is committed and closed when insert returns
            assert ask() == f"{i} delete"
            assert open_fds_to(db) == []  # and the host holds no handle on the file
        reader.stdin.write("quit\n")
        reader.stdin.flush()
        assert reader.wait(timeout=30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait()
        reader.stdin.close()
        reader.stdout.close()


def test_no_operation_leaves_a_handle_or_journal(db):
    inbound.insert_message(db, msg("m1"))
    inbound.count_due(db, NOW)
    inbound.next_due_at(db)
    inbound.status_counts(db)
    inbound.settle(db, (), {"m1": "completed"})
    inbound.record_delivery(db, "o1", "delivered")
    inbound.sync_routing(db, ("c", "p", None), [])
    inbound.replace_destinations(db, [Destination("d", "channel")])
    inbound.delivered_ids(db, ["o1"])
    inbound.read_messages(db)
    inbound.read_routing(db)
    assert open_fds_to(db) == []
    assert not db.with_name("inbound.db-journal").exists()
    assert journal_mode(db) == "delete"


# --- due work ---------------------------------------------------------------------------

def test_count_due(db):
    inbound.insert_message(db, msg("plain"))
    inbound.insert_message(db, msg("past", process_after=ts(NOW - timedelta(seconds=1))))
    inbound.insert_message(db, msg("exactly-now", process_after=ts(NOW)))
    inbound.insert_message(db, msg("future", process_after=ts(NOW + timedelta(seconds=1))))
    inbound.insert_message(db, msg("untriggered", trigger=0))
    inbound.insert_message(db, msg("system", kind="system"))
    inbound.insert_message(db, msg("iso-z", process_after="2024-06-01T11:59:00Z"))
    for mid, status in (("done", "completed"), ("bad", "failed"), ("held", "paused")):
        inbound.insert_message(db, msg(mid))
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE messages_in SET status=? WHERE id=?", (status, mid))
    assert inbound.count_due(db, NOW) == 4  # plain, past, exactly-now, iso-z
    assert inbound.count_due(db, NOW + timedelta(seconds=2)) == 5  # + future
    assert inbound.count_due(db, NOW - timedelta(hours=1)) == 1  # only plain


def test_count_due_on_empty_db(db):
    assert inbound.count_due(db, NOW) == 0


def test_next_due_at(db):
    assert inbound.next_due_at(db, NOW) is None
    inbound.insert_message(db, msg("now"))  # no process_after: not a timer
    assert inbound.next_due_at(db, NOW) is None
    later, sooner = NOW + timedelta(minutes=10), NOW + timedelta(minutes=2)
    inbound.insert_message(db, msg("later", process_after=ts(later)))
    inbound.insert_message(db, msg("sys", kind="system", process_after=ts(NOW)))
    inbound.insert_message(db, msg("quiet", trigger=0, process_after=ts(NOW)))
    assert abs(inbound.next_due_at(db, NOW) - later) < timedelta(milliseconds=5)
    inbound.insert_message(db, msg("sooner", process_after=ts(sooner)))
    got = inbound.next_due_at(db, NOW)
    assert got.tzinfo is not None and abs(got - sooner) < timedelta(milliseconds=5)
    inbound.settle(db, (), {"sooner": "completed"})
    assert abs(inbound.next_due_at(db, NOW) - later) < timedelta(milliseconds=5)


def test_oldest_due_at_is_when_the_oldest_due_message_became_due(db):
    assert inbound.oldest_due_at(db, NOW) is None
    written = NOW - timedelta(minutes=5)
    inbound.insert_message(db, msg("future", process_after=ts(NOW + timedelta(seconds=9))),
                           now=written - timedelta(minutes=5))
    inbound.insert_message(db, msg("quiet", trigger=0), now=written - timedelta(minutes=5))
    assert inbound.oldest_due_at(db, NOW) is None  # nothing due yet
    inbound.insert_message(db, msg("plain"), now=written)
    got = inbound.oldest_due_at(db, NOW)
    assert got.tzinfo is not None and abs(got - written) < timedelta(milliseconds=5)
    # written long ago but held back until a minute ago: due since a minute ago
    held = NOW - timedelta(minutes=1)
    inbound.insert_message(db, msg("held", process_after=ts(held)),
                           now=NOW - timedelta(hours=1))
    assert abs(inbound.oldest_due_at(db, NOW) - written) < timedelta(milliseconds=5)
    inbound.settle(db, (), {"plain": "completed"})
    assert abs(inbound.oldest_due_at(db, NOW) - held) < timedelta(milliseconds=5)


def test_status_counts(db):
    for mid in ("a", "b", "c", "d", "e"):
        inbound.insert_message(db, msg(mid))
    inbound.insert_message(db, msg("sys", kind="system"))
    inbound.settle(db, (), {"d": "completed", "e": "failed"})
    assert inbound.status_counts(db) == inbound.Counts(pending=3, processing=0, completed=1,
                                                       failed=1)
    # claimed (processing ack) pending rows count as processing; a claim on a
    # completed row or an unknown id changes nothing
    assert inbound.status_counts(db, ["a", "b", "d", "zzz"]) == inbound.Counts(
        pending=1, processing=2, completed=1, failed=1)


# --- acks -------------------------------------------------------------------------------

def test_settle_mirrors_final_acks(db):
    for mid in ("a", "b", "c", "d"):
        inbound.insert_message(db, msg(mid))
    changed = inbound.settle(db, (), {"a": "completed", "b": "failed", "c": "processing",
                                     "ghost": "completed"})
    assert changed == 2
    assert dict(query(db, "SELECT id, status FROM messages_in")) == {
        "a": "completed", "b": "failed", "c": "pending", "d": "pending"}
    # idempotent, and a settled row is never flipped by a later ack
    assert inbound.settle(db, (), {"a": "completed", "b": "completed", "a2": "failed"}) == 0
    assert dict(query(db, "SELECT id, status FROM messages_in"))["b"] == "failed"
    assert inbound.settle(db, (), {}) == 0
    assert inbound.settle(db, (), {"c": "processing"}) == 0


# --- retries ----------------------------------------------------------------------------

@pytest.mark.parametrize("tries, base, expected", [
    (0, 5.0, 5.0), (1, 5.0, 10.0), (2, 5.0, 20.0), (3, 5.0, 40.0), (4, 5.0, 80.0),
    (0, 0.0, 0.0), (3, 0.5, 4.0),
])
def test_retry_delay(tries, base, expected):
    assert inbound.retry_delay(tries, base) == expected


def test_reset_claims_backs_off_then_fails(db):
    inbound.insert_message(db, msg("m"))
    seen = []
    for _attempt in range(5):
        result = inbound.reset_claims(db, ["m"], max_tries=5, backoff_base=5.0, now=NOW)
        (tries, status, after) = query(
            db, "SELECT tries, status, process_after FROM messages_in WHERE id='m'")[0]
        seen.append((result, tries, status, after))
    expected_delays = [5, 10, 20, 40]
    for i, delay in enumerate(expected_delays):
        assert seen[i] == ({"m": "pending"}, i + 1, "pending",
                           schema.format_due(NOW + timedelta(seconds=delay))), i
    assert seen[4][0] == {"m": "failed"}
    assert seen[4][1:3] == (5, "failed")
    # once failed it is left alone
    assert inbound.reset_claims(db, ["m"], max_tries=5, backoff_base=5.0, now=NOW) == {}
    assert query(db, "SELECT tries FROM messages_in") == [(5,)]


def test_reset_claims_makes_the_row_not_due_until_backoff(db):
    inbound.insert_message(db, msg("m"))
    inbound.reset_claims(db, ["m"], max_tries=5, backoff_base=5.0, now=NOW)
    assert inbound.count_due(db, NOW) == 0
    assert inbound.count_due(db, NOW + timedelta(seconds=4.9)) == 0
    assert inbound.count_due(db, NOW + timedelta(seconds=5)) == 1


def test_reset_claims_max_tries_one_fails_immediately(db):
    inbound.insert_message(db, msg("m"))
    assert inbound.reset_claims(db, ["m"], max_tries=1, backoff_base=5.0, now=NOW) == {
        "m": "failed"}


def test_reset_claims_skips_settled_and_unknown_rows(db):
    for mid in ("done", "live"):
        inbound.insert_message(db, msg(mid))
    inbound.settle(db, (), {"done": "completed"})
    result = inbound.reset_claims(db, ["done", "live", "ghost"], max_tries=5, backoff_base=1.0,
                                  now=NOW)
    assert result == {"live": "pending"}
    assert dict(query(db, "SELECT id, tries FROM messages_in")) == {"done": 0, "live": 1}


# --- delivered ----------------------------------------------------------------------------

def test_record_delivery_is_idempotent_first_wins(db):
    inbound.record_delivery(db, "o1", "delivered", "plat-1", now=NOW)
    inbound.record_delivery(db, "o1", "delivered", "plat-2", now=NOW + timedelta(hours=1))
    inbound.record_delivery(db, "o1", "failed", None, now=NOW + timedelta(hours=2))
    assert query(db, "SELECT * FROM delivered") == [
        ("o1", "plat-1", "delivered", "2024-06-01 12:00:00.000")]
    inbound.record_delivery(db, "o2", "failed", now=NOW)
    assert query(db, "SELECT message_out_id, status FROM delivered ORDER BY 1") == [
        ("o1", "delivered"), ("o2", "failed")]


def test_delivered_ids_handles_many_ids(db):
    for i in range(0, 1200, 3):
        inbound.record_delivery(db, f"o{i}", "delivered", now=NOW)
    asked = [f"o{i}" for i in range(1200)]
    assert inbound.delivered_ids(db, asked) == {f"o{i}" for i in range(0, 1200, 3)}
    assert inbound.delivered_ids(db, []) == set()
    assert inbound.delivered_ids(db, iter(["o3", "nope"])) == {"o3"}


# --- routing and destinations -----------------------------------------------------------

def test_sync_routing_upserts_one_row(db):
    assert inbound.read_routing(db) is None
    inbound.sync_routing(db, ("slack", "C1", "T1"), [])
    assert inbound.read_routing(db) == {"id": 1, "channel_type": "slack", "platform_id": "C1",
                                        "thread_id": "T1"}
    inbound.sync_routing(db, ("cli", "local", None), [])
    assert query(db, "SELECT * FROM session_routing") == [(1, "cli", "local", None)]


def test_replace_destinations_rewrites_the_whole_table(db):
    inbound.replace_destinations(db, [Destination("a", "channel", "A", "slack", "C1"),
                                      Destination("b", "agent", agent_group_id="g2")])
    assert query(db, "SELECT * FROM destinations ORDER BY name") == [
        ("a", "A", "channel", "slack", "C1", None), ("b", None, "agent", None, None, "g2")]
    inbound.replace_destinations(db, [Destination("c", "channel")])
    assert query(db, "SELECT name FROM destinations") == [("c",)]
    inbound.replace_destinations(db, [])
    assert query(db, "SELECT COUNT(*) FROM destinations") == [(0,)]


def test_replace_destinations_is_one_transaction(db):
    """A failing new set leaves the old set whole: never a half-written table."""
    inbound.replace_destinations(db, [Destination("old1", "channel"), Destination("old2", "agent")])
    with pytest.raises(sqlite3.IntegrityError):
        inbound.replace_destinations(db, [Destination("new", "channel"),
                                          Destination("new", "channel")])  # duplicate key
    assert query(db, "SELECT name FROM destinations ORDER BY name") == [("old1",), ("old2",)]


def change_counter(db) -> int:
    """SQLite's file change counter (header bytes 24-27): +1 per committed write."""
    with open(db, "rb") as fh:
        return int.from_bytes(fh.read(28)[24:28], "big")


A, B = Destination("a", "channel", "A", "slack", "C1"), Destination("b", "agent", agent_group_id="g2")


@pytest.mark.parametrize("routing,dests,written", [
    (("slack", "C1", "T1"), [A, B], False),  # as before: nothing written
    (("slack", "C1", None), [A, B], True),  # the route changed
    (("slack", "C1", "T1"), [A], True),  # a destination went
    (("slack", "C1", "T1"), [B, A], True),  # the same set in another order is rewritten
    ((None, None, None), [], True),
])
def test_sync_routing_writes_only_what_changed(db, routing, dests, written):
    """Before every agent start: unchanged routing and destinations cost no write (no
    journal, no fsync, no event for the host's watcher), changed ones are written
    whole, in one transaction."""
    assert inbound.sync_routing(db, ("slack", "C1", "T1"), [A, B]) is True  # a new folder
    before = change_counter(db)
    assert inbound.sync_routing(db, routing, dests) is written
    assert change_counter(db) == before + written  # one transaction, or none
    assert query(db, "SELECT channel_type, platform_id, thread_id FROM session_routing") == [
        routing]
    assert query(db, "SELECT name, display_name, type, channel_type, platform_id, agent_group_id"
                     " FROM destinations ORDER BY rowid") == [
        (d.name, d.display_name, d.type, d.channel_type, d.platform_id, d.agent_group_id)
        for d in dests]


def test_reset_claims_reopens_acked_but_unanswered_messages(db):
    """An agent acked ``completed`` but went before answering: the message is reopened
    (pending, tries+1, backoff) only when asked for completed rows, never by default."""
    inbound.insert_message(db, msg("m"))
    inbound.settle(db, (), {"m": "completed"})
    assert inbound.reset_claims(db, ["m"], max_tries=5, backoff_base=5.0, now=NOW) == {}
    assert inbound.reset_claims(db, ["m"], max_tries=5, backoff_base=5.0, now=NOW,
                                statuses=("completed",)) == {"m": "pending"}
    assert query(db, "SELECT status, tries, process_after FROM messages_in") == [
        ("pending", 1, "2024-06-01 12:00:05")]


def test_triggering_is_work_that_needs_an_answer(db):
    inbound.insert_message(db, msg("work"))
    inbound.insert_message(db, msg("context", trigger=0))
    inbound.insert_message(db, msg("answer", kind="system"))
    assert inbound.triggering(db, ["work", "context", "answer", "ghost"]) == {"work"}
    assert inbound.triggering(db, []) == set()


def test_series_id_defaults_to_the_message_id(db):
    """NanoClaw's host sets series_id = id; an explicit one (a later occurrence) is kept."""
    inbound.insert_message(db, msg("first"))
    inbound.insert_message(db, msg("again", series_id="first"))
    assert query(db, "SELECT id, series_id FROM messages_in ORDER BY seq") == [
        ("first", "first"), ("again", "first")]


@pytest.mark.parametrize("max_tries,statuses,expected", [
    (5, ("pending",), []),  # first resets: given back
    (1, ("pending",), ["live", "worn"]),
    (1, ("completed",), ["done"]),
    (3, ("pending",), ["worn"]),  # two tries already: the third fails it
])
def test_claims_to_fail_is_what_reset_claims_then_fails(db, max_tries, statuses, expected):
    """Read before the write, so the failure is reported first: it must name exactly
    the rows ``reset_claims`` turns failed."""
    for mid in ("done", "live", "worn"):
        inbound.insert_message(db, msg(mid))
    inbound.settle(db, (), {"done": "completed"})
    with schema.opened(db) as conn, schema.transaction(conn):
        conn.execute("UPDATE messages_in SET tries=2 WHERE id='worn'")
    ids = ["done", "live", "worn", "ghost"]
    assert inbound.claims_to_fail(db, ids, max_tries=max_tries, statuses=statuses) == expected
    result = inbound.reset_claims(db, ids, max_tries=max_tries, backoff_base=1.0, now=NOW,
                                  statuses=statuses)
    assert sorted(m for m, st in result.items() if st == "failed") == expected


def test_fail_messages_fails_only_rows_still_pending(db):
    for mid in ("a", "b", "c"):
        inbound.insert_message(db, msg(mid))
    inbound.settle(db, (), {"b": "completed"})
    assert inbound.due_ids(db, NOW) == ["a", "c"]
    assert inbound.fail_messages(db, ["a", "b", "ghost"], NOW) == ["a"]
    assert dict(query(db, "SELECT id, status FROM messages_in")) == {
        "a": "failed", "b": "completed", "c": "pending"}
