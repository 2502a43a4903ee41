"""The agent cap end to end: real agent processes, real inotify, real SQLite.

How many agents run is counted from the kernel (a thread scanning /proc for
agent command lines under this test's sessions folder), never from the
orchestrator's own bookkeeping.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import docker
import pytest
import tomli_w
from loguru import logger

from orchestrator.config.load import load_config, read_config
from orchestrator.contract.layout import registry_path, session_paths, sessions_root
from orchestrator.contract.schema import utcnow
from orchestrator.engine.admission_gate import AdmissionGate
from orchestrator.engine.tracked import Tracked
from orchestrator.host import status
from orchestrator.host.registry import Registry
from orchestrator.rules import answers
from orchestrator.rules.lifecycle import Action, Claim, Verdict
from orchestrator.runtime.docker.spec import LABEL_INSTANCE
from tests.support.e2e import (
    Client,
    OrchestratorProcess,
    agent_pids,
    config_dict,
    replies,
    replies_to,
    run,
    supervised,
)
from tests.support.fakes import LiveRuntime
from tests.support.helpers import query, until, wait_for


class Census:
    """Counts live agent processes of one data dir, from /proc, every few ms."""

    def __init__(self, data_dir: Path, interval: float = 0.01) -> None:
        self.marker = f"--workspace {sessions_root(data_dir)}/".encode()
        self.interval = interval
        self.peak = 0
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        return self._count_processes()

    def _count_processes(self) -> int:
        n = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read()  # empty for a zombie
            except OSError:
                continue
            if self.marker in cmd.replace(b"\0", b" "):
                n += 1
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.count())
            self.scans += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "Census":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class DockerCensus(Census):
    """Counts this test's live containers from the engine (``docker ps`` with the
    test's instance label), as often as the engine answers."""

    def __init__(self, client: docker.DockerClient, instance: str) -> None:
        super().__init__(Path("/"), interval=0.02)
        self.client = client
        self.label = f"{LABEL_INSTANCE}={instance}"

    def count(self) -> int:
        # what plain ``docker ps`` lists: running containers, paused ones included.
        # sparse: the list alone, no inspect of each (a container removed between the
        # two raised NotFound and ended the census thread, and with it the count)
        return len(self.client.containers.list(filters={"label": [self.label]},
                                               sparse=True))


def gate_with(tmp_path: Path, runtime: LiveRuntime, cap: int):
    registry = Registry(registry_path(tmp_path))
    tracked: dict[str, Tracked] = {}
    marked: list[str] = []
    statuses: list[tuple[str, str]] = []

    def track(sid: str, **kw) -> Tracked:
        registry.ensure_agent_group("g")
        registry.get_or_create_session(resolution_key=sid, agent_group_id="g",
                                       messaging_group_id=None, thread_id=None, new_id=sid)
        t = tracked[sid] = Tracked("g", sid, session_paths(tmp_path, "g", sid), **kw)
        return t

    gate = AdmissionGate(cap, 1.0, tracked, runtime, registry,
                         lambda sid, flags: marked.append(sid),
                         lambda t, st, reason, now: statuses.append((t.session_id, reason)),
                         utcnow)
    return gate, track, marked, statuses, registry


async def planned(gate: AdmissionGate) -> None:
    """Until the plan poked by the last change has run (it is scheduled, not called):
    a "nothing changed" check after it then says something."""
    seen = gate.evaluations
    await until(lambda: gate.evaluations > seen, 5, "the plan ran")


START = Verdict("stopped", "1 message(s) due", Action.START)
QUIET = Verdict("idle", "no heartbeat", Action.NONE)


