"""Start-up state: which sessions a restart may skip, and real restarts that prove it.

The decision (``start_pass_reason``, ``settled``) is table-tested; the rest runs
on real session folders, a real registry and real orchestrator restarts: a
session whose files changed while the orchestrator was down — a reply written,
a message sent, a heartbeat, a file replaced by one with the same size and
mtime — gets its full pass (and the reply is delivered); an unchanged one is
skipped; a missing or stale saved row means a full pass.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.contract.layout import registry_path, sessions_root
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import DeliveryState
from orchestrator.engine.discovery import FREEZE_FROM, settle_heap
from orchestrator.engine.startup_state import (
    StateBook,
    as_saved,
    changed,
    files_text,
    recheck,
    restore,
    settled,
    start_pass_reason,
    state_text,
)
from orchestrator.engine.tracked import FRESH_NS, Tracked, TrackedMap, trusted_stamp
from orchestrator.host import inbound
from orchestrator.host.filesig import file_signature
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import open_group
from orchestrator.host.sessions import create_folder
from orchestrator.rules.lifecycle import Claim
from orchestrator.rules.messages import NewMessage
from orchestrator.watch import start_walk, watcher
from orchestrator.watch.activity import RESCAN
from orchestrator.watch.head_start import HeadStart
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


@pytest.mark.parametrize("status", [s.value for s in Status])
def test_a_saved_row_alone_is_skipped_exactly_when_stopped(status: str) -> None:
    """What ``discovery._track_index`` compares inline, row by row."""
    assert (start_pass_reason(TEXT, TEXT, False, status) is None) == (status == "stopped")


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


def _row_now(folder: Path, stamped: bool = True) -> str:
    """The row a full pass of ``folder`` would save now (its stamp trusted: old enough)."""
    st = os.lstat(folder)
    sigs = {k: file_signature(folder / name) for k, name in
            (("hb", ".heartbeat"), ("out", "outbound.db"), ("in", "inbound.db"))}
    stamp = (st.st_mtime_ns, st.st_ctime_ns) if stamped else None
    return state_text((st.st_dev, st.st_ino), sigs, stamp)


@pytest.mark.parametrize("age_ns, trusted", [
    (FRESH_NS, True), (10 * FRESH_NS, True), (FRESH_NS - 1, False), (0, False), (-5, False)])
def test_a_stamp_is_trusted_once_old_enough(age_ns: int, trusted: bool) -> None:
    now = 5_000_000_000_000
    times = (now - age_ns - 7, now - age_ns)  # the later of the two decides
    assert (trusted_stamp(times, now) is not None) is trusted


def _commit(db: Path, journal: str) -> None:
    """One write to a session database, as a writer with ``journal_mode`` does it."""
    conn = sqlite3.connect(db)
    try:
        conn.execute(f"PRAGMA journal_mode={journal}")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
    finally:
        conn.close()


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


@pytest.mark.parametrize("change, verdict", [
    # (what happened to the folder while the host was down, what the start-up check says)
    ("nothing", "same row"),
    ("heartbeat touched", "changed"),  # in place: the folder's times stay
    ("heartbeat created", "changed"),
    ("commit, journal", "changed"),  # the -journal came and went: folder times moved
    ("commit, journal, folder mtime put back", "changed"),  # its ctime still moved
    ("scratch file came and went", "new stamp"),  # the files are as saved
    ("row without a stamp", "new stamp"),  # (saved by an older version: four fields)
    ("commit without a journal", "same row"),  # against the contract: left to the sweep
    ("folder replaced", "changed"),
])
def test_recheck(tmp_path: Path, change: str, verdict: str) -> None:
    group = tmp_path / "sessions" / "g"
    folder = group / "s"
    folder.mkdir(parents=True)
    _commit(folder / "inbound.db", "DELETE")
    _commit(folder / "outbound.db", "DELETE")
    if change == "heartbeat touched":
        (folder / ".heartbeat").touch()
    row = _row_now(folder)
    if change == "row without a stamp":
        row = files_text(*_split_row(row))
    st = os.lstat(folder)
    if change == "heartbeat touched":
        _touch_later(folder / ".heartbeat")
    elif change == "heartbeat created":
        (folder / ".heartbeat").touch()
    elif change.startswith("commit, journal"):
        _commit(folder / "inbound.db", "DELETE")
        if "put back" in change:
            os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "scratch file came and went":
        (folder / "scratch").touch()
        (folder / "scratch").unlink()
    elif change == "commit without a journal":
        _commit(folder / "inbound.db", "MEMORY")
    elif change == "folder replaced":
        shutil.copytree(folder, group / "s2")
        shutil.rmtree(folder)
        (group / "s2").rename(folder)
    fd = open_group(tmp_path, "g")
    try:
        now = recheck(fd, "s", row)
        swept = changed(fd, "s", row)
    finally:
        os.close(fd)
    got = ("changed" if now is None else "same row" if now == row else "new stamp")
    assert got == verdict
    if verdict == "new stamp":  # the same files; a stamp this fresh is not trusted yet
        assert now == files_text(*_split_row(row)) + "|-"
    # the sweep compares the databases themselves: a commit without a journal too
    assert swept is (change not in ("nothing", "scratch file came and went",
                                    "row without a stamp", "heartbeat touched",
                                    "heartbeat created"))


def _split_row(row: str) -> tuple[tuple[int, int], dict]:
    t = restore(Tracked("g", "s", None), row)  # type: ignore[arg-type]
    assert t.read.identity is not None
    return t.read.identity[0], t.read.sigs


def test_a_dormant_row_wakes_when_touched_and_only_then() -> None:
    woken: list[str] = []

    def wake(group: str, sid: str, row: str) -> Tracked:
        woken.append(sid)
        return restore(Tracked(group, sid, None), row)  # type: ignore[arg-type]

    m = TrackedMap()
    m.wake = wake
    m["awake"] = Tracked("g", "awake", None)  # type: ignore[arg-type]
    m.rest("d1", "g", TEXT)
    m.rest("d2", "g", "garbage")
    assert len(m) == 3 and "d1" in m and "nope" not in m and sorted(m) == ["awake", "d1", "d2"]
    assert list(m.keys()) == ["awake"] and m.statuses() == ["stopped"] * 3
    assert woken == []  # none of that woke anything
    t = m["d1"]
    assert woken == ["d1"] and t.restored and t.read.sigs == SIGS
    assert t.read.identity == ((7, 8), 3, 6) and m.get("d1") is t and "d1" not in m.dormant
    fresh = m.get("d2")  # a row that does not parse: a new Tracked, read from scratch
    assert fresh is not None and not fresh.restored and fresh.read.identity is None
    assert m.get("nope") is None and m.pop("nope") is None
    m.rest("d3", "g", TEXT)
    assert m.pop("d3") is None and "d3" not in m and woken == ["d1", "d2"]
    with pytest.raises(KeyError):
        m["d3"]


def test_recheck_sees_files_by_inode_and_never_through_a_link(tmp_path: Path) -> None:
    group = tmp_path / "sessions" / "g"
    (group / "s1").mkdir(parents=True)
    (group / "s1" / "inbound.db").write_bytes(b"x" * 10)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "inbound.db").write_bytes(b"y")
    (group / "linked").symlink_to(tmp_path / "elsewhere")
    fd = open_group(tmp_path, "g")
    try:
        row = _row_now(group / "s1")
        assert recheck(fd, "s1", row) == row
        assert recheck(fd, "linked", _row_now(tmp_path / "elsewhere")) is None
        assert recheck(fd, "missing", row) is None
        # replaced by a copy with the same bytes and mtime: only the inode differs
        _replace_keeping_size_and_mtime(group / "s1" / "inbound.db")
        assert recheck(fd, "s1", row) is None
    finally:
        os.close(fd)


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


def _send_without_journal(db: Path, mid: str, text: str) -> None:
    """A message committed the way the contract forbids (``journal_mode=MEMORY``: no
    ``-journal`` file comes and goes), so the session folder's times stay."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=MEMORY")
        conn.execute("BEGIN IMMEDIATE")
        inbound._insert(conn, NewMessage(id=mid, kind="chat", content=json.dumps({"text": text}),
                                         channel_type="cli", platform_id="local"), None)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def _aged(folders: list[Path]) -> None:
    """Until no folder changed for ``FRESH_NS``."""
    await until(lambda: all(time.time_ns() - max(_times(f)) >= FRESH_NS for f in folders),
                timeout=10, message="the folders left alone long enough to stamp")


