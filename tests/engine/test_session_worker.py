"""The session worker on real files. First end to end: a real supervisor, the reference
agent as a real subprocess (local runtime), real SQLite and inotify. Then table tests of
the worker alone with a fake runtime (what it does with each start/stop/exit outcome).
The rules it applies are table-tested in test_lifecycle.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from loguru import logger

from orchestrator.cli.compose import make_channel
from orchestrator.contract import schema
from orchestrator.contract.layout import sessions_root
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import Deliverer, DeliveryState
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.tracked import Flag, Tracked
from orchestrator.host import outbound
from orchestrator.host.safefs import open_group
from orchestrator.runtime.base import AgentExit, RuntimeUnavailable
from tests.support.e2e import Client, failures, make_config, replies_to, run, supervised
from tests.support.fakes import FakeRuntime
from tests.support.helpers import query, until


def message_status(paths, message_id: str) -> str:
    [(status,)] = query(paths.inbound_db, "SELECT status FROM messages_in WHERE id=?",
                        (message_id,))
    return status


FAIL_KILLER = """
import os, signal, sys
from orchestrator.host import inbound
def fail_messages(*args, **kwargs):  # the failure was just told to the channel: die
    os.kill(os.getpid(), signal.SIGKILL)
inbound.fail_messages = fail_messages
from orchestrator.cli.commands import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_a_failure_is_told_before_it_is_written_and_once_across_sigkill(
        tmp_path: Path, reap_agents) -> None:
    """The host is SIGKILLed between telling the channel that a message failed and
    writing ``failed``: after a restart the message still ends ``failed`` and the chat
    has exactly one failure record (never none, as when the write came first)."""
    import signal

    import tomli_w

    from orchestrator.config.load import read_config
    from tests.support.e2e import OrchestratorProcess, config_dict
    from tests.support.helpers import killed_run, wait_for

    data = config_dict(tmp_path, runtime={"start_retry_max": 1.0},
                       lifecycle={"max_tries": 1})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(data))
    cfg = read_config(config_file)
    client = Client(cfg)
    row = client.session("blocked")
    paths = client.paths(row)
    paths.heartbeat.mkdir()  # every start fails: the message fails after max_tries
    _, mid = client.send("blocked", "anyone?")
    killed_run(FAIL_KILLER, [str(config_file)], tmp_path / "killed.log", tmp_path)
    assert message_status(paths, mid) == "pending"  # killed before the write
    assert [(r["kind"], r["id"]) for r in failures(cfg)] == [("message", mid)]
    again = OrchestratorProcess(config_file, tmp_path / "again.log")
    try:
        again.wait_up()
        wait_for(lambda: message_status(paths, mid) == "failed", timeout=30,
                 message="the message failed after the restart")
    finally:
        assert again.end(signal.SIGTERM) == 0, again.text()
    assert [(r["kind"], r["id"]) for r in failures(cfg)] == [("message", mid)]
    client.close()


def test_a_session_that_can_never_start_fails_its_due_messages(tmp_path: Path,
                                                               reap_agents) -> None:
    """``.heartbeat`` is a directory, so every start fails (the stale heartbeat cannot
    be removed). After ``max_tries`` failed starts the due message is failed with the
    reason — not retried forever; the next message gets its own tries; once the
    obstacle is gone a new message starts an agent and is answered."""
    cfg = make_config(tmp_path, runtime={"start_retry_max": 1.0},
                      watch={"sweep_interval": 120.0})
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")

    def attempts(session_id: str) -> int:
        return sum(f"session {session_id}: cannot start agent" in line for line in lines)

    async def body() -> None:
        client = Client(cfg)
        row = client.session("blocked")
        paths = client.paths(row)
        paths.heartbeat.mkdir()  # the obstacle
        async with supervised(cfg) as sup:
            _, first = client.send("blocked", "are you there?")
            await until(lambda: message_status(paths, first) == "failed", timeout=30,
                        message="the first message failed")
            assert attempts(row.id) == cfg.lifecycle.max_tries == 3
            assert client.statuses(row.id) == []  # no agent ever ran
            failed = [line for line in lines if f"message {first} of session" in line]
            assert len(failed) == 1 and "could not be started 3 times" in failed[0], failed
            assert "Is a directory" in failed[0], failed
            assert sup.tracked[row.id].start.errors == 0  # counted afresh for new work

            # a new message while the obstacle is there: its own tries, then failed
            _, second = client.send("blocked", "still there?")
            await until(lambda: message_status(paths, second) == "failed", timeout=30,
                        message="the second message failed")
            assert attempts(row.id) == 6

            paths.heartbeat.rmdir()  # the obstacle is gone
            _, third = client.send("blocked", "now?")
            [reply] = await until(lambda: replies_to(cfg, third), timeout=30,
                                  message="the reply once it can start")
            assert reply["content"]["text"] == "echo: now?"
            assert attempts(row.id) == 6
        assert [message_status(paths, m) for m in (first, second, third)] == [
            "failed", "failed", "completed"]
        assert replies_to(cfg, first) == [] and replies_to(cfg, second) == []
        # the chat hears of each, once (issue 9.5), routed to the chat it came from
        records = failures(cfg)
        assert [(r["kind"], r["id"]) for r in records] == [("message", first),
                                                          ("message", second)]
        assert all((r["channel_type"], r["platform_id"]) == ("cli", "local")
                   and "could not be started 3 times" in r["reason"] for r in records)
        assert client.statuses(row.id)[0] == ("running", "agent started, 1 message(s) due")
        client.close()

    try:
        run(body())
    finally:
        logger.remove(sink)


