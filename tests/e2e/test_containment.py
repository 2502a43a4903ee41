"""Issue 9: a hostile agent cannot stall, block or escape its session folder.

The whole supervisor on real files, real inotify, real SQLite and real processes
(the lockers are subprocesses holding ``BEGIN EXCLUSIVE``). The channel is a
recording test double (it stamps when each reply arrived; a real channel cannot
say that), everything it is told is counted exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from loguru import logger

from orchestrator.contract import schema
from orchestrator.contract.layout import delivered_root, sessions_root
from tests.support.e2e import Client, config_dict, make_config, supervised
from tests.support.fakes import RecordingChannel
from tests.support.helpers import query, until, wait_for


@pytest.fixture
def logs():
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    yield lines
    logger.remove(handler)


def add_reply(db: Path, out_id: str, seq: int, content: str | bytes | None = None,
              files: list[str] | None = None) -> float:
    """The agent's side: one row per transaction; returns the monotonic commit time."""
    if content is None:
        body: dict = {"text": f"reply {out_id}"}
        if files is not None:
            body["files"] = files
        content = json.dumps(body)
    with schema.opened(db) as conn, schema.transaction(conn):
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                     " VALUES (?,?,?, 'chat', CAST(? AS TEXT))",
                     (out_id, seq, schema.now_ts(), content))
    return time.monotonic()


def session_with_outbound(client: Client, agent_group: str):
    """A new session of ``agent_group`` whose outbound.db the agent has already made."""
    row = client.session(agent_group)
    paths = client.paths(row)
    schema.init_outbound(paths.outbound_db)
    return row, paths


def snapshot(root: Path) -> dict[str, tuple]:
    """Every name under ``root`` (links not followed): kind, bytes, mtime — to prove
    nothing out there was read through, moved, written or deleted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_ino, data)
    return out


def outside_session(where: Path, reply_id: str) -> Path:
    """A session-shaped folder outside data_dir: a reply with a file, ready to be stolen."""
    where.mkdir(parents=True)
    schema.init_inbound(where / "inbound.db")
    schema.init_outbound(where / "outbound.db")
    (where / "outbox" / reply_id).mkdir(parents=True)
    (where / "outbox" / reply_id / "loot.txt").write_text("secret")
    add_reply(where / "outbound.db", reply_id, 1, files=["loot.txt"])
    return where


def delivered(paths) -> dict[str, str]:
    return dict(query(paths.inbound_db, "SELECT message_out_id, status FROM delivered"))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- 1. locks held by agents never stall another session ---------------------------------

LOCKER = """
import os, sqlite3, sys, time
db, reply_id = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, isolation_level=None, timeout=5)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
             " VALUES (?, 1, datetime('now'), 'chat', '{}')", (reply_id,))
print("locked", flush=True)
folder = os.path.dirname(db)
while not os.path.exists(os.path.join(os.path.dirname(folder), "release-" + reply_id)):
    os.utime(db)  # keep "touching" it: every touch is an event, every event a pass
    os.utime(os.path.join(folder, ".heartbeat")) if os.path.exists(
        os.path.join(folder, ".heartbeat")) else None
    time.sleep(0.02)
