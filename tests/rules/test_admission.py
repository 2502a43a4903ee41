"""The admission rules, table-tested: who starts, who makes room, in what order."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.rules import admission
from orchestrator.rules.admission import (
    Agent,
    Plan,
    Waiting,
    auto_max_agents,
    gives_way_at,
    host_memory,
    parse_size,
    plan,
    queue_order,
    resolve_max_agents,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def idle(sid: str, seconds: float, group: str = "g", **kw) -> Agent:
    return Agent(sid, group, ago(seconds), **kw)


def wait(sid: str, seconds: float, group: str = "g") -> Waiting:
    return Waiting(sid, group, ago(seconds))


CASES = [
    # (id, agents, starting, waiting, cap, groups, expected start, expected stop)
    ("no cap starts everyone", [idle("a", 0)], {}, [wait("q1", 1), wait("q2", 2)], 0, {},
     ("q2", "q1"), ()),
    ("free slots in due order", [], {}, [wait("late", 1), wait("early", 9), wait("mid", 5)],
     2, {}, ("early", "mid"), ()),
    ("ties broken by session id", [], {}, [wait("b", 3), wait("a", 3)], 1, {}, ("a",), ()),
    ("starts in flight count", [], {"s1": "g", "s2": "g"}, [wait("q", 1)], 2, {}, (), ()),
    ("a live agent and its own start count once", [idle("s1", 0)], {"s1": "g"},
     [wait("q", 1)], 2, {}, ("q",), ()),
    ("already starting is not started twice", [], {"q": "g"}, [wait("q", 1)], 3, {}, (), ()),
    ("full: the longest idle gives way", [idle("a", 5), idle("b", 50), idle("c", 10)], {},
     [wait("q", 1)], 3, {}, (), ("b",)),
    ("one stop per waiting session", [idle("a", 5), idle("b", 50), idle("c", 10)], {},
     [wait("q1", 1), wait("q2", 2)], 3, {}, (), ("b", "c")),
    ("a claim is never stopped", [idle("a", 99, claims=1), idle("b", 3)], {},
     [wait("q", 1)], 2, {}, (), ("b",)),
    ("due work is not idle", [idle("a", 99, due=1)], {}, [wait("q", 1)], 1, {}, (), ()),
    ("an answer owed is not idle", [idle("a", 99, busy=True)], {},
     [wait("q", 1)], 1, {}, (), ()),
    ("no work for make_room_after gives way however it heartbeats (last_work has none)",
     [idle("a", 2)], {}, [wait("q", 1)], 1, {}, (), ("a",)),
    ("recently active keeps its slot", [idle("a", 1)], {}, [wait("q", 1)], 1, {}, (), ()),
    ("no stop while nobody waits", [idle("a", 99)], {}, [], 1, {}, (), ()),
    ("a stop under way serves the head", [idle("a", 99, stopping=True), idle("b", 99)], {},
     [wait("q", 1)], 2, {}, (), ()),
    ("a stop under way plus one more", [idle("a", 99, stopping=True), idle("b", 50)], {},
     [wait("q1", 1), wait("q2", 1)], 2, {}, (), ("b",)),
    ("over the cap after a restart: nothing starts",
     [idle("a", 0), idle("b", 0), idle("c", 0)], {}, [wait("q", 1)], 2, {}, (), ()),
    ("group cap skips, others go on", [idle("a", 0, "busy")], {},
     [wait("q1", 9, "busy"), wait("q2", 1, "calm")], 5, {"busy": 1}, ("q2",), ()),
    ("group cap: only its own agent gives way",
     [idle("a", 5, "busy"), idle("x", 99, "calm")], {}, [wait("q", 9, "busy")], 5,
     {"busy": 1}, (), ("a",)),
    ("group cap 0 = no group cap", [idle("a", 0, "busy")], {}, [wait("q", 1, "busy")], 5,
     {"busy": 0}, ("q",), ()),
    ("group counts starts in flight", [], {"s": "busy"}, [wait("q", 1, "busy")], 5,
     {"busy": 1}, (), ()),
    ("group cap counts each live agent of the group once",
     [idle("a", 0, "busy"), idle("b", 0, "busy")], {},
     [wait("q1", 9, "busy"), wait("q2", 1, "busy")], 0, {"busy": 3}, ("q1",), ()),
    ("group cap counts each start in flight of the group once", [],
     {"s1": "busy", "s2": "busy"}, [wait("q1", 9, "busy"), wait("q2", 1, "busy")], 0,
     {"busy": 3}, ("q1",), ()),
    ("group cap of an empty group: starts up to exactly the cap", [], {},
     [wait("q1", 9, "busy"), wait("q2", 5, "busy"), wait("q3", 1, "busy")], 0, {"busy": 2},
     ("q1", "q2"), ()),
    ("group cap 1 of an empty group: one starts", [], {},
     [wait("q1", 9, "busy"), wait("q2", 1, "busy")], 0, {"busy": 1}, ("q1",), ()),
    ("a queued session that already runs is passed over, not the end of the queue",
     [idle("a", 0)], {}, [wait("a", 9), wait("q", 1)], 0, {}, ("q",), ()),
    ("host cap reached exactly: nothing starts", [idle("a", 0)], {"s": "g"},
     [wait("q", 1)], 2, {}, (), ()),
]


@pytest.mark.parametrize("name,agents,starting,waiting,cap,groups,start,stop", CASES,
                         ids=[c[0] for c in CASES])
def test_plan(name, agents, starting, waiting, cap, groups, start, stop) -> None:
    result = plan(agents, starting, waiting, cap, NOW, 2.0, groups)
    assert (result.start, result.stop) == (start, stop)


def test_recheck_when_the_next_agent_becomes_idle_enough() -> None:
    agents = [idle("a", 0.5), idle("b", 1.5), idle("c", 1, claims=1)]
    result = plan(agents, {}, [wait("q", 1)], 3, NOW, 2.0)
    assert result == Plan((), (), ago(1.5) + timedelta(seconds=2))


def test_no_recheck_for_an_agent_that_gives_way_exactly_now() -> None:
    # boundary: its give-way time equals now; it is not stopped (wrong group), and a
    # recheck "now" would only spin the loop
    agents = [idle("x", 99, "busy", claims=1), idle("a", 2.0, "calm")]
    result = plan(agents, {}, [wait("q", 1, "busy")], 0, NOW, 2.0, {"busy": 1})
    assert result == Plan((), (), None)


def test_no_recheck_without_waiting_work() -> None:
    assert plan([idle("a", 0.5)], {}, [], 1, NOW, 2.0).recheck_at is None


@pytest.mark.parametrize("agent,expected", [
    (idle("a", 0), NOW + timedelta(seconds=2)),
    (idle("a", 0, claims=1), None),
    (idle("a", 0, due=2), None),
    (idle("a", 0, stopping=True), None),
    (idle("a", 0, busy=True), None),
    (Agent("a", "g", None), None),
])
def test_gives_way_at(agent, expected) -> None:
    assert gives_way_at(agent, 2.0) == expected


def test_queue_order_is_oldest_due_first() -> None:
    order = queue_order([wait("x", 1), wait("y", 30), wait("z", 30), wait("w", 5)])
    assert [w.session_id for w in order] == ["y", "z", "w", "x"]


@pytest.mark.parametrize("text,expected", [
    ("512m", 512 << 20), ("2g", 2 << 30), ("2G", 2 << 30), ("1048576", 1 << 20),
    ("64k", 64 << 10), ("1.5g", int(1.5 * (1 << 30))), ("512mb", 512 << 20),
    ("", None), ("lots", None), ("0", None), ("-1m", None), ("1t", 1 << 40), ("1", 1),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


GIB = 1 << 30


@pytest.mark.parametrize("memory,cpus,per_agent,expected", [
    (24 * GIB, 2, 512 << 20, 8),  # CPU-bound: 4 x 2
    (4 * GIB, 16, 512 << 20, 6),  # memory-bound: 3 GiB / 512 MiB
    (1 * GIB, 8, 2 * GIB, 1),  # never below one
    (64 * GIB, 8, None, 32),  # no usable limit: 512 MiB assumed
    (10 * GIB, 16, 512 << 20, 15),  # 3/4 of RAM exactly: 7.5 GiB / 512 MiB (4/5 would be 16)
    (64 * GIB, 1, 512 << 20, 4),  # one CPU: 4 x 1
    (64 * GIB, 0, 512 << 20, 4),  # no CPU count: taken as one
])
def test_auto_max_agents(memory, cpus, per_agent, expected) -> None:
    cap = auto_max_agents(memory, cpus, per_agent)
    assert cap == expected and type(cap) is int


def test_auto_memory_share_is_three_quarters() -> None:
    assert admission.AUTO_MEMORY_SHARE == 0.75  # README and the "why" line say "3/4 of RAM"


@pytest.mark.parametrize("setting,cap,why", [
    (0, 0, "no cap ([runtime] max_agents = 0)"), (3, 3, "[runtime] max_agents = 3"),
    (1, 1, "[runtime] max_agents = 1"), ("2", 2, "[runtime] max_agents = 2"),
])
def test_explicit_max_agents_is_taken_as_is(setting, cap, why) -> None:
    assert resolve_max_agents(setting, "512m") == (cap, why)


def meminfo_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        [line] = [ln for ln in fh if ln.startswith("MemTotal:")]
    number, unit = line.split()[1:3]
    assert unit == "kB"
    return int(number) * 1024


def test_host_memory_is_memtotal_in_bytes() -> None:
    assert host_memory() == meminfo_total() > 0


def test_host_memory_unreadable_is_zero(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError("no /proc here")

    monkeypatch.setattr(admission, "open", refuse, raising=False)
    assert host_memory() == 0


@pytest.mark.parametrize("memory,cpus,agent_memory,cap,why", [
    (10 * GIB, 16, "1g", 7, "auto: min(4 x 16 CPUs, 3/4 of 10240 MiB RAM / 1g per agent)"),
    (10 * GIB, 16, "lots", 15,
     "auto: min(4 x 16 CPUs, 3/4 of 10240 MiB RAM / 512m per agent)"),
    (64 * GIB, 3, "512m", 12, "auto: min(4 x 3 CPUs, 3/4 of 65536 MiB RAM / 512m per agent)"),
    (64 * GIB, None, "512m", 4,
     "auto: min(4 x 1 CPUs, 3/4 of 65536 MiB RAM / 512m per agent)"),
    # host memory unknown (host_memory() returned 0): CPUs alone, and said so
    (0, 3, "512m", 12, "auto: 4 x 3 CPUs (host memory unknown)"),
    (0, None, "512m", 4, "auto: 4 x 1 CPUs (host memory unknown)"),
])
def test_auto_max_agents_from_the_host(monkeypatch, memory, cpus, agent_memory, cap,
                                       why) -> None:
    monkeypatch.setattr(admission, "host_memory", lambda: memory)
    monkeypatch.setattr(admission.os, "cpu_count", lambda: cpus)
    assert resolve_max_agents("auto", agent_memory) == (cap, why)


def test_auto_max_agents_reads_the_host() -> None:
    cap, why = resolve_max_agents("auto", "512m")
    expected = auto_max_agents(meminfo_total(), os.cpu_count() or 1, 512 << 20)
    assert cap == expected and why.startswith("auto: min(")