# --- table tests: the worker alone, with a fake runtime --------------------------------
#
# The Runtime protocol is small, so a fake that records calls and fails on cue shows what
# the worker does with each outcome — without an agent, a container or a supervisor. The
# session folder, its databases and the registry stay real.


class Bench:
    """A SessionWorker over a real data dir, registry and session folder, with a fake
    runtime and a channel that keeps what it is given; ``marks`` records re-runs asked for."""

    def __init__(self, tmp_path: Path, **sections: dict) -> None:
        self.cfg = make_config(tmp_path, **sections)
        sessions_root(self.cfg.data_dir).mkdir(parents=True)
        self.client = Client(self.cfg)
        self.runtime = FakeRuntime()
        self.marks: list[tuple[str, int]] = []
        self.deliverer = Deliverer(self.cfg.data_dir, self.client.registry,
                                   make_channel(self.cfg.delivery), self.cfg.delivery)
        self.worker = SessionWorker(self.cfg, self.client.registry, self.client.sessions,
                                    self.runtime, self.deliverer, datetime_now,
                                    lambda sid, flags: self.marks.append((sid, flags)))
        self.row = self.client.session("grp")
        self.t = Tracked(self.row.agent_group_id, self.row.id, self.client.paths(self.row))

    async def settle(self) -> None:
        """Let the operation the last pass started (start/stop/kill) finish."""
        if self.t.op is not None:
            await self.t.op

    def close(self) -> None:
        SessionWorker.cancel_timers([self.t])
        self.client.close()


def datetime_now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def bench(tmp_path: Path):
    b = Bench(tmp_path)
    yield b
    b.close()


@pytest.mark.parametrize("fail, status, failures, errors, error", [
    (None, "running", 0, 0, None),
    # an outage of the runtime: backed off, but it does not count against the session
    (RuntimeUnavailable("daemon down"), "stopped", 1, 0, None),
    # the host's disk is full: not the session's fault either
    (OSError(errno.ENOSPC, "No space left on device"), "stopped", 1, 0, None),
    # this session's own obstacle: counts towards max_tries, remembered for the failure
    (ValueError("bad folder\nsecond line"), "stopped", 1, 1, "bad folder"),
])
async def test_a_start_outcome_sets_status_and_counts(bench: Bench, fail, status, failures,
                                                      errors, error) -> None:
    bench.runtime.fail = fail
    bench.client.send("grp", "hello")
    await bench.worker.process(bench.t, Flag.FULL)
    await bench.settle()
    assert bench.runtime.calls == [("start", bench.t.session_id)]
    t = bench.t
    assert (t.status, t.start.failures, t.start.errors, t.start.error) == (
        status, failures, errors, error)
    assert (t.start.blocked_until is None) == (fail is None)
    assert bench.client.container_status(t.session_id) == status
    assert bench.marks[-1] == (t.session_id, Flag.TIMER)  # the op's end asks for a pass


async def test_no_due_work_starts_nothing(bench: Bench) -> None:
    await bench.worker.process(bench.t, Flag.FULL)
    await bench.settle()
    assert bench.runtime.calls == [] and bench.t.status == "stopped"