async def test_gate_queues_past_the_cap_and_a_claim_declines_to_make_room(tmp_path: Path) -> None:
    """The races the end-to-end tests cannot aim at: a claim that arrives after the plan
    picked its agent keeps the agent; the next plan picks another one."""
    now = utcnow()
    gate, track, marked, statuses, registry = gate_with(tmp_path, LiveRuntime("busy", "quiet"), 3)
    long_ago = now - timedelta(seconds=60)
    busy = track("busy", started_at=long_ago)
    quiet = track("quiet", started_at=now - timedelta(seconds=30))
    assert gate.review(track("first"), START, now) is START  # a free slot: at once
    assert gate.granted == {"first": "g"}
    held = gate.review(track("waits"), START, now)  # 2 live + 1 starting = the cap
    assert (held.action, held.reason) == (Action.NONE, "queued")
    assert statuses == [("waits", "queued: #1 in line, 2 of max_agents 3 running")]
    assert registry.session("waits").queued_since is not None
    assert gate.stats().queued == 1 and gate.queue_length() == 1
    await planned(gate)  # the plan: "busy" has been quiet longest
    assert gate.asked_to_make_room() == {"busy"} and marked == ["busy"]
    busy.evidence.claims = (Claim("m1", now),)  # ... but claimed a message meanwhile
    assert gate.review(busy, Verdict("running", "active"), now).action is Action.NONE
    await planned(gate)  # so the next plan asks the other one
    assert gate.asked_to_make_room() == {"quiet"} and marked == ["busy", "quiet"]
    stop = gate.review(quiet, QUIET, now)
    assert stop.action is Action.STOP and stop.reason.startswith("making room")
    gate.start_done("first")  # its start finished: not "starting" any more
    gate.runtime.ids.discard("quiet")  # the stop took effect
    gate.agent_exited("quiet")
    await planned(gate)
    assert gate.granted == {"waits": "g"} and marked[-1] == "waits"
    assert registry.session("waits").queued_since is None
    assert gate.review(gate.tracked["waits"], START, now) is START
    registry.close()


@pytest.mark.parametrize("evidence, gives_way", [
    ({"heartbeat_at": 0}, True),  # beating right now: alive, not working
    ({"heartbeat_at": 0, "tool_running": True, "tool_timeout": 3600.0}, True),  # no claim
    ({"heartbeat_at": 0, "claims": (Claim("m1", None),)}, False),
    ({"heartbeat_at": 0, "last_reply_at": 0}, False),  # answered just now
    ({"heartbeat_at": 0, "answers": "owed"}, False),  # acked, its answer still owed
], ids=["heartbeat only", "a tool without a claim", "a claim", "a reply", "an answer owed"])
async def test_what_keeps_a_slot_when_work_waits(tmp_path: Path, evidence: dict,
                                                 gives_way: bool) -> None:
    """max_agents = 1, the agent started a minute ago: only work (a claim, a reply, an
    acked message owed its answer) keeps its slot; a heartbeat does not (issue #21)."""
    now = utcnow()
    gate, track, marked, _statuses, registry = gate_with(tmp_path, LiveRuntime("holder"), 1)
    holder = track("holder", started_at=now - timedelta(seconds=60))
    for key, value in evidence.items():
        if value == 0:
            value = now
        elif value == "owed":
            value = answers.step(answers.Answers(), now=now, answer_wait=600.0, claims={},
                                 completed={"m1": now}, replies=[])
        setattr(holder.evidence, key, value)
    held = gate.review(track("waits"), START, now)
    assert held.reason == "queued"
    await planned(gate)
    assert (gate.asked_to_make_room() == {"holder"}) is gives_way
    if gives_way:
        stop = gate.review(holder, QUIET, now)
        assert stop.action is Action.STOP and stop.reason.startswith("making room")
    registry.close()


async def test_a_grant_that_never_starts_gives_its_slot_back(tmp_path: Path) -> None:
    now = utcnow()
    gate, track, marked, _, registry = gate_with(tmp_path, LiveRuntime(), 1)
    assert gate.review(track("stuck"), START, now) is START  # its start never comes
    assert gate.review(track("next"), START, now).reason == "queued"
    await planned(gate)
    assert gate.granted == {"stuck": "g"} and marked == []  # the slot is still held
    gate.seats["stuck"].since = now - timedelta(seconds=61)
    gate.poke()
    await planned(gate)
    assert gate.granted == {"next": "g"} and marked == ["next"]
    registry.close()


