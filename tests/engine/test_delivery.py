"""Delivery: outbound rows → channel → ``delivered`` → outbox cleaned.

Most tests drive ``Deliverer.run_pass`` directly with an injected ``now`` on a
real session folder (real SQLite, real registry), the agent's side written with
plain SQL. The failing channel is a test double implementing the Channel
protocol: a real channel cannot be made to fail on cue, and the point is what
the deliverer does with a failure. One test runs the whole supervisor.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from loguru import logger

from orchestrator.channels import Reply
from orchestrator.channels.jsonl import JsonlChannel, read_lines
from orchestrator.config.sections import DeliveryConfig
from orchestrator.contract import schema
from orchestrator.contract.layout import SessionPaths, delivered_root, registry_path
from orchestrator.engine.delivery import Deliverer, DeliveryState
from orchestrator.engine.reply_files import move_files
from orchestrator.host import outbound
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.host.sessions import MessagingGroup, Sessions
from tests.support.e2e import Client, make_config, run, supervised
from tests.support.fakes import FakeChannel
from tests.support.helpers import holds, query, until

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
ROUTING = ("chat", "room-1", None)


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


class World:
    """One session folder, the registry, and the agent's side of outbound.db."""

    def __init__(self, tmp_path: Path, channel, max_attempts: int = 3,
                 retry_base: float = 2.0, files_wait: float = 60.0) -> None:
        self.data_dir = tmp_path / "data"
        self.registry = Registry(registry_path(self.data_dir))
        self.sessions = Sessions(self.data_dir, self.registry, 1 << 20)
        self.row = self.sessions.resolve("grp", MessagingGroup("chat", "room-1"), None, "shared")
        self.paths: SessionPaths = self.sessions.paths(self.row)
        schema.init_outbound(self.paths.outbound_db)
        self.cfg = DeliveryConfig(max_attempts=max_attempts, retry_base=retry_base,
                                  files_wait=files_wait)
        self.channel = channel
        self.state = DeliveryState()
        self.seq = 1
        self.deliverer = Deliverer(self.data_dir, self.registry, channel, self.cfg,
                                   rand=lambda: 1.0)  # the top of the jitter: exact times

    def reply(self, out_id: str, text: str = "hi", *, files: dict[str, bytes] | None = None,
              deliver_after: datetime | None = None) -> str:
        content: dict = {"text": text}
        if files is not None:
            folder = self.paths.outbox / out_id
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
            content["files"] = list(files)
        with schema.opened(self.paths.outbound_db) as conn, schema.transaction(conn):
            conn.execute(
                "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, deliver_after, kind,"
                " content) VALUES (?,?,?,?,?, 'chat', ?)",
                (out_id, self.seq, "msg-1", schema.now_ts(),
                 schema.format_ts(deliver_after) if deliver_after else None,
                 json.dumps(content)))
        self.seq += 2
        return out_id

    def restart(self, channel) -> None:
        """A new process: fresh registry connection, fresh memory, same files."""
        self.registry.close()
        self.registry = Registry(registry_path(self.data_dir))
        self.channel = channel
        self.state = DeliveryState()
        self.deliverer = Deliverer(self.data_dir, self.registry, channel, self.cfg,
                                   rand=lambda: 1.0)  # the top of the jitter: exact times

    def folder(self) -> SessionDir:
        return SessionDir(self.data_dir, "grp", self.row.id)

    def deliver(self, now: datetime):
        async def go():
            with self.folder() as folder:
                messages = outbound.read(folder.db("outbound.db"), after_seq=self.state.watermark,
                                         max_content_bytes=self.cfg.max_content_bytes).messages
                return await self.deliverer.run_pass(
                    folder=folder, agent_group="grp", session_id=self.row.id,
                    state=self.state, messages=messages, routing=ROUTING, now=now)

        return run(go())

    def settled(self) -> dict[str, str]:
        return dict(query(self.paths.inbound_db,
                          "SELECT message_out_id, status FROM delivered"))


# --- retries, backoff, persistent attempts ------------------------------------------------