conn.execute("COMMIT")
"""


async def test_ten_agents_holding_write_locks_do_not_slow_a_healthy_session(
        tmp_path: Path, reap_agents, logs) -> None:
    cfg = make_config(tmp_path, watch={"sweep_interval": 1.0})
    channel = RecordingChannel()
    per_phase = 20

    async def replies_latency(db: Path, prefix: str, first_seq: int) -> list[float]:
        out = []
        for i in range(per_phase):
            mid = f"{prefix}-{i}"
            t_commit = add_reply(db, mid, first_seq + 2 * i)
            await until(lambda: mid in channel.taken, timeout=10, interval=0.002,
                        message=f"reply {mid}")
            out.append(channel.taken[mid] - t_commit)
        return out

    client = Client(cfg)
    async with supervised(cfg, channel=channel):
        healthy = client.paths(client.session("healthy"))
        schema.init_outbound(healthy.outbound_db)
        locked = [client.paths(client.session(f"locked-{i}", platform=f"p{i}"))
                  for i in range(10)]
        for p in locked:
            schema.init_outbound(p.outbound_db)
        before = await replies_latency(healthy.outbound_db, "calm", 1)
        lockers = [subprocess.Popen([sys.executable, "-c", LOCKER, str(p.outbound_db),
                                     f"lock-{i}"], stdout=subprocess.PIPE, text=True)
                   for i, p in enumerate(locked)]
        try:
            for proc in lockers:
                assert proc.stdout.readline().strip() == "locked"
            during = await replies_latency(healthy.outbound_db, "busy", 1 + 2 * per_phase)
        finally:
            for i, p in enumerate(locked):
                (p.root.parent / f"release-lock-{i}").touch()
            for proc in lockers:
                proc.wait(10)
                proc.stdout.close()
        await until(lambda: all(f"lock-{i}" in channel.taken for i in range(10)),
                    timeout=15, message="the locked sessions' replies, once released")
    client.close()

    print(f"\nhealthy reply latency ms, p50/p99/max: without lockers "
          f"{1000 * statistics.median(before):.1f}/{1000 * quantile(before, .99):.1f}/"
          f"{1000 * max(before):.1f}; with 10 lockers "
          f"{1000 * statistics.median(during):.1f}/{1000 * quantile(during, .99):.1f}/"
          f"{1000 * max(during):.1f}")
    # the old code waited SQLite's 5 s busy timeout on the loop per locked pass (so
    # every healthy reply waited seconds); on a loaded CI machine both phases may be
    # slow, so the bound is relative to the same test's figures without lockers
    assert max(during) < max(1.0, 2 * max(before)), during
    assert statistics.median(during) < statistics.median(before) + 0.1, during
    # exact counts: every reply once, nothing failed
    ids = [f"calm-{i}" for i in range(per_phase)] + [f"busy-{i}" for i in range(per_phase)]
    ids += [f"lock-{i}" for i in range(10)]
    assert sorted(channel.taken) == sorted(ids)
    assert all(channel.count(mid) == 1 for mid in ids)
    assert channel.failures == []
    assert not [m for m in logs if "not a readable" in m or "unreadable" in m]
    busy_lines = [m for m in logs if "is busy" in m]
    assert 10 <= len(busy_lines) <= 10 * 3, busy_lines  # once per episode, not per pass


READER = """
import os, sqlite3, sys, time
db, release = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT COUNT(*) FROM messages_in").fetchone()  # a SHARED lock, held
print("reading", flush=True)
while not os.path.exists(release):
    time.sleep(0.01)