@pytest.mark.parametrize("alive, status, sweep", [
    (False, "stopped", False),
    (True, "running", False),
    (True, "idle", False),
    (False, "running", True),  # it died and no exit event came: the sweep must look
    (False, "idle", True),
    (True, "stopped", True),  # an agent runs that the worker thinks is stopped
])
async def test_the_sweep_looks_where_the_runtime_contradicts_the_status(
        bench: Bench, alive: bool, status: str, sweep: bool) -> None:
    await bench.worker.process(bench.t, Flag.FULL)  # the signatures read: nothing changed
    bench.t.status = status
    if alive:
        bench.runtime.alive.add(bench.t.session_id)
    assert bool(bench.worker.sweep_flags(bench.t) & Flag.SWEEP) == sweep


async def test_a_session_skipped_at_start_up_reads_everything_on_its_first_real_pass(
        bench: Bench) -> None:
    await bench.worker.process(bench.t, Flag.FULL)  # the last run's pass
    t = Tracked(bench.row.agent_group_id, bench.row.id, bench.client.paths(bench.row))
    t.read.sigs, t.read.identity = dict(bench.t.read.sigs), bench.t.read.identity
    t.restored = True
    await bench.worker.process(t, Flag.SWEEP)  # a rescan: stat-gated, nothing changed
    assert t.restored and bench.runtime.calls == []
    bench.client.send("grp", "hello")  # its inotify event is not what this pass is for
    await bench.worker.process(t, Flag.HEARTBEAT)
    assert not t.restored and t.evidence.due == 1  # inbound.db read too: a full pass
    assert t.op is not None
    await t.op
    assert bench.runtime.calls == [("start", t.session_id)]
    SessionWorker.cancel_timers([t])


@pytest.mark.parametrize("change, flags", [
    ("nothing", Flag.NONE),
    ("heartbeat", Flag.NONE),  # stopped, no agent: its heartbeat decides nothing
    ("heartbeat of a running agent", Flag.HEARTBEAT),
    ("reply", Flag.OUTBOUND),
    ("message", Flag.INBOUND),
    # the same files behind a link to the moved folder: every file signature matches,
    # the folder is refused (the pass then says why)
    ("folder linked", Flag.SWEEP),
    # a folder that is not the one last passed (same file inodes, moved back in a new one)
    ("new folder", Flag.SWEEP),
])
async def test_the_sweep_by_stat_through_the_group_folder(tmp_path: Path, bench: Bench,
                                                          change: str, flags: int) -> None:
    paths = bench.client.paths(bench.row)
    schema.init_outbound(paths.outbound_db)
    await bench.worker.process(bench.t, Flag.FULL)
    if change.startswith("heartbeat"):
        paths.heartbeat.touch()
        if change.endswith("running agent"):
            bench.runtime.alive.add(bench.t.session_id)
            bench.t.status = Status.RUNNING
    elif change == "reply":
        with schema.opened(paths.outbound_db) as conn, schema.transaction(conn):
            conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                         " VALUES ('r1', 1, ?, 'chat', '{}')", (schema.now_ts(),))
    elif change == "message":
        bench.client.send("grp", "hello")
    elif change == "folder linked":
        os.rename(paths.root, tmp_path / "moved")
        os.symlink(tmp_path / "moved", paths.root)
    elif change == "new folder":
        os.rename(paths.root, tmp_path / "moved")
        paths.root.mkdir()
        for entry in os.listdir(tmp_path / "moved"):
            os.rename(tmp_path / "moved" / entry, paths.root / entry)
    group = open_group(bench.cfg.data_dir, bench.row.agent_group_id)
    try:
        assert bench.worker.sweep_flags(bench.t, group) == flags
    finally:
        os.close(group)


@pytest.mark.parametrize("flags, alive, status, matters", [
    (Flag.INBOUND, True, "running", False),  # a running agent picks new work up itself
    (Flag.INBOUND, False, "running", True),
    (Flag.INBOUND, True, "idle", True),  # an idle agent's due count holds off a stop
    (Flag.INBOUND, False, "stopped", True),  # new work wakes a stopped session
    (Flag.INBOUND | Flag.TIMER, True, "running", True),
    (Flag.EXIT, True, "running", True),
    (Flag.HEARTBEAT | Flag.OUTBOUND, False, "stopped", False),
])
def test_whether_a_pass_recounts_due_work(flags: int, alive: bool, status: str,
                                          matters: bool) -> None:
    t = Tracked("g", "s", None)  # type: ignore[arg-type]  (paths are not read)
    t.status = status
    assert SessionWorker._inbound_matters(t, flags, alive) is matters