async def test_nothing_starts_under_a_cap_until_the_runtime_has_listed_its_agents(
        tmp_path: Path) -> None:
    """Docker down at start-up: agents from before the restart may still run, so a
    start now could pass the cap once they are adopted."""
    now = utcnow()
    runtime = LiveRuntime()
    runtime.listed = False
    gate, track, marked, _, registry = gate_with(tmp_path, runtime, 2)
    assert gate.review(track("a"), START, now).reason == "queued"
    await planned(gate)
    assert gate.granted == {} and marked == []
    runtime.listed = True  # the runtime listed its agents: none survived
    gate.runtime_available()
    await planned(gate)
    assert gate.granted == {"a": "g"} and marked == ["a"]
    registry.close()


def started(client: Client, session_id: str) -> list[str]:
    return [r for s, r in client.statuses(session_id) if s == "running"
            and r.startswith("agent started")]


def test_cap_of_four_with_forty_sessions(tmp_path: Path, reap_agents) -> None:
    """40 sessions get work at once under max_agents = 4: never more than 4 agent
    processes; all 40 answered exactly once; idle agents make room (the idle stop
    itself is 300 s away, so only that can free a slot); an agent holding a claim
    (it hangs on its message) keeps its slot throughout; the queue is fair."""
    cfg = load_config(config_dict(
        tmp_path, agent_args=["--hang-on", "HANG"],
        runtime={"max_agents": 4, "make_room_after": 0.5},
        lifecycle={"idle_after": 300.0, "stop_idle_after": 300.0, "claim_stuck": 300.0}),
        tmp_path)
    admitted: list[str] = []
    sink = logger.add(lambda m: admitted.append(m.record["message"].split()[1].rstrip(":")),
                      filter=lambda r: "admitted after" in r["message"])

    async def body() -> None:
        client = Client(cfg)
        rows = [client.session(f"group-{i % 4}", platform=f"room-{i}") for i in range(40)]
        async with supervised(cfg):
            with Census(cfg.data_dir) as census:
                _, hang_mid = client.send("group-0", "HANG on to this", platform="room-0")
                mids = {hang_mid: rows[0].id}
                for i, row in enumerate(rows[1:], 1):
                    mids[client.sessions.write_message(
                        row, {"text": f"message {i}"}, routing=client.sessions.routing_of(row)
                    )[0]] = row.id
                hung = client.paths(rows[0]).root
                [hang_pid] = await until(lambda: agent_pids(hung), timeout=30,
                                         message="the claim-holding agent")

                def queued_in_status() -> list[int]:
                    return sorted(r.queue_position for r in status.collect(
                        cfg.data_dir, client.registry) if r.queue_position)

                seen = await until(queued_in_status, message="the queue in status")
                assert seen == list(range(1, len(seen) + 1))
                await until(lambda: len(replies(cfg)) >= 39, timeout=150, interval=0.1,
                            message="39 replies")
                assert agent_pids(hung) == [hang_pid], "the agent with a claim was stopped"
                assert census.count() == 4
            assert census.scans > 100
            peak = census.peak
        return client, rows, mids, peak

    try:
        client, rows, mids, peak = run(body(), timeout=200)
    finally:
        logger.remove(sink)
    assert peak == 4, f"{peak} agents ran at once under max_agents = 4"
    hang_mid, hang_sid = next(iter(mids.items()))
    got = replies(cfg)
    assert Counter(r["in_reply_to"] for r in got) == {m: 1 for m in mids if m != hang_mid}
    assert len({r["message_id"] for r in got}) == 39
    # the claim-holding agent ran from the start until the shutdown stopped it
    changes = client.statuses(hang_sid)
    start = changes.index(("running", "agent started, 1 message(s) due"))
    assert changes[start:] == [("running", "agent started, 1 message(s) due"),
                               ("stopped", "stopped at orchestrator shutdown")], changes
    # every session started exactly once; 36 starts needed a make-room stop
    assert [len(started(client, r.id)) for r in rows] == [1] * 40
    room = [r.id for r in rows
            if any(reason.startswith("stopped: making room") for _, reason in
                   client.statuses(r.id))]
    assert len(room) == 36, room
    assert hang_sid not in room
    queued = [r.id for r in rows if any(reason.startswith("queued: #") for _, reason in
                                         client.statuses(r.id))]
    assert len(queued) == 36 and len(admitted) == 36
    # fair: admitted in the order their work became due (= sending order here)
    order = {sid: i for i, sid in enumerate(r.id for r in rows)}
    assert [order[s] for s in admitted] == sorted(order[s] for s in admitted)
    assert all(r.queued_since is None for r in client.registry.sessions())
    client.close()