def _times(folder: Path) -> tuple[int, int]:
    st = os.lstat(folder)
    return st.st_mtime_ns, st.st_ctime_ns


async def test_a_message_written_while_down_to_a_dormant_session(tmp_path: Path,
                                                                 reap_agents) -> None:
    """Whether or not the folder's mtime moved: a message sent while the host was down
    is answered. Put back by hand, the mtime hides nothing (the ctime still moved: a
    full pass at start-up); written without a journal, the folder's times stay, the
    start-up check keeps it dormant, and the sweep — which compares the databases
    themselves — finds the message."""
    cfg = make_config(tmp_path, watch={"sweep_interval": 0.2, "dormant_sweep_interval": 0.8})
    client = Client(cfg)
    rows = {n: client.session(n) for n in ("put_back", "no_journal", "quiet")}
    paths = {n: client.paths(r) for n, r in rows.items()}
    for p in paths.values():
        schema.init_outbound(p.outbound_db)
    await _first_run(cfg, client, rows)
    # the stamps a pass saves are of folders left alone for a while (``trusted_stamp``)
    await _aged([p.root for p in paths.values()])
    async with supervised(cfg):  # its start-up check saves each row with the stamp seen
        pass
    assert all(not row.endswith("|-") for row in client.registry.saved_states().values())

    folder = paths["put_back"].root
    st = os.lstat(folder)
    _, sent = client.send("put_back", "sent while down, the folder's mtime put back")
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _times(folder)[0] == st.st_mtime_ns and _times(folder)[1] != st.st_ctime_ns
    before = _times(paths["no_journal"].root)
    _send_without_journal(paths["no_journal"].inbound_db, "m-no-journal", "no journal")
    assert _times(paths["no_journal"].root) == before

    async with supervised(cfg) as sup:
        dormant = set(sup.rows.dormant)
        assert rows["put_back"].id not in dormant
        assert {rows["no_journal"].id, rows["quiet"].id} <= dormant
        await until(lambda: replies_to(cfg, sent), message="the message answered")
        await until(lambda: replies_to(cfg, "m-no-journal"),
                    message="the journal-less message found by the sweep, answered")
        assert rows["quiet"].id in sup.rows.dormant  # swept, unchanged: never woken
        sup._on_activity([RESCAN])  # a loss sign: the rows compared, in slices
        await until(lambda: sup._rescan is not None and sup._rescan.done(),
                    message="the dormant rows rescanned")
        assert rows["quiet"].id in sup.rows.dormant
    client.close()