@pytest.mark.parametrize("exit_code, reason, ending, recorded", [
    (0, "exited", None, "agent exited"),
    (3, "exited", None, "agent exited, exit code 3"),
    (137, "oom", None, "agent oom, exit code 137"),
    (0, "stopped", "stopped: idle for 5s", "stopped: idle for 5s"),  # why we stopped it
])
async def test_an_exit_records_stopped_with_its_reason(bench: Bench, exit_code, reason,
                                                       ending, recorded) -> None:
    t = bench.t
    t.status, t.ending_reason, t.ops.failures = "running", ending, 2
    t.exit = AgentExit(t.agent_group, t.session_id, exit_code, reason)
    await bench.worker.process(t, Flag.EXIT)
    assert t.status == "stopped" and t.exit is None and t.ending_reason is None
    assert t.ops.failures == 0  # the agent a failed stop was for has gone
    assert bench.client.statuses(t.session_id)[-1] == ("stopped", recorded)


async def test_a_failing_stop_is_logged_once_then_quietly(bench: Bench) -> None:
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])),
                      level="DEBUG")
    try:
        t = bench.t
        bench.runtime.alive.add(t.session_id)
        bench.runtime.fail = RuntimeError("stop refused")
        for _ in range(3):
            assert bench.worker.request_stop(t, "asked")
            await bench.settle()
        assert t.ops.failures == 3 and t.ops.blocked_until is not None
        said = [level for level, text in lines if "runtime operation failed" in text]
        assert said == ["ERROR", "DEBUG", "DEBUG"]
        bench.runtime.fail = None
        assert bench.worker.request_stop(t, "asked")
        await bench.settle()
        assert t.ops.failures == 0 and t.ops.blocked_until is None
        assert not bench.runtime.is_running(t.session_id)
        assert not bench.worker.request_stop(t, "asked")  # nothing runs: nothing to stop
    finally:
        logger.remove(sink)


# --- hostile values (issue #21): every agent-written number or time, absurd -------------

HOSTILE_LC = {"claim_stuck": 10.0, "ceiling": 100.0, "max_tool_timeout": 1000.0}
T0 = datetime.now(timezone.utc).replace(microsecond=250_001)  # a claim's tick ends after it
Y2400 = int(datetime(2400, 1, 1, tzinfo=timezone.utc).timestamp())


def _ns(seconds: float) -> int:
    return int((T0.timestamp() + seconds) * 1e9)


# (id, claim stamp, declared tool timeout in ms (None: no tool), heartbeat mtime in ns
#  (None: T0 - 5 s, before the claim), reply row (timestamp, deliver_after) or None,
#  seconds after T0 when the agent must be killed: claim rule at 10 s, heartbeat rule
#  at ceiling 100 s (counted from the heartbeat), both widened by a tool timeout
#  clamped to max_tool_timeout 1000 s)
HOSTILE = [
    ("sane baseline", schema.format_ts(T0), None, None, None, 10),
    ("tool timeout 2^63-1 ms", schema.format_ts(T0), 2**63 - 1, None, None, 995),
    ("tool timeout 1e300", schema.format_ts(T0), 1e300, None, None, 995),
    ("tool timeout inf", schema.format_ts(T0), math.inf, None, None, 995),
    ("tool timeout -inf", schema.format_ts(T0), -math.inf, None, None, 10),
    ("tool timeout nan", schema.format_ts(T0), math.nan, None, None, 10),
    ("tool timeout negative", schema.format_ts(T0), -5000, None, None, 10),
    ("tool timeout text", schema.format_ts(T0), "forever", None, None, 10),
    ("tool timeout sane 500 s", schema.format_ts(T0), 500_000, None, None, 495),
    ("claim stamped 9999-12-31", "9999-12-31 23:59:59", None, None, None, 10),
    ("claim past datetime.max in UTC", "9999-12-31T23:59:59-05:00", None, None, None, 10),
    ("claim before datetime.min in UTC", "0001-01-01T00:00:00+05:00", None, None, None, 10),
    ("claim stamp unparsable", "soon", None, None, None, 10),
    ("claim stamp empty", "", None, None, None, 10),
    ("claim stamped year 1", "0001-01-01 00:00:00", None, None, None, 95),  # hb since: ceiling
    ("heartbeat in the 25th century", schema.format_ts(T0), None, Y2400 * 10**9, None, 10),
    ("heartbeat at int64's end", schema.format_ts(T0), None, 2**63 - 1, None, 10),
    ("heartbeat before 1970", schema.format_ts(T0), None, -(10**18), None, 0),
    ("heartbeat at the epoch", schema.format_ts(T0), None, 0, None, 0),
    ("reply stamps past datetime.max", schema.format_ts(T0), None, None,
     ("9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59-05:00"), 10),
    ("reply stamps unparsable", schema.format_ts(T0), None, None, ("x", "y"), 10),
    ("reply deliver_after far future", schema.format_ts(T0), None, None,
     ("9999-12-31 23:59:59", "9999-12-31 23:59:59"), 10),
]