@pytest.mark.parametrize("boom", [False, True], ids=["delivery-error", "channel-bugs"])
def test_failing_channel_backs_off_persists_attempts_then_fails(tmp_path: Path,
                                                                boom: bool) -> None:
    world = World(tmp_path, FakeChannel(fail={"r-bad": None}, boom=boom), max_attempts=3,
                  retry_base=2.0)
    world.reply("r-bad", files={"a.txt": b"A"})
    world.reply("r-good")

    # attempt 1 fails; the other reply goes through in the same pass
    result = world.deliver(NOW)
    assert result.delivered == ["r-good"] and result.failed == []
    assert world.settled() == {"r-good": "delivered"}
    assert world.registry.delivery_attempt(world.row.id, "r-bad") == (1, later(2))
    assert result.next_due == later(2)
    assert world.state.watermark == 0  # not past the unsettled reply

    # before the retry time: not attempted
    result = world.deliver(later(1.9))
    assert world.channel.calls == ["r-bad", "r-good"]
    assert result.next_due == later(2)

    # the count survives a restart (it is in the registry, not in memory)
    world.restart(FakeChannel(fail={"r-bad": None}, boom=boom))
    assert world.registry.delivery_attempt(world.row.id, "r-bad") == (1, later(2))
    result = world.deliver(later(2))
    assert world.channel.calls == ["r-bad"]  # the settled one is not re-sent
    assert world.registry.delivery_attempt(world.row.id, "r-bad") == (2, later(2 + 4))
    assert result.next_due == later(6)

    # third attempt = max_attempts: recorded failed, attempts cleared, outbox cleaned
    world.reply("r-new")
    result = world.deliver(later(6))
    assert result.failed == ["r-bad"] and result.delivered == ["r-new"]
    assert world.settled() == {"r-good": "delivered", "r-bad": "failed", "r-new": "delivered"}
    assert world.registry.delivery_attempt(world.row.id, "r-bad") == (0, None)
    assert not (world.paths.outbox / "r-bad").exists()
    assert world.state.watermark == 5
    assert result.next_due is None
    assert [r.message_id for r in world.channel.taken] == ["r-new"]


def test_success_after_retries_clears_attempts_and_records_platform_id(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel(fail={"r1": 1}), max_attempts=5, retry_base=0.5)
    world.reply("r1")
    world.deliver(NOW)
    assert world.registry.delivery_attempt(world.row.id, "r1") == (1, later(0.5))
    result = world.deliver(later(0.5))
    assert result.delivered == ["r1"]
    assert world.registry.delivery_attempt(world.row.id, "r1") == (0, None)
    assert query(world.paths.inbound_db, "SELECT status, platform_message_id FROM delivered"
                 " WHERE message_out_id='r1'") == [("delivered", "pm-r1")]


def test_reply_fields_and_files_moved(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel())
    world.reply("r1", "with files", files={"a.txt": b"A", "b.bin": b"\x00\x01"})
    result = world.deliver(NOW)
    assert result.delivered == ["r1"]
    [reply] = world.channel.taken
    dest = delivered_root(world.data_dir) / "r1"
    assert reply.files == (str(dest / "a.txt"), str(dest / "b.bin"))
    assert (dest / "a.txt").read_bytes() == b"A" and (dest / "b.bin").read_bytes() == b"\x00\x01"
    assert not (world.paths.outbox / "r1").exists()
    assert reply.content == {"text": "with files", "files": ["a.txt", "b.bin"]}
    assert (reply.channel_type, reply.platform_id, reply.in_reply_to) == ("chat", "room-1",
                                                                          "msg-1")


def _list_late_file(world: World, out_id: str) -> None:
    """The agent committed the row listing ``late.txt`` before writing the file."""
    world.reply(out_id, files={})
    with schema.opened(world.paths.outbound_db) as conn, schema.transaction(conn):
        conn.execute("UPDATE messages_out SET content=? WHERE id=?",
                     (json.dumps({"text": "x", "files": ["late.txt"]}), out_id))


def test_a_reply_waits_for_its_files_without_spending_attempts(tmp_path: Path) -> None:
    """Files not there yet are not a failed attempt: no backoff, and a recheck timer
    (no event comes from inside outbox/<id>/) that grows to at most a second, so the
    file is delivered at the next look, however often it looked before."""
    world = World(tmp_path, FakeChannel(), max_attempts=2, retry_base=30.0, files_wait=10.0)
    _list_late_file(world, "r1")
    for t, recheck in ((0, 0.05), (0.4, 0.1), (1, 0.25), (3, 0.75)):
        result = world.deliver(later(t))
        assert result.next_due == later(t + recheck)  # not a backoff, not the give-up time
    assert world.channel.calls == [] and world.settled() == {}
    assert world.registry.delivery_attempt(world.row.id, "r1") == (0, None)
    (world.paths.outbox / "r1" / "late.txt").write_bytes(b"late")
    result = world.deliver(later(3.01))
    assert result.delivered == ["r1"] and world.state.waiting_files == {}
    assert (delivered_root(world.data_dir) / "r1" / "late.txt").read_bytes() == b"late"