def test_a_heartbeat_only_agent_gives_its_slot_to_waiting_work(tmp_path: Path,
                                                                 reap_agents) -> None:
    """max_agents = 1: an agent that has answered and then only touches .heartbeat
    (--idle-heartbeat) holds no claim and no due work, so it is stopped for the session
    waiting behind it within make_room_after of its last work, however often it
    heartbeats (issue #21: it used to keep the slot until it left by itself)."""
    cfg = load_config(config_dict(
        tmp_path, agent_args=["--idle-heartbeat", "0.1"],
        runtime={"max_agents": 1, "make_room_after": 1.0},
        lifecycle={"idle_after": 300.0, "stop_idle_after": 300.0}), tmp_path)

    async def body() -> float:
        client = Client(cfg)
        async with supervised(cfg):
            with Census(cfg.data_dir) as census:
                first, first_mid = client.send("g", "first", platform="room-1")
                await until(lambda: replies_to(cfg, first_mid), timeout=30,
                            message="the first session's reply")
                holder = client.paths(first).root
                [pid] = await until(lambda: agent_pids(holder), message="the slot holder")
                hb = holder / ".heartbeat"
                beat = hb.stat().st_mtime_ns
                await until(lambda: hb.stat().st_mtime_ns != beat, message="a heartbeat")
                sent = time.monotonic()
                _, second_mid = client.send("g", "second", platform="room-2")
                await until(lambda: replies_to(cfg, second_mid), timeout=45, interval=0.05,
                            message="the waiting session's reply")
                waited = time.monotonic() - sent
                assert agent_pids(holder) == [], "the heartbeat-only agent kept running"
                assert census.peak == 1
            reasons = [r for _, r in client.statuses(first.id)]
            assert any(r.startswith("stopped: making room") for r in reasons), reasons
        client.close()
        return waited

    waited = run(body(), timeout=90)
    logger.info("the waiting session got its reply after {:.2f}s", waited)
    assert waited < 10.0, f"the waiting session waited {waited:.1f}s"


def test_sigkill_mid_queue_loses_nothing(tmp_path: Path, reap_agents) -> None:
    """The orchestrator is SIGKILLed while sessions wait for a slot: the next one
    adopts the agents left running (they count against the cap), derives the queue
    from the session folders again, and answers every message exactly once."""
    data = config_dict(tmp_path, runtime={"max_agents": 2, "make_room_after": 0.5},
                       lifecycle={"idle_after": 300.0, "stop_idle_after": 300.0})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(data))
    cfg = read_config(config_file)
    client = Client(cfg)
    rows = [client.session("burst", platform=f"room-{i}") for i in range(12)]

    def waiting() -> int:
        return sum(1 for r in client.registry.sessions() if r.queued_since is not None)

    with Census(cfg.data_dir) as census:
        first = OrchestratorProcess(config_file, tmp_path / "first.log")
        try:
            first.wait_up()
            mids = [client.sessions.write_message(r, {"text": f"m{i}"},
                                                  routing=client.sessions.routing_of(r))[0]
                    for i, r in enumerate(rows)]
            wait_for(lambda: len(replies(cfg)) >= 2 and waiting() >= 4, timeout=60,
                     message="some answered, some still queued")
        finally:
            assert first.end(signal.SIGKILL) == -signal.SIGKILL
        unanswered = len(mids) - len(replies(cfg))
        assert unanswered >= 4
        survivors = sorted(p for r in rows for p in agent_pids(client.paths(r).root))
        assert 1 <= len(survivors) <= 2

        second = OrchestratorProcess(config_file, tmp_path / "second.log")
        try:
            second.wait_up()
            wait_for(lambda: len(replies(cfg)) >= len(mids), timeout=90, interval=0.05,
                     message="every message answered after the restart")
            assert "adopted agent pid" in second.text()
        finally:
            assert second.end(signal.SIGTERM) == 0, second.text()
        peak = census.peak

    assert peak == 2, f"{peak} agents ran at once under max_agents = 2"
    counts = Counter(r["in_reply_to"] for r in replies(cfg))
    assert counts == {m: 1 for m in mids}
    for r in rows:  # completed in inbound.db, and nothing left marked queued
        assert query(client.paths(r).inbound_db, "SELECT status FROM messages_in") == [
            ("completed",)]
    assert waiting() == 0
    client.close()