@pytest.mark.parametrize("name,claimed,tool_ms,hb_ns,reply,kill_at", HOSTILE,
                         ids=[c[0] for c in HOSTILE])
async def test_hostile_values_never_fail_a_pass_and_the_stuck_rules_still_fire(
        tmp_path: Path, name, claimed, tool_ms, hb_ns, reply, kill_at) -> None:
    """An agent holding a claim writes an absurd value: every pass completes (nothing
    raises: ``t.broken`` stays None) and it is killed exactly when the clamped values
    say (not a second before), re-reading everything on every pass."""
    b = Bench(tmp_path, lifecycle=HOSTILE_LC)
    offset = [0.0]
    b.worker.clock = lambda: T0 + timedelta(seconds=offset[0])
    try:
        t, paths = b.t, b.client.paths(b.row)
        paths.root.mkdir(parents=True, exist_ok=True)
        schema.init_outbound(paths.outbound_db)
        with sqlite3.connect(paths.outbound_db) as conn:
            conn.execute("INSERT INTO processing_ack (message_id, status, status_changed)"
                         " VALUES ('m1', 'processing', ?)", (claimed,))
            if tool_ms is not None:
                conn.execute("INSERT INTO container_state (id, current_tool,"
                             " tool_declared_timeout_ms, tool_started_at, updated_at)"
                             " VALUES (1, 'bash', ?, ?, ?)", (tool_ms, claimed, claimed))
            if reply is not None:
                conn.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp,"
                             " deliver_after, kind, content) VALUES ('o1', 2, 'm1', ?, ?,"
                             " 'chat', '{\"text\": \"hi\"}')", reply)
        hb = paths.root / ".heartbeat"
        hb.write_text("")
        os.utime(hb, ns=(0, hb_ns if hb_ns is not None else _ns(-5)))
        b.runtime.alive.add(t.session_id)
        t.started_at, t.status = T0 - timedelta(seconds=30), Status.RUNNING

        async def kills_at(seconds: float) -> bool:
            offset[0] = seconds
            await b.worker.process(t, Flag.FULL)
            await b.settle()
            assert t.broken is None, f"{name}: the pass failed: {t.broken}"
            return ("kill", t.session_id) in b.runtime.calls

        if kill_at > 0:
            assert not await kills_at(0)
            assert not await kills_at(kill_at - 1), f"{name}: killed before {kill_at}s"
            b.runtime.alive.add(t.session_id)  # (a stop by another rule would show here)
            assert ("stop", t.session_id) not in b.runtime.calls
        assert await kills_at(kill_at + 1), f"{name}: not killed by {kill_at + 1}s"
    finally:
        b.close()


def _agent_reply(bench: Bench, seq: int) -> None:
    """What an agent does to reply: one commit of one row to its outbound.db."""
    with schema.opened(bench.t.paths.outbound_db) as conn, schema.transaction(conn):
        conn.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, content)"
                     " VALUES (?, ?, NULL, ?, 'chat', ?)",
                     (f"r{seq}", seq, schema.now_ts(), json.dumps({"text": "hi"})))