def test_files_that_never_come_count_as_attempts_after_files_wait(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel(), max_attempts=2, retry_base=1.0, files_wait=5.0)
    _list_late_file(world, "r1")
    world.reply("r2", "unaffected")
    assert world.deliver(NOW).delivered == ["r2"]  # never blocks the replies after it
    first = world.deliver(later(5))
    assert first.failed == [] and world.registry.delivery_attempt(world.row.id, "r1")[0] == 1
    last = world.deliver(first.next_due)
    assert last.failed == ["r1"] and world.settled() == {"r1": "failed", "r2": "delivered"}
    assert world.state.waiting_files == {} and world.channel.calls == ["r2"]


def test_move_files_is_idempotent_after_a_crash(tmp_path: Path) -> None:
    """Files moved by a pass that died before recording the delivery are found again."""
    world = World(tmp_path, FakeChannel())
    world.reply("r1", files={"a.txt": b"A"})
    with world.folder() as folder:
        first = move_files(folder, world.data_dir, "r1", ["a.txt"])
        again = move_files(folder, world.data_dir, "r1", ["a.txt"])
    assert first == again == [delivered_root(world.data_dir) / "r1" / "a.txt"]


@pytest.mark.parametrize("name", ["../escape.txt", "sub/a.txt", "", "."])
def test_file_names_must_be_basenames(tmp_path: Path, name: str) -> None:
    world = World(tmp_path, FakeChannel(), max_attempts=1)
    world.reply("r1", files={})
    with schema.opened(world.paths.outbound_db) as conn, schema.transaction(conn):
        conn.execute("UPDATE messages_out SET content=? WHERE id='r1'",
                     (json.dumps({"text": "x", "files": [name]}),))
    (tmp_path / "escape.txt").write_text("outside")
    result = world.deliver(NOW)
    assert result.failed == ["r1"] and world.channel.calls == []
    assert (tmp_path / "escape.txt").read_text() == "outside"


@pytest.mark.parametrize("out_id", ["../victim", "..", "has space", ".hidden"])
def test_reply_ids_that_are_not_safe_names_are_refused(tmp_path: Path, out_id: str) -> None:
    """Ids name folders (outbox/<id>, delivered/<id>): a path-like id is refused and
    never used to move or remove anything."""
    world = World(tmp_path, FakeChannel(), max_attempts=2, retry_base=1.0)
    victim = world.paths.outbox.parent / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    world.reply(out_id)
    world.reply("r-ok")
    first = world.deliver(NOW)  # permanent: failed at once, not retried (issue 9.4)
    assert (first.delivered, first.failed) == (["r-ok"], [out_id])
    assert world.deliver(later(1)).failed == []
    assert world.settled() == {out_id: "failed", "r-ok": "delivered"}
    assert world.registry.delivery_attempt(world.row.id, out_id) == (0, None)
    assert (victim / "keep.txt").read_text() == "keep"
    assert world.paths.outbox.is_dir() and world.paths.inbound_db.is_file()
    assert world.channel.calls == ["r-ok"]


# --- symlinks are never followed ------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    return outside


def _unchanged(outside: Path) -> None:
    assert (outside / "secret.txt").read_text() == "secret"
    assert not (outside / "secret.txt").is_symlink()


