"""The committed sessions.example/ still follows the session-folder contract, and
scripts/make_example.py still produces the same rows.

The contract's column lists are written out here from docs/contract.md, so a
schema change that is not reflected in the example (or vice versa) fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.contract.layout import validate_id
from tests.support.helpers import REPO, journal_mode, table_columns, tables

TREE = REPO / "sessions.example"

INBOUND = {
    "messages_in": ["id", "seq", "kind", "timestamp", "status", "process_after", "recurrence",
                    "series_id", "tries", "trigger", "platform_id", "channel_type", "thread_id",
                    "content", "source_session_id", "on_wake"],
    "delivered": ["message_out_id", "platform_message_id", "status", "delivered_at"],
    "destinations": ["name", "display_name", "type", "channel_type", "platform_id",
                     "agent_group_id"],
    "session_routing": ["id", "channel_type", "platform_id", "thread_id"],
}
OUTBOUND = {
    "messages_out": ["id", "seq", "in_reply_to", "timestamp", "deliver_after", "recurrence",
                     "kind", "platform_id", "channel_type", "thread_id", "content"],
    "processing_ack": ["message_id", "status", "status_changed"],
    "session_state": ["key", "value", "updated_at"],
    "container_state": ["id", "current_tool", "tool_declared_timeout_ms", "tool_started_at",
                        "updated_at"],
}
SESSION_ENTRIES = {"inbound.db", "outbound.db", ".heartbeat", "inbox", "outbox"}


def session_dirs(tree: Path = TREE) -> list[Path]:
    return sorted(p for g in tree.iterdir() if g.is_dir() for p in g.iterdir())


def rows(db: Path, sql: str) -> list[dict]:
    with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql)]


def dump(db: Path) -> list[str]:
    with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        return list(conn.iterdump())


SESSIONS = session_dirs()
ids = [f"{p.parent.name}/{p.name}" for p in SESSIONS]


def test_tree_shape():
    assert (TREE / "README.md").is_file()
    groups = [p for p in TREE.iterdir() if p.is_dir()]
    assert [g.name for g in groups] == ["main"]  # one agent group
    assert len(SESSIONS) == 2  # two sessions
    for group in groups:
        validate_id(group.name, "agent group")
    for s in SESSIONS:
        validate_id(s.name, "session id")


@pytest.mark.parametrize("sdir", SESSIONS, ids=ids)
def test_session_folder_holds_only_contract_files(sdir):
    names = {p.name for p in sdir.iterdir()}
    assert {"inbound.db", "outbound.db"} <= names
    assert names <= SESSION_ENTRIES, names - SESSION_ENTRIES  # no -journal, -wal, stray files
    for p in sdir.rglob("*"):
        assert not p.is_symlink(), p
    for box in ("inbox", "outbox"):
        folder = sdir / box
        if not folder.exists():  # git keeps no empty folders
            continue
        for msg_dir in folder.iterdir():
            assert msg_dir.is_dir() and not msg_dir.name.startswith(".tmp-"), msg_dir
            validate_id(msg_dir.name, "message id")
            for f in msg_dir.iterdir():
                assert f.is_file(), f  # files only, one level deep


@pytest.mark.parametrize("sdir", SESSIONS, ids=ids)
def test_schemas_are_exactly_the_contract(sdir):
    for db, contract in ((sdir / "inbound.db", INBOUND), (sdir / "outbound.db", OUTBOUND)):
        assert tables(db) == set(contract), db
        for table, columns in contract.items():
            assert table_columns(db, table) == columns, (db, table)
        assert journal_mode(db) == "delete", db


@pytest.mark.parametrize("sdir", SESSIONS, ids=ids)
def test_seq_parity_and_uniqueness(sdir):
    ins = [r["seq"] for r in rows(sdir / "inbound.db", "SELECT seq FROM messages_in")]
    outs = [r["seq"] for r in rows(sdir / "outbound.db", "SELECT seq FROM messages_out")]
    assert ins and all(s % 2 == 0 and s > 0 for s in ins)
    assert all(s % 2 == 1 for s in outs)
    assert len(set(ins) | set(outs)) == len(ins) + len(outs)


@pytest.mark.parametrize("sdir", SESSIONS, ids=ids)
def test_inbound_rows(sdir):
    acks = {r["message_id"]: r["status"]
            for r in rows(sdir / "outbound.db", "SELECT * FROM processing_ack")}
    for m in rows(sdir / "inbound.db", "SELECT * FROM messages_in"):
        assert m["status"] in ("pending", "completed", "failed", "paused")
        assert m["trigger"] in (0, 1) and m["on_wake"] in (0, 1)
        assert schema.parse_ts(m["timestamp"]).utcoffset().total_seconds() == 0
        content = json.loads(m["content"])
        assert isinstance(content, dict)
        if acks.get(m["id"]) in ("completed", "failed"):
            assert m["status"] == acks[m["id"]]  # the host has mirrored the final ack
        for entry in content.get("attachments", []):
            assert "data" not in entry  # files, not base64, are stored
            rel = Path(entry["path"])
            assert not rel.is_absolute() and ".." not in rel.parts
            assert rel.parts[:2] == ("inbox", m["id"])
            target = (sdir / rel).resolve()
            assert target.is_relative_to(sdir.resolve())
            assert target.is_file() and target.stat().st_size == entry["size"]
            assert target.name == entry["name"]
    for routing in rows(sdir / "inbound.db", "SELECT * FROM session_routing"):
        assert routing["id"] == 1
    for d in rows(sdir / "inbound.db", "SELECT * FROM destinations"):
        assert d["type"] in ("channel", "agent")


@pytest.mark.parametrize("sdir", SESSIONS, ids=ids)
def test_outbound_rows_and_outbox(sdir):
    out = {r["id"]: r for r in rows(sdir / "outbound.db", "SELECT * FROM messages_out")}
    delivered = {r["message_out_id"]: r
                 for r in rows(sdir / "inbound.db", "SELECT * FROM delivered")}
    in_ids = {r["id"] for r in rows(sdir / "inbound.db", "SELECT id FROM messages_in")}
    assert set(delivered) <= set(out)
    for d in delivered.values():
        assert d["status"] in ("delivered", "failed")
        schema.parse_ts(d["delivered_at"])
    for r in out.values():
        assert r["in_reply_to"] in in_ids
        schema.parse_ts(r["timestamp"])
        files = json.loads(r["content"]).get("files", [])
        box = sdir / "outbox" / r["id"]
        if r["id"] in delivered:
            assert not box.exists()  # delivered replies have their outbox removed
        elif files:
            assert sorted(os.listdir(box)) == sorted(files)
    if (sdir / "outbox").exists():
        assert {p.name for p in (sdir / "outbox").iterdir()} <= set(out) - set(delivered)
    for ack in rows(sdir / "outbound.db", "SELECT * FROM processing_ack"):
        assert ack["status"] in ("processing", "completed", "failed")
        assert ack["message_id"] in in_ids


def test_every_part_of_the_contract_is_shown():
    """Across the tree, every file kind and every table has an example."""
    assert any((s / ".heartbeat").is_file() for s in SESSIONS)
    assert any(f.is_file() for s in SESSIONS for f in s.glob("inbox/*/*"))
    assert any(f.is_file() for s in SESSIONS for f in s.glob("outbox/*/*"))
    for db_name, contract in (("inbound.db", INBOUND), ("outbound.db", OUTBOUND)):
        for table in contract:
            total = sum(len(rows(s / db_name, f"SELECT 1 FROM {table}")) for s in SESSIONS)
            assert total > 0, f"{db_name} {table} has no example row"


def test_readme_explains_every_file_and_table():
    text = (TREE / "README.md").read_text(encoding="utf-8")
    for name in ("inbound.db", "outbound.db", ".heartbeat", "inbox/", "outbox/",
                 "journal_mode=DELETE", *INBOUND, *OUTBOUND):
        assert f"`{name}" in text or name in text, name
    for table, columns in {**INBOUND, **OUTBOUND}.items():
        assert f"**`{table}`**" in text, table
        for column in columns:
            assert f"`{column}`" in text, (table, column)
    for s in SESSIONS:
        assert s.name in text


def test_make_example_reproduces_the_committed_rows(tmp_path):
    """Run the generator into a temp folder: same files, same bytes, same rows."""
    spec = importlib.util.spec_from_file_location("make_example",
                                                  REPO / "scripts" / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "example"
    assert module.main(["--out", str(out)]) == 0

    def files(root: Path) -> dict[str, Path]:
        return {p.relative_to(root).as_posix(): p for p in root.rglob("*")
                if p.is_file() and p.name != "README.md"}

    fresh, committed = files(out), files(TREE)
    assert sorted(fresh) == sorted(committed)
    for rel, path in fresh.items():
        if rel.endswith(".db"):
            assert dump(path) == dump(committed[rel]), rel
        else:
            assert path.read_bytes() == committed[rel].read_bytes(), rel
    # the generated tree, checked for the empty folders git does not keep
    for sdir in session_dirs(out):
        assert (sdir / "inbox").is_dir() and (sdir / "outbox").is_dir()