async def test_a_muted_session_is_read_again_only_after_a_commit(
        bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event-driven pass over a muted session (its agent runs, a timer is set) that
    would read nothing new is skipped: outbound.db with no commit since its last
    complete read (the file change counter), inbound.db alone (the agent reads it
    itself). A commit is read at once; a sweep, a timer or an exit always pass."""
    reads: list[int] = []
    real_read = outbound.read

    def counted(*args, **kwargs):
        reads.append(1)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(outbound, "read", counted)
    bench.client.send("grp", "hello")
    t, sid = bench.t, bench.t.session_id
    await bench.worker.process(t, Flag.FULL)
    await bench.settle()  # the agent started
    await bench.worker.process(t, Flag.TIMER)
    assert sid in bench.worker.muted
    n = len(reads)
    for flags in (Flag.OUTBOUND, Flag.INBOUND, Flag.OUTBOUND | Flag.INBOUND):
        await bench.worker.process(t, flags)  # (e.g. the second half of a commit's events)
        assert (len(reads), sid in bench.worker.muted) == (n, True)
    _agent_reply(bench, 101)
    await bench.worker.process(t, Flag.OUTBOUND)
    assert len(reads) == n + 1 and t.read.max_seq_seen == 101
    assert sid in bench.worker.muted  # muted again by that pass, its read kept
    await bench.worker.process(t, Flag.OUTBOUND)
    assert len(reads) == n + 1
    t.delivery = DeliveryState()  # its delivery memory reset (retry_deliveries): read
    await bench.worker.process(t, Flag.OUTBOUND)
    assert len(reads) == n + 2
    for flags in (Flag.SWEEP | Flag.OUTBOUND, Flag.TIMER, Flag.OUTBOX):
        await bench.worker.process(t, flags)
    assert len(reads) == n + 5
    bench.runtime.alive.discard(sid)  # gone, no exit event yet: every pass reads
    await bench.worker.process(t, Flag.INBOUND)
    assert sid not in bench.worker.muted


async def test_a_busy_session_keeps_its_connections_and_a_removal_closes_them(
        bench: Bench) -> None:
    """Passes over a running agent's replies reuse one outbound.db and one inbound.db
    connection (``kept_dbs``), every reply is recorded once, and the session leaving
    (retention's ``detach_session``) closes them."""
    bench.client.send("grp", "hello")
    t, sid = bench.t, bench.t.session_id
    await bench.worker.process(t, Flag.FULL)
    await bench.settle()  # the agent started
    assert len(bench.worker.kept) == 0  # a full pass keeps nothing (a first start's)
    _agent_reply(bench, 99)
    await bench.worker.process(t, Flag.OUTBOUND)  # an agent's write: kept from now on
    opened = bench.worker.kept.opened
    assert opened > 0 and len(bench.worker.kept) == 1
    for seq in range(101, 111, 2):
        _agent_reply(bench, seq)
        await bench.worker.process(t, Flag.OUTBOUND)
    assert bench.worker.kept.opened == opened and len(bench.worker.kept) == 1
    delivered = query(t.paths.inbound_db, "SELECT message_out_id FROM delivered ORDER BY 1")
    assert [r[0] for r in delivered] == sorted(f"r{s}" for s in range(99, 111, 2))
    t.paths.outbound_db.unlink()  # the agent recreates its file: a new connection
    schema.init_outbound(t.paths.outbound_db)
    _agent_reply(bench, 201)
    await bench.worker.process(t, Flag.OUTBOUND)
    assert bench.worker.kept.opened > opened  # a new connection for the new file
    assert query(t.paths.inbound_db, "SELECT count(*) FROM delivered") == [(7,)]
    before = len(os.listdir("/proc/self/fd"))
    bench.worker.forget(sid)
    assert len(bench.worker.kept) == 0
    assert len(os.listdir("/proc/self/fd")) == before - 3  # the folder, both databases


async def test_a_replys_activity_reaches_the_registry_at_the_next_flush(bench: Bench) -> None:
    """The registry's activity times are written in one transaction per flush (the
    sweep's tick), not by each pass: a delivered reply's pass leaves them pending."""
    bench.client.send("grp", "hello")
    t, sid = bench.t, bench.t.session_id
    await bench.worker.process(t, Flag.FULL)
    await bench.settle()
    bench.worker.flush_touches()
    before = bench.client.registry.session(sid).last_active
    _agent_reply(bench, 101)
    await bench.worker.process(t, Flag.OUTBOUND)
    assert bench.client.registry.session(sid).last_active == before
    bench.worker.flush_touches()
    after = bench.client.registry.session(sid).last_active
    assert after is not None and (before is None or after > before)
    bench.worker.flush_touches()  # nothing pending: nothing written