def test_symlinked_file_in_outbox_is_never_followed(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    world = World(tmp_path, FakeChannel(), max_attempts=2, retry_base=1.0)
    world.reply("r1", files={})
    os.symlink(outside / "secret.txt", world.paths.outbox / "r1" / "secret.txt")
    with schema.opened(world.paths.outbound_db) as conn, schema.transaction(conn):
        conn.execute("UPDATE messages_out SET content=? WHERE id='r1'",
                     (json.dumps({"text": "x", "files": ["secret.txt"]}),))
    world.reply("r2")

    result = world.deliver(NOW)  # permanent: failed at once, the next reply goes out
    assert (result.delivered, result.failed) == (["r2"], ["r1"])
    assert world.channel.calls == ["r2"]  # r1 never reached the channel
    assert not (delivered_root(world.data_dir) / "r1" / "secret.txt").exists()
    assert world.deliver(later(1)).failed == []
    assert world.settled()["r1"] == "failed"
    assert not os.path.lexists(world.paths.outbox / "r1")  # the link is removed, not its target
    _unchanged(outside)
    assert [r.message_id for r in world.channel.taken] == ["r2"]


def test_symlinked_outbox_message_folder_is_never_followed(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    world = World(tmp_path, FakeChannel(), max_attempts=1)
    world.reply("r1", files={})
    (world.paths.outbox / "r1").rmdir()
    os.symlink(outside, world.paths.outbox / "r1")
    with schema.opened(world.paths.outbound_db) as conn, schema.transaction(conn):
        conn.execute("UPDATE messages_out SET content=? WHERE id='r1'",
                     (json.dumps({"text": "x", "files": ["secret.txt"]}),))
    result = world.deliver(NOW)
    assert result.failed == ["r1"] and world.channel.calls == []
    assert not os.path.lexists(world.paths.outbox / "r1")
    _unchanged(outside)


@pytest.mark.parametrize("lists_files", [True, False])
def test_symlinked_outbox_folder_is_never_followed(tmp_path: Path, lists_files: bool) -> None:
    """``outbox`` itself replaced by a link: nothing is read or removed through it."""
    outside = _outside(tmp_path)
    (outside / "r1").mkdir()
    (outside / "r1" / "a.txt").write_text("keep me")
    world = World(tmp_path, FakeChannel(), max_attempts=1)
    world.paths.outbox.rmdir()
    os.symlink(outside, world.paths.outbox)
    world.reply("r1")
    if lists_files:
        with schema.opened(world.paths.outbound_db) as conn, schema.transaction(conn):
            conn.execute("UPDATE messages_out SET content=? WHERE id='r1'",
                         (json.dumps({"text": "x", "files": ["a.txt"]}),))
    result = world.deliver(NOW)
    assert (result.failed, result.delivered) == ((["r1"], []) if lists_files else ([], ["r1"]))
    assert (outside / "r1" / "a.txt").read_text() == "keep me"
    assert world.paths.outbox.is_symlink()
    _unchanged(outside)


# --- deliver_after, restarts --------------------------------------------------------------


def test_deliver_after_in_the_future_waits(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel())
    world.reply("r-later", deliver_after=later(30))
    world.reply("r-now")
    result = world.deliver(NOW)
    assert result.delivered == ["r-now"]
    assert result.next_due == later(30)
    assert world.state.watermark == 0
    result = world.deliver(later(29.999))
    assert result.delivered == [] and world.channel.calls == ["r-now"]
    result = world.deliver(later(30))
    assert result.delivered == ["r-later"]
    assert world.state.watermark == 3


def test_restart_does_not_redeliver(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    world = World(tmp_path, JsonlChannel(path))
    world.reply("r1")
    assert world.deliver(NOW).delivered == ["r1"]
    world.channel.close()

    # a restart forgets the watermark: inbound.db's delivered table is the truth
    world.restart(JsonlChannel(path))
    assert world.deliver(later(1)).delivered == []
    assert [line["message_id"] for line in read_lines(path)] == ["r1"]
    world.channel.close()


def test_restart_in_the_crash_window_records_without_a_second_copy(tmp_path: Path) -> None:
    """The channel took the reply, the process died before ``delivered`` was written."""
    path = tmp_path / "out.jsonl"
    world = World(tmp_path, JsonlChannel(path))
    world.reply("r1", files={"a.txt": b"A"})
    world.reply("r2")
    # what a killed pass leaves behind: files moved, line written, nothing recorded
    with world.folder() as folder:
        move_files(folder, world.data_dir, "r1", ["a.txt"])
    run(world.channel.deliver(Reply("r1", world.row.id, "grp", 1, "chat", "msg-1", None, None,
                                    None, "t", {"text": "hi"}, ())))
    world.channel.close()
    assert world.settled() == {}

    world.restart(JsonlChannel(path))
    result = world.deliver(later(1))
    assert result.delivered == ["r1", "r2"]
    assert world.settled() == {"r1": "delivered", "r2": "delivered"}
    assert [line["message_id"] for line in read_lines(path)] == ["r1", "r2"]
    assert not (world.paths.outbox / "r1").exists()
    world.channel.close()


def test_an_unusable_channel_file_counts_as_failed_attempts(tmp_path: Path) -> None:
    """Even when the channel fails before delivering (cannot open its file)."""
    (tmp_path / "out.jsonl").mkdir()
    world = World(tmp_path, JsonlChannel(tmp_path / "out.jsonl"), max_attempts=2, retry_base=1)
    world.reply("r1")
    assert world.deliver(NOW).delivered == []
    assert world.registry.delivery_attempt(world.row.id, "r1") == (1, later(1))
    assert world.deliver(later(1)).failed == ["r1"]
    assert world.settled() == {"r1": "failed"}


def test_jsonl_channel_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"message_id": "r1"}) + "\n" + '{"message_id": "r2", "con')
    channel = JsonlChannel(path)
    assert channel.already_delivered("r1") and not channel.already_delivered("r2")
    channel.close()