async def test_a_change_after_the_head_start_took_its_lstat_is_not_missed(
        tmp_path: Path, reap_agents, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch built ahead (``watch.head_start``) took each folder's ``lstat`` just
    after its watch; the start-up check trusts it, so a message sent after that
    ``lstat`` and before the check is known only by its event: its mark must stay
    (a pass) and not go as one the check has seen."""
    monkeypatch.setattr(start_walk, "CHILD_FROM", 1)  # every group's adds in the child
    cfg = make_config(tmp_path)
    client = Client(cfg)
    rows = {n: client.session(n) for n in ("late", "quiet")}
    for r in rows.values():
        schema.init_outbound(client.paths(r).outbound_db)
    await _first_run(cfg, client, rows)
    await _aged([client.paths(r).root for r in rows.values()])
    async with supervised(cfg):  # rows saved with their folders' stamps: one lstat each
        pass
    assert all(not row.endswith("|-") for row in client.registry.saved_states().values())

    root = sessions_root(cfg.data_dir)
    head = HeadStart.begin(root, cfg.watch, watcher.limits())
    assert head is not None
    head._thread.join()  # every watch added and every folder's lstat taken
    _, sent = client.send("late", "sent after the head start's lstat")
    async with supervised(cfg, head_start=head) as sup:
        await until(lambda: replies_to(cfg, sent), message="the late message answered")
        assert rows["quiet"].id in sup.rows.dormant  # checked by its lstat: still dormant
    client.close()


async def test_folders_made_before_and_after_the_childs_listing_are_both_registered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up's look for folders nobody registered (a ``send`` in another
    process, a folder mounted in) takes a big group's names from the head start's
    child (``HeadStart.listed``) instead of listing it again: one made before that
    listing is in it, one made after has its event (the group was watched first)."""
    monkeypatch.setattr(start_walk, "CHILD_FROM", 1)  # every group's adds in the child
    cfg = make_config(tmp_path)
    client = Client(cfg)
    row = client.session("quiet")
    await _first_run(cfg, client, {"quiet": row})
    create_folder(cfg.data_dir, row.agent_group_id, "mounted-before")
    head = HeadStart.begin(sessions_root(cfg.data_dir), cfg.watch, watcher.limits())
    assert head is not None
    head._thread.join()  # the group listed by the child, every watch added
    create_folder(cfg.data_dir, row.agent_group_id, "mounted-after")
    given: list[dict] = []
    listed = head.listed
    monkeypatch.setattr(head, "listed", lambda: given.append(listed()) or given[-1])
    async with supervised(cfg, head_start=head) as sup:
        await until(lambda: {"mounted-before", "mounted-after"} <= set(sup.tracked),
                    message="both folders registered")
        assert row.id in sup.rows.dormant
    assert given and "mounted-before" in given[0][row.agent_group_id]
    assert "mounted-after" not in given[0][row.agent_group_id]
    client.close()


def _records(*modes: int) -> array.array:
    out = array.array("q")
    for mode in modes:
        out.extend((1, 0, 0, mode, 0, 0, 0))
    return out


@pytest.mark.parametrize("row, values, texts, sure", [
    ("7:8|-|o|i|5:6", _records(0o40755), (["7:8"], ["5:6"]), {"s"}),
    ("7:8|1:2:3|o|i|5:6", _records(0o40755), (["7:8"], ["5:6"]), set()),  # a heartbeat
    ("7:8|-|o|i|5:7", _records(0o40755), (["7:8"], ["5:6"]), set()),  # its stamp moved
    ("7:9|-|o|i|5:6", _records(0o40755), (["7:8"], ["5:6"]), set()),  # another folder
    ("7:8|-|o|i|-", _records(0o40755), (["7:8"], ["5:6"]), set()),  # no stamp saved
    ("7:8|-|o|i|5:6", _records(0o100644), (["7:8"], ["5:6"]), set()),  # not a folder
    ("7:8|-|o|i|5:6", _records(0o40755), ([], []), set()),  # no texts: by itself
    ("7:8|-|o|i|5:6", _records(0o40755, 0o40755), (["7:8"], ["5:6"]), set()),  # not whole
])
def test_a_whole_group_is_compared_with_the_childs_lstats_at_once(
        row: str, values: array.array, texts: tuple, sure: set) -> None:
    assert as_saved({"s": ("g", row)}, values, {"s": 0}, texts) == sure
    # a session that is not dormant is never taken for one
    assert as_saved({}, values, {"s": 0}, texts) == set()


@pytest.mark.parametrize("sessions, frozen", [(10, False), (FREEZE_FROM, True)])
def test_start_up_ends_with_the_collector_on(sessions: int, frozen: bool) -> None:
    """``orchestrator run`` turns the cyclic collector off at entry: the end of start-up
    turns it on again, after freezing what start-up built where that is much."""
    import gc

    before = gc.get_freeze_count()
    gc.disable()
    try:
        settle_heap(sessions)
        assert gc.isenabled()
        assert (gc.get_freeze_count() > before) is frozen or before > 0
    finally:
        gc.unfreeze()
        gc.enable()