conn.execute("COMMIT")
"""


async def test_an_agent_holding_a_read_lock_on_inbound_db_holds_up_only_its_own_records(
        tmp_path: Path, reap_agents, logs) -> None:
    """The host's delivery record (a write to inbound.db) cannot commit while the agent
    reads: it is busy, retried by a timer, recorded once the read ends — and the
    other session's replies meanwhile go out and are recorded as usual."""
    cfg = make_config(tmp_path, watch={"sweep_interval": 30.0})
    channel = RecordingChannel()
    release = tmp_path / "release"

    client = Client(cfg)
    held = client.paths(client.session("held"))
    other = client.paths(client.session("other", platform="p2"))
    for p in (held, other):
        schema.init_outbound(p.outbound_db)
    async with supervised(cfg, channel=channel):
        reader = subprocess.Popen([sys.executable, "-c", READER, str(held.inbound_db),
                                   str(release)], stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "reading"
            add_reply(held.outbound_db, "h1", 1)
            await until(lambda: "h1" in channel.taken, message="h1 handed over")
            for i in range(5):
                add_reply(other.outbound_db, f"o{i}", 1 + 2 * i)
            await until(lambda: len(delivered(other)) == 5, message="the other's records")
            assert delivered(held) == {}  # its record waits for the reader
            release.touch()
            reader.wait(10)
        finally:
            release.touch()
            reader.wait(10)
            reader.stdout.close()
        await until(lambda: delivered(held) == {"h1": "delivered"}, timeout=10,
                    message="h1 recorded once the read ended")
    client.close()
    assert sorted(channel.taken) == ["h1", "o0", "o1", "o2", "o3", "o4"]
    assert all(channel.count(m) == 1 for m in channel.taken)  # none twice
    assert channel.failures == []
    assert [m for m in logs if "is busy" in m]
    assert not [m for m in logs if "not a readable" in m]


# --- 2. symlinks are never followed ---------------------------------------------------


async def test_a_linked_session_folder_is_refused_before_start_and_when_swapped_in(
        tmp_path: Path, reap_agents, logs) -> None:
    cfg = make_config(tmp_path, watch={"sweep_interval": 0.5})
    channel = RecordingChannel()
    outside = tmp_path / "outside"
    outside_session(outside / "planted", "evil-1")
    outside_session(outside / "swapped", "evil-2")
    (sessions_root(cfg.data_dir) / "grp").mkdir(parents=True)
    os.symlink(outside / "planted", sessions_root(cfg.data_dir) / "grp" / "s-planted")
    before = snapshot(outside)

    client = Client(cfg)
    victim, paths = session_with_outbound(client, "victim")
    async with supervised(cfg, channel=channel) as sup:
        add_reply(paths.outbound_db, "ok-1", 1)
        await until(lambda: "ok-1" in channel.taken, message="the victim's own reply")
        # swap the registered folder for a link to a folder outside data_dir
        os.rename(paths.root, tmp_path / "moved-away")
        os.symlink(outside / "swapped", paths.root)
        await until(lambda: any("victim" in m or victim.id in m for m in logs
                                if "symlink" in m), message="the refusal logged")
        swept = sup.tracked[victim.id]
        await until(lambda: swept.broken is not None, message="the session refused")
        t_sweeps = time.monotonic()
        await until(lambda: time.monotonic() - t_sweeps > 2.0, timeout=5)  # 4 sweeps
        assert "s-planted" not in sup.tracked
    client.close()
    assert sorted(channel.taken) == ["ok-1"] and channel.failures == []
    assert snapshot(outside) == before  # nothing read through, moved, written or deleted
    assert not (delivered_root(cfg.data_dir) / "evil-1").exists()
    assert not (delivered_root(cfg.data_dir) / "evil-2").exists()
    refusals = [m for m in logs if "symlink" in m]
    assert len([m for m in refusals if "s-planted" in m]) == 1, refusals  # logged once
    assert len([m for m in refusals if "s-planted" not in m]) == 1, refusals


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink"])
async def test_a_linked_outbound_db_is_never_read_or_written(tmp_path: Path, reap_agents,
                                                       logs, kind: str) -> None:
    """A link to a database outside, a FIFO (opening it would block the loop), a hard
    link to an outside file: refused on sight, logged once, the others unaffected."""
    cfg = make_config(tmp_path, watch={"sweep_interval": 0.5})
    channel = RecordingChannel()
    outside = outside_session(tmp_path / "outside", "evil-1")
    before = snapshot(outside)

    client = Client(cfg)
    victim = client.paths(client.session("victim"))
    other = client.paths(client.session("other", platform="p2"))
    schema.init_outbound(other.outbound_db)
    victim.outbound_db.unlink(missing_ok=True)
    if kind == "symlink":
        os.symlink(outside / "outbound.db", victim.outbound_db)
    elif kind == "fifo":
        os.mkfifo(victim.outbound_db)
    else:
        os.link(outside / "outbound.db", victim.outbound_db)
    async with supervised(cfg, channel=channel):
        add_reply(other.outbound_db, "ok-1", 1)
        await until(lambda: "ok-1" in channel.taken, message="the other session's reply")
        if kind != "hardlink":  # (through a hard link, a touch would change the outside file)
            os.utime(victim.outbound_db, follow_symlinks=False)
        t0 = time.monotonic()
        await until(lambda: time.monotonic() - t0 > 1.5, timeout=5)  # 3 sweeps
    client.close()
    assert sorted(channel.taken) == ["ok-1"] and channel.failures == []
    assert snapshot(outside) == before
    word = {"symlink": "is a symlink", "fifo": "is a FIFO", "hardlink": "2 hard links"}[kind]
    refusals = [m for m in logs if "outbound.db" in m and word in m]
    assert len(refusals) == 1, [m for m in logs if "outbound.db" in m]


# --- 3. a replaced file or folder is read again from scratch ----------------------------


async def test_replaced_outbound_db_and_recreated_folder_deliver_every_row(
        tmp_path: Path, reap_agents, logs) -> None:
    cfg = make_config(tmp_path, watch={"sweep_interval": 30.0})  # events alone must do it
    channel = RecordingChannel()

    client = Client(cfg)
    row, paths = session_with_outbound(client, "replaced")
    async with supervised(cfg, channel=channel) as sup:
        for i, seq in enumerate((1, 3, 5)):
            add_reply(paths.outbound_db, f"a{i}", seq)
        await until(lambda: {"a0", "a1", "a2"} <= set(channel.taken), message="first rows")
        await until(lambda: sup.tracked[row.id].delivery.watermark == 5)

        # the log's old advice: remove outbound.db, the agent creates it again, lower seqs
        # (a link elsewhere keeps the old inode taken: ext4 may hand a freed one out again)
        os.link(paths.outbound_db, tmp_path / "old-outbound.db")
        paths.outbound_db.unlink()
        t_replaced = time.monotonic()
        schema.init_outbound(paths.outbound_db)
        for i, seq in enumerate((1, 3)):
            add_reply(paths.outbound_db, f"b{i}", seq)
        await until(lambda: {"b0", "b1"} <= set(channel.taken), timeout=10,
                    message="the rows of the new outbound.db")
        replaced_s = max(channel.taken["b0"], channel.taken["b1"]) - t_replaced

        # the whole folder deleted and created again
        shutil.rmtree(paths.root)
        t_recreated = time.monotonic()
        paths.root.mkdir()
        schema.init_inbound(paths.inbound_db)
        schema.init_outbound(paths.outbound_db)
        add_reply(paths.outbound_db, "c0", 1)
        add_reply(paths.outbound_db, "c1", 3)
        await until(lambda: {"c0", "c1"} <= set(channel.taken), timeout=10,
                    message="the rows of the recreated folder")
        recreated_s = max(channel.taken["c0"], channel.taken["c1"]) - t_recreated
        await until(lambda: delivered(paths) == {"c0": "delivered", "c1": "delivered"})
    client.close()
    print(f"\noutbound.db replaced → last reply delivered: {1000 * replaced_s:.0f} ms; "
          f"folder recreated → last reply delivered: {1000 * recreated_s:.0f} ms")
    assert replaced_s < 5.0 and recreated_s < 5.0
    ids = ["a0", "a1", "a2", "b0", "b1", "c0", "c1"]
    assert sorted(channel.taken) == ids
    assert all(channel.count(mid) == 1 for mid in ids)  # none duplicated, none lost
    assert channel.failures == []
    assert [m for m in logs if "replaced (new inode)" in m]


# --- 4./5. one bad row fails alone, at once, and the chat hears of it ----------------------


async def test_bad_rows_fail_at_once_alone_and_are_reported(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, delivery={"max_content_bytes": 4096, "retry_base": 5.0,
                                          "max_attempts": 5})
    channel = RecordingChannel()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    before = snapshot(outside)

    client = Client(cfg)
    row, paths = session_with_outbound(client, "bad")
    outbox = paths.outbox
    (outbox / "r-notdir").write_text("a file where outbox/<id>/ should be")
    (outbox / "r-link").mkdir()
    os.symlink(outside / "secret.txt", outbox / "r-link" / "a.txt")
    (outbox / "r-fifo").mkdir()
    os.mkfifo(outbox / "r-fifo" / "a.txt")
    os.symlink(outside, outbox / "r-dirlink")  # outbox/<id> itself a link
    async with supervised(cfg, channel=channel):
        t0 = time.monotonic()
        rows = [("r-utf8", b'{"text": "\xff\xfe"}', None),
                ("ok-1", None, None),
                ("r-notdir", None, ["a.txt"]),
                ("ok-2", None, None),
                ("r-traversal", None, ["../../secret.txt"]),
                ("r-absolute", None, [str(outside / "secret.txt")]),
                ("r-link", None, ["a.txt"]),
                ("r-fifo", None, ["a.txt"]),
                ("r-dirlink", None, ["secret.txt"]),
                ("r-big", json.dumps({"text": "x" * 10_000}), None),
                ("ok-3", None, None)]
        for i, (mid, content, files) in enumerate(rows):
            add_reply(paths.outbound_db, mid, 1 + 2 * i, content, files)
        await until(lambda: len(delivered(paths)) == len(rows), timeout=10,
                    message="every row settled")
        elapsed = time.monotonic() - t0
    client.close()
    assert elapsed < 3.0  # not 5 attempts with backoff (5 s, 10 s, …)

    settled = delivered(paths)
    bad = {"r-utf8", "r-notdir", "r-traversal", "r-absolute", "r-link", "r-fifo", "r-big",
           "r-dirlink"}
    assert settled == {**{m: "failed" for m in bad},
                       **{m: "delivered" for m in ("ok-1", "ok-2", "ok-3")}}
    assert sorted(channel.taken) == ["ok-1", "ok-2", "ok-3"]
    assert all(channel.count(m) == 1 for m in ("ok-1", "ok-2", "ok-3"))
    reasons = {f.id: f.reason for f in channel.failures}
    assert len(channel.failures) == len(bad) and set(reasons) == bad  # one record each
    assert all(f.kind == "reply" and f.session_id == row.id and f.agent_group == "bad"
               and (f.channel_type, f.platform_id) == ("cli", "local")
               for f in channel.failures)
    assert "not valid UTF-8" in reasons["r-utf8"]
    assert "not a directory" in reasons["r-notdir"]
    assert "must be a basename" in reasons["r-traversal"]
    assert "must be a basename" in reasons["r-absolute"]
    assert "a symlink" in reasons["r-link"]
    assert "a FIFO" in reasons["r-fifo"]
    assert "is a symlink or not a directory" in reasons["r-dirlink"]
    assert "max_content_bytes" in reasons["r-big"]
    assert query(client_registry(cfg), "SELECT COUNT(*) FROM delivery_attempts") == [(0,)]
    assert snapshot(outside) == before
    assert not any(os.path.lexists(paths.outbox / m) for m in bad)  # links unlinked


def client_registry(cfg) -> Path:
    return cfg.data_dir / "orchestrator.db"


# --- 4. a 50 MB row is refused without loading it (peak RSS of the real process) ---------


def test_a_50_mb_reply_is_failed_without_loading_it(tmp_path: Path) -> None:
    data = config_dict(tmp_path, delivery={"channel": "jsonl"})
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(data))
    cfg = make_config(tmp_path)
    client = Client(cfg)
    row, paths = session_with_outbound(client, "huge")
    add_reply(paths.outbound_db, "r-huge", 1, json.dumps({"text": "x" * 50_000_000}))
    add_reply(paths.outbound_db, "r-ok", 3)
    client.close()
    log = open(tmp_path / "orchestrator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--config",
                             str(config)], stdout=log, stderr=log)
    try:
        lines = wait_for(lambda: [json.loads(x) for x in cfg.delivery.path.read_text()
                                  .splitlines()] if cfg.delivery.path.exists()
                         and cfg.delivery.path.read_text().count("\n") >= 2 else None,
                         timeout=30, message="a failure record and a reply")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_mb = int(next(x for x in status.splitlines() if x.startswith("VmHWM:"))
                      .split()[1]) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    print(f"\npeak RSS of the orchestrator with a 50 MB reply row: {peak_mb:.1f} MB")
    failure = next(x for x in lines if x.get("type") == "failure")
    assert (failure["kind"], failure["id"]) == ("reply", "r-huge")
    assert "over [delivery] max_content_bytes" in failure["reason"]
    assert [x["message_id"] for x in lines if x.get("type") != "failure"] == ["r-ok"]
    assert peak_mb < 100