# --- in the running supervisor ---------------------------------------------------------------


async def test_supervisor_retries_a_failing_channel_without_blocking_others(tmp_path: Path,
                                                                      reap_agents) -> None:
    cfg = make_config(tmp_path, delivery={"retry_base": 0.2, "max_attempts": 5},
                      lifecycle={"stop_idle_after": 5.0})
    flaky_text = "please be flaky"

    class Flaky(FakeChannel):
        async def deliver(self, reply: Reply) -> str | None:
            if flaky_text in reply.content["text"] and reply.message_id not in self.fail:
                self.fail[reply.message_id] = 2  # the first two attempts fail
            return await super().deliver(reply)

    channel = Flaky()

    client = Client(cfg)
    async with supervised(cfg, channel=channel) as sup:
        row_a, mid_a = client.send("alpha", flaky_text)
        row_b, mid_b = client.send("beta", "plain", platform="p2")
        taken = lambda: {r.in_reply_to: r for r in channel.taken}  # noqa: E731
        await until(lambda: mid_b in taken(), message="the healthy reply")
        await until(lambda: mid_a in taken(), message="the flaky reply, after retries")
        flaky_id = taken()[mid_a].message_id
        assert channel.calls.count(flaky_id) == 3
        assert channel.calls.count(taken()[mid_b].message_id) == 1
        paths = client.paths(row_a)
        await until(lambda: query(paths.inbound_db, "SELECT status FROM delivered WHERE"
                                  " message_out_id=?", (flaky_id,)) == [("delivered",)])
        assert client.registry.delivery_attempt(row_a.id, flaky_id) == (0, None)
        assert sup.tracked[row_a.id].delivery.watermark >= taken()[mid_a].seq
    client.close()


async def test_supervisor_delivers_a_reply_when_its_late_file_lands(tmp_path: Path,
                                                              reap_agents) -> None:
    """An agent that commits the row before writing the file: the outbox/ event of the
    file delivers the reply at once (not after a backoff or ``files_wait``)."""
    cfg = make_config(tmp_path, delivery={"retry_base": 30.0, "files_wait": 60.0},
                      watch={"sweep_interval": 60.0})
    channel = FakeChannel()

    client = Client(cfg)
    async with supervised(cfg, channel=channel) as sup:
        row = client.session("late")
        paths = client.paths(row)
        with schema.opened(paths.outbound_db) as conn, schema.transaction(conn):
            conn.execute(
                "INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                "VALUES ('r-late', 1, ?, 'chat', ?)",
                (schema.now_ts(), json.dumps({"text": "x", "files": ["late.txt"]})))
        await until(lambda: row.id in sup.tracked
                    and "r-late" in sup.tracked[row.id].delivery.waiting_files,
                    message="the row seen by a pass, waiting for its file")
        folder = paths.outbox / "r-late"
        folder.mkdir()
        (folder / "late.txt").write_bytes(b"late")
        [reply] = await until(lambda: channel.taken, timeout=5.0,
                              message="the reply, once its file is there")
        assert reply.files == (str(delivered_root(cfg.data_dir) / "r-late" / "late.txt"),)
        assert channel.calls == ["r-late"]
    client.close()