DOCKER_AGENT = ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace",
                "--poll-interval", "0.05", "--heartbeat-interval", "0.2", "--hang-on", "HANG"]


@pytest.mark.docker
def test_docker_cap_of_two_with_six_sessions_and_a_sigkill(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    """The same on a real engine, counted with ``docker ps``: max_agents = 2, six
    sessions (one agent hangs holding its claim, so one slot serves the other five,
    idle containers making room), the orchestrator SIGKILLed mid-queue and restarted."""
    data = config_dict(tmp_path, runtime={"kind": "docker", "max_agents": 2,
                                          "make_room_after": 0.5, "start_retry_max": 2.0},
                       docker={"instance": instance, "image": agent_image,
                               "network": "none", "command": DOCKER_AGENT},
                       lifecycle={"idle_after": 300.0, "stop_idle_after": 300.0,
                                  "claim_stuck": 300.0})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(data))
    cfg = read_config(config_file)
    client = Client(cfg)
    rows = [client.session("burst", platform=f"room-{i}") for i in range(6)]
    send = client.sessions.write_message

    def waiting() -> int:
        return sum(1 for r in client.registry.sessions() if r.queued_since is not None)

    with DockerCensus(docker_client, instance) as census:
        first = OrchestratorProcess(config_file, tmp_path / "first.log")
        try:
            first.wait_up()
            hang_mid = send(rows[0], {"text": "HANG on"},
                            routing=client.sessions.routing_of(rows[0]))[0]
            mids = [send(r, {"text": f"m{i}"}, routing=client.sessions.routing_of(r))[0]
                    for i, r in enumerate(rows[1:], 1)]
            wait_for(lambda: len(replies(cfg)) >= 1 and waiting() >= 2, timeout=90,
                     interval=0.05, message="one answered, some still queued")
        finally:
            assert first.end(signal.SIGKILL) == -signal.SIGKILL
        assert len(replies(cfg)) <= 3

        second = OrchestratorProcess(config_file, tmp_path / "second.log")
        try:
            second.wait_up()
            wait_for(lambda: len(replies(cfg)) >= len(mids), timeout=120, interval=0.1,
                     message="every message answered after the restart")
            # the claim-holder is still the one container it was: never stopped for room
            # (its "agent started" record may be lost with the SIGKILL that came right
            # after: then the restart's adoption is its only record, and no stop)
            hang = client.statuses(rows[0].id)
            assert not any("making room" in r for _, r in hang), hang
            ran = [i for i, (st, _) in enumerate(hang) if st == "running"]
            assert ran, hang  # started, or (its record lost) adopted after the restart
            assert not any(st == "stopped" for st, _ in hang[ran[0]:]), hang  # never since
            assert sum(1 for _, r in hang if r.startswith("agent started")) <= 1, hang
        finally:
            assert second.end(signal.SIGTERM) == 0, second.text()
        peak = census.peak

    assert census.scans > 20
    assert peak == 2, f"{peak} containers ran at once under max_agents = 2"
    assert Counter(r["in_reply_to"] for r in replies(cfg)) == {m: 1 for m in mids}
    assert hang_mid not in {r["in_reply_to"] for r in replies(cfg)}
    assert waiting() == 0
    client.close()