# --- 6. links in a session folder never reach the host's inotify watch ---------------------


async def test_links_an_agent_makes_are_never_walked_by_the_watch(tmp_path: Path,
                                                                 reap_agents) -> None:
    """``outbox/x -> <a big tree>`` present at start, and a folder holding a link renamed
    into outbox/ and into the session folder while the host runs: the host watches its
    own folders only (counted from the kernel's list of our watches), changes out there
    are never reported as the session's, and replies still go out at once."""
    from orchestrator.watch import health as watch_health

    cfg = make_config(tmp_path, watch={"sweep_interval": 600.0})
    channel = RecordingChannel()
    big = tmp_path / "host-tree"
    for i in range(40):
        (big / f"d{i}" / "a").mkdir(parents=True)
    client = Client(cfg)
    row, paths = session_with_outbound(client, "linky")
    (paths.outbox / "x").symlink_to(big)
    (paths.root / "evil").symlink_to(big)
    before = watch_health.inotify_fds()
    async with supervised(cfg, channel=channel):
        [fd] = watch_health.inotify_fds() - before
        # root, group, session; a session present at start gets its outbox/ watch
        # once it shows activity (one watch per dormant session: issue 28)
        assert len(watch_health.watched_inodes(fd)) == 3
        for target in (paths.outbox / "r-link", paths.root / "more"):
            staged = tmp_path / f"staged-{target.name}"
            staged.mkdir()
            (staged / "z").symlink_to(big)
            os.rename(staged, target)
        add_reply(paths.outbound_db, "after-links", 1)
        await until(lambda: "after-links" in channel.taken, timeout=5,
                    message="the reply after the links were made")
        await until(lambda: len(watch_health.watched_inodes(fd)) == 4, timeout=5,
                    message="outbox/ watched once the session is active")
        for i in range(40):
            (big / f"d{i}" / "a" / "touched").write_text("x")
        assert len(watch_health.watched_inodes(fd)) == 4  # nothing of the tree
    client.close()
    assert sorted(channel.taken) == ["after-links"]