def test_supervisor_on_a_full_disk_loses_and_duplicates_nothing(tmp_path: Path,
                                                                reap_agents) -> None:
    """data_dir on a real 8 MB tmpfs, filled to the last byte while replies come due,
    then freed: every reply is delivered exactly once, within one sweep, with no
    partial line and none recorded ``failed`` (a full host disk spends no attempts).

    Before: 39 replies became 54 lines (3 replies 6 times each) and the attempt
    counter could not be written.
    """
    from tests.support.mounts import fill, tmpfs

    sessions, per_session, early = 8, 5, 2
    total = sessions * per_session
    disk = tmpfs(tmp_path / "disk", "8m")
    root = disk.__enter__()
    try:
        cfg = make_config(root, delivery={"retry_base": 0.2, "max_attempts": 3},
                          watch={"sweep_interval": 5.0})
        seen: list[str] = []
        sink = logger.add(lambda m: seen.append(m.record["level"].name + " " +
                                                m.record["message"]), level="INFO")

        def write_replies(paths: SessionPaths, prefix: str, due_in: float) -> None:
            with schema.opened(paths.outbound_db) as conn, schema.transaction(conn):
                for i in range(per_session):
                    due = schema.after(due_in) if i >= early else None
                    conn.execute(
                        "INSERT INTO messages_out (id, seq, timestamp, deliver_after, kind,"
                        " content) VALUES (?,?,?,?, 'chat', ?)",
                        (f"{prefix}-r{i}", 2 * i + 1, schema.now_ts(), due,
                         json.dumps({"text": f"reply {i} " + "y" * 1500})))

        def delivered_rows() -> list[tuple]:
            rows: list[tuple] = []
            for paths in all_paths:
                rows += query(paths.inbound_db, "SELECT message_out_id, status FROM delivered")
            return rows

        async def body() -> None:
            nonlocal all_paths
            client = Client(cfg)
            rows = [client.session(f"g{n}", platform=f"p{n}") for n in range(sessions)]
            all_paths = [client.paths(r) for r in rows]
            async with supervised(cfg):
                for n, paths in enumerate(all_paths):  # 2 now, 3 due while the disk is full
                    write_replies(paths, f"s{n}", due_in=1.5)
                await until(lambda: len(delivered_rows()) == sessions * early,
                            message="the replies due before the disk fills")
                filler = fill(root)
                await until(lambda: any("cannot append" in s or "full" in s for s in seen),
                            timeout=10, message="deliveries failing on the full disk")
                # every session has tried its late replies on the full disk (each says so
                # once per outage) — not just "some time has passed" — then three more
                # retry periods (0.5 s on a full disk) go by without a delivery
                await until(lambda: all(any(r.id in s and "replies wait" in s for s in seen)
                                        for r in rows), timeout=15,
                            message="every session's late replies tried on the full disk")
                await holds(lambda: len(delivered_rows()) == sessions * early, 1.5,
                            message="nothing delivered while the disk is full")
                filler.unlink()
                freed = time.monotonic()
                await until(lambda: len(delivered_rows()) == total, timeout=10,
                            message="every reply after space is freed")
                recovery = time.monotonic() - freed
                assert recovery < cfg.watch.sweep_interval, recovery
            client.close()

        all_paths: list[SessionPaths] = []
        try:
            run(body())
        finally:
            logger.remove(sink)
        data = cfg.delivery.path.read_bytes()
        lines = data.splitlines()
        ids = [json.loads(line)["message_id"] for line in lines]  # no partial line
        assert data.endswith(b"\n")
        assert len(lines) == total and len(set(ids)) == total  # 0 duplicated, 0 lost
        assert sorted(delivered_rows()) == sorted((i, "delivered") for i in ids)
        assert not any(s.startswith("ERROR") and "giving up" in s for s in seen)
    finally:
        disk.__exit__(None, None, None)


# --- where a reply goes ------------------------------------------------------------------------

CHAT = ("slack", "C9", "t3")


@pytest.mark.parametrize("own, answered, default, expected", [
    (("chat", "p1", "t1"), CHAT, ROUTING, ("chat", "p1", "t1")),  # the agent said where
    ((None, None, None), CHAT, ROUTING, CHAT),  # back to the chat of the message it answers
    ((None, None, None), None, ROUTING, ROUTING),  # answers nothing known: session default
    ((None, None, None), (None, None, None), ROUTING, ROUTING),
    ((None, None, None), None, (None, None, None), (None, None, None)),  # agent-shared
    (("chat", None, None), CHAT, ROUTING, ("chat", "room-1", None)),  # fields filled in
    ((None, None, "t9"), CHAT, ROUTING, CHAT),  # a thread alone is not a chat
])
def test_reply_route(own, answered, default, expected):
    from orchestrator.engine.delivery import reply_route

    assert reply_route(own, answered, default) == expected


def test_a_reply_without_a_route_goes_back_to_the_chat_it_answers(tmp_path: Path) -> None:
    channel = FakeChannel()
    world = World(tmp_path, channel)
    world.sessions.write_message(world.row, {"text": "q"}, message_id="msg-1", trigger=0,
                                 routing=CHAT)
    world.reply("r1")  # in_reply_to msg-1, no routing of its own
    assert world.deliver(NOW).delivered == ["r1"]
    (taken,) = channel.taken
    assert (taken.channel_type, taken.platform_id, taken.thread_id) == CHAT
