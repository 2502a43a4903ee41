"""Start-up state: which sessions a restart may skip, and real restarts that prove it.

The decision (``start_pass_reason``, ``settled``) is table-tested; the rest runs
on real session folders, a real registry and real orchestrator restarts: a
session whose files changed while the orchestrator was down — a reply written,
a message sent, a heartbeat, a file replaced by one with the same size and
mtime — gets its full pass (and the reply is delivered); an unchanged one is
skipped; a missing or stale saved row means a full pass.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.contract.layout import registry_path
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import DeliveryState
from orchestrator.engine.startup_state import (
    StateBook,
    scan_group,
    settled,
    start_pass_reason,
    state_text,
)
from orchestrator.engine.tracked import Tracked
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import open_group
from orchestrator.rules.lifecycle import Claim
from tests.support.e2e import Client, make_config, replies, replies_to, supervised
from tests.support.helpers import until

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
SIGS = {"hb": None, "out": (1, 2, 3), "in": (4, 5, 6)}
TEXT = state_text((7, 8), SIGS)


# --- the decisions ----------------------------------------------------------------------


@pytest.mark.parametrize("saved, now, adopted, before, reason", [
    (TEXT, TEXT, False, "stopped", None),
    (TEXT, TEXT, True, "stopped", "agent adopted"),
    (TEXT, TEXT, False, "running", "was running"),
    (TEXT, TEXT, False, "idle", "was idle"),
    (None, TEXT, False, "stopped", "no saved state"),
    (TEXT, None, False, "stopped", "folder not checked"),
    (TEXT, state_text((7, 8), SIGS | {"hb": (9, 0, 10)}), False, "stopped", "changed on disk"),
    (TEXT, state_text((7, 9), SIGS), False, "stopped", "changed on disk"),  # new folder
    (TEXT, state_text((7, 8), SIGS | {"in": (4, 5, 99)}), False, "stopped",
     "changed on disk"),  # a replaced inbound.db: same mtime and size, new inode
    ("garbage from an older version", TEXT, False, "stopped", "changed on disk"),
])
def test_start_pass_reason(saved, now, adopted, before, reason) -> None:
    assert start_pass_reason(saved, now, adopted, before) == reason


def _settled_tracked(**changes) -> Tracked:
    t = Tracked("g", "s", None)  # type: ignore[arg-type]  (paths are not read)
    t.read.identity = ((7, 8), 3, 6)
    t.read.sigs = dict(SIGS)
    for name, value in changes.items():  # "record.field" for a field of one of its records
        *records, field = name.split(".")
        owner = t
        for record in records:
            owner = getattr(owner, record)
        setattr(owner, field, value)
    return t


@pytest.mark.parametrize("changes, alive, expected", [
    ({}, False, True),
    ({}, True, False),  # an agent runs
    ({"status": Status.RUNNING}, False, False),
    ({"status": Status.IDLE}, False, False),
    ({"evidence.due": 1}, False, False),
    ({"evidence.next_inbound_due": NOW}, False, False),  # a message with process_after later
    ({"delivery_due": NOW}, False, False),  # a reply to retry or deliver later
    ({"timer.at": NOW}, False, False),
    ({"evidence.claims": (Claim("m1", NOW),)}, False, False),
    ({"read.busy": 1}, False, False),
    ({"start.failures": 2}, False, False),
    ({"start.blocked_until": NOW}, False, False),
    ({"read.identity": None}, False, False),  # never passed
    ({"read.sigs": {"out": (1, 2, 3), "in": (4, 5, 6)}}, False, False),  # a file never read
    ({"read.sigs": {}}, False, False),  # cleared by a failed pass
])
def test_settled(changes, alive, expected) -> None:
    assert settled(_settled_tracked(**changes), alive) is expected


def test_not_settled_while_files_wait_or_a_pass_fails() -> None:
    waiting = _settled_tracked(delivery=DeliveryState(waiting_files={"r1": NOW}))
    assert not settled(waiting, False)
    failing = _settled_tracked()
    failing.said.say("pass", "database disk image is malformed")
    assert not settled(failing, False)


# --- the book and the scan ----------------------------------------------------------------


def test_the_book_writes_in_batches_and_a_later_note_wins(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "orchestrator.db")
    book = StateBook(reg)
    a, b = _settled_tracked(session_id="a"), _settled_tracked(session_id="b")
    book.note(a, False)
    book.note(b, False)
    assert reg.saved_states() == {}  # nothing written per pass
    assert book.flush() == 2
    assert reg.saved_states() == {"a": TEXT, "b": TEXT}
    book.note(a, False)
    assert book.flush() == 0  # unchanged: not written again
    book.note(a, True)  # an agent started: the row goes …
    book.note(a, False)  # … and comes back before the flush: the last note wins
    book.note(b, True)
    book.flush()
    assert reg.saved_states() == {"a": TEXT}
    assert StateBook(reg).saved == {"a": TEXT}  # what the next run starts from
    reg.close()


def test_a_save_that_fails_keeps_the_rows_and_says_so_once(tmp_path: Path) -> None:
    from loguru import logger

    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    reg = Registry(tmp_path / "orchestrator.db")
    book = StateBook(reg)
    book.note(_settled_tracked(session_id="a"), False)
    reg.close()  # every write now fails, as on a full disk
    try:
        book.save()
        book.save()
    finally:
        logger.remove(handler)
    assert len(lines) == 1 and "could not save the sessions' start-up state" in lines[0]
    assert book.saved == {}
    reg = Registry(tmp_path / "orchestrator.db")
    book.registry = reg
    book.save()  # the disk is back: the kept row is written
    assert reg.saved_states() == {"a": TEXT}
    reg.close()


def test_a_registry_from_before_opens_with_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.db"
    Registry(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE session_state")  # as the previous version left it:
        conn.execute("PRAGMA user_version = 0")  # no such table, no schema version
    reg = Registry(path)
    assert reg.saved_states() == {}
    reg.save_states({"s": TEXT})
    assert reg.saved_states() == {"s": TEXT}
    reg.close()


def test_scan_sees_files_by_inode_and_never_through_a_link(tmp_path: Path) -> None:
    group = tmp_path / "sessions" / "g"
    (group / "s1").mkdir(parents=True)
    (group / "s1" / "inbound.db").write_bytes(b"x" * 10)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "inbound.db").write_bytes(b"y")
    (group / "linked").symlink_to(tmp_path / "elsewhere")
    fd = open_group(tmp_path, "g")
    try:
        first = scan_group(fd, "g", ["s1", "linked", "missing"])
        assert set(first) == {"s1"}
        assert first["s1"].sigs["hb"] is None and first["s1"].sigs["out"] is None
        # replaced by a copy with the same bytes and mtime: only the inode differs
        old = group / "s1" / "inbound.db"
        st = old.stat()
        shutil.copyfile(old, group / "s1" / "new")
        os.utime(group / "s1" / "new", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(group / "s1" / "new", old)
        second = scan_group(fd, "g", ["s1"])
    finally:
        os.close(fd)
    assert second["s1"].sigs["in"][:2] == first["s1"].sigs["in"][:2]
    assert second["s1"].text() != first["s1"].text()


# --- real restarts ------------------------------------------------------------------------


def _add_reply(db: Path, out_id: str, seq: int) -> None:
    """What an agent does: one reply row, committed."""
    with schema.opened(db) as conn, schema.transaction(conn):
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                     " VALUES (?,?,?, 'chat', ?)",
                     (out_id, seq, schema.now_ts(), json.dumps({"text": f"reply {out_id}"})))


def _replace_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    tmp = path.with_name(path.name + ".copy")
    shutil.copyfile(path, tmp)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    new = path.stat()
    assert (new.st_size, new.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert new.st_ino != st.st_ino


async def _first_run(cfg, client: Client, rows: dict) -> None:
    """A run that passes every session once and saves their state at shutdown."""
    async with supervised(cfg):
        await until(lambda: set(client.registry.saved_states()) >= {r.id for r in rows.values()},
                    message="every settled session saved")


async def test_a_restart_skips_unchanged_sessions_and_passes_changed_ones(
        tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path)
    client = Client(cfg)
    names = ("same", "reply", "message", "beat", "replaced")
    rows = {n: client.session(n) for n in names}
    paths = {n: client.paths(r) for n, r in rows.items()}
    for p in paths.values():
        schema.init_outbound(p.outbound_db)  # as an agent that ran once leaves it
    await _first_run(cfg, client, rows)

    # the orchestrator is down: agents and senders go on
    _add_reply(paths["reply"].outbound_db, "late-reply", 1)
    _, mid = client.send("message", "sent while the host was down")
    paths["beat"].heartbeat.touch()
    _replace_keeping_size_and_mtime(paths["replaced"].outbound_db)

    async with supervised(cfg) as sup:
        skipped = {n: sup.tracked[r.id].restored for n, r in rows.items()}
        assert skipped == {"same": True, "reply": False, "message": False, "beat": False,
                           "replaced": False}
        await until(lambda: any(r["message_id"] == "late-reply" for r in replies(cfg)),
                    message="the reply written while the host was down, delivered")
        await until(lambda: replies_to(cfg, mid), message="the message sent meanwhile answered")
        # the skipped session still answers: its first pass is a full one
        _, later = client.send("same", "after the restart")
        await until(lambda: replies_to(cfg, later), message="the skipped session answers")
    client.close()


async def test_a_missing_or_stale_row_means_a_full_pass(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    client = Client(cfg)
    rows = {n: client.session(n) for n in ("kept", "missing", "stale")}
    await _first_run(cfg, client, rows)
    reg = Registry(registry_path(cfg.data_dir))
    reg.save_states({rows["missing"].id: None, rows["stale"].id: "0:0|-|-|-"})
    reg.close()
    async with supervised(cfg) as sup:
        assert {n: sup.tracked[r.id].restored for n, r in rows.items()} == {
            "kept": True, "missing": False, "stale": False}
    # that full pass saved them again: the next start skips all three
    async with supervised(cfg) as sup:
        assert all(sup.tracked[r.id].restored for r in rows.values())
    client.close()
