"""Admission: which waiting sessions may start an agent now, and which idle agent
gives its slot up. Pure functions of (agents, queue, caps, now).

Why a cap at all: every session with due work used to get an agent at once, so a
burst of 300 messages meant 300 agents (5 GB of local processes; 150 GB of Docker
memory limits). With ``[runtime] max_agents`` at most that many agents run, and the
rest wait in one queue ordered by the time their oldest due message became due — not
by session or group, so a busy group cannot starve the others, and a session that has
waited longest goes first.

What counts against the cap is everything that runs or is about to: the runtime's
live agents (adopted ones after a restart included) and the starts already granted
but not finished. An agent being stopped still counts until it has exited; its slot is
promised to the head of the queue meanwhile, so no second agent is stopped for the
same waiting session.

An agent gives way only if it has nothing to do: no claim (a running agent with a
claim is never stopped for room), no acked message still owed its answer (for at
most ``answer_wait``), no due work, and no work (start, reply, claim) for ``make_room_after``
seconds; the one idle longest goes first. Heartbeats do not count: a heartbeat says
the agent is alive, not that it works, and an agent that only heartbeats would
otherwise hold its slot for as long as it likes while others wait (issue #21).

``groups`` caps are optional per agent group (``{group: max_agents}``): a queued
session whose group is at its own cap keeps its place but does not block sessions of
other groups behind it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping, Sequence

AUTO_PER_CPU = 4  # agents mostly wait on a model API: a few share a core
AUTO_MEMORY_SHARE = 0.75  # leave a quarter of RAM to the host, the orchestrator, caches
DEFAULT_AGENT_MEMORY = 512 * 1024 * 1024  # when [docker] memory says nothing usable


@dataclass(frozen=True, slots=True)
class Agent:
    """A live agent (or one being started), as admission sees it."""

    session_id: str
    group: str
    last_work: datetime | None  # newest start, reply or claim (never a heartbeat)
    claims: int = 0
    due: int = 0  # due messages of its session that it has not claimed yet
    stopping: bool = False  # a stop is under way or has been asked for
    busy: bool = False  # an acked message still awaits its answer (answers.answer_due)


@dataclass(frozen=True, slots=True)
class Waiting:
    """A session with due work and no agent, waiting for a slot."""

    session_id: str
    group: str
    due_since: datetime  # when its oldest due message became due


@dataclass(frozen=True, slots=True)
class Plan:
    start: tuple[str, ...] = ()  # sessions to start now, in queue order
    stop: tuple[str, ...] = ()  # idle agents to stop to make room, longest idle first
    recheck_at: datetime | None = None  # when an agent becomes idle enough to give way


def queue_order(waiting: Sequence[Waiting]) -> list[Waiting]:
    """Oldest due work first; the session id breaks ties so the order is stable."""
    return sorted(waiting, key=lambda w: (w.due_since, w.session_id))


def gives_way_at(agent: Agent, make_room_after: float) -> datetime | None:
    """When this agent may be stopped for room, or None while it has work (ever)."""
    if (agent.claims or agent.due or agent.stopping or agent.busy
            or agent.last_work is None):
        return None
    return agent.last_work + timedelta(seconds=make_room_after)


def may_give_way(agent: Agent, now: datetime, make_room_after: float) -> bool:
    at = gives_way_at(agent, make_room_after)
    return at is not None and at <= now


def plan(agents: Sequence[Agent], starting: Mapping[str, str], waiting: Sequence[Waiting],
         cap: int, now: datetime, make_room_after: float,
         groups: Mapping[str, int] | None = None) -> Plan:
    """Admit from the head of the queue while slots are free; past the cap, stop idle
    agents (longest idle first) for the sessions still waiting.

    ``agents``: live agents; ``starting``: granted starts not yet running
    ({session: group}); ``cap`` 0 = no cap; ``groups``: per-group caps (0 = none).
    """
    groups = groups or {}
    live = {a.session_id for a in agents}
    used = len(live | set(starting))
    per_group: dict[str, int] = {}
    for a in agents:
        per_group[a.group] = per_group.get(a.group, 0) + 1
    for sid, group in starting.items():
        if sid not in live:
            per_group[group] = per_group.get(group, 0) + 1
    # slots that free up soon (a stop under way), any group or per group
    freeing = [a for a in agents if a.stopping]
    idle = sorted((a for a in agents if may_give_way(a, now, make_room_after)),
                  key=lambda a: (a.last_work, a.session_id))
    start: list[str] = []
    stop: list[str] = []
    blocked = False  # someone is still waiting after this pass
    for w in queue_order(waiting):
        if w.session_id in live or w.session_id in starting:
            continue
        gcap = groups.get(w.group, 0)
        group_full = bool(gcap) and per_group.get(w.group, 0) >= gcap
        full = bool(cap) and used >= cap
        if not full and not group_full:
            start.append(w.session_id)
            used += 1
            per_group[w.group] = per_group.get(w.group, 0) + 1
            continue
        blocked = True
        # room for it comes from a stop under way, else from the longest-idle agent;
        # a full group needs one of its own agents to go, a full host any agent
        for pool in (freeing, idle):
            found = next((a for a in pool if not group_full or a.group == w.group), None)
            if found is not None:
                pool.remove(found)
                if pool is idle:
                    stop.append(found.session_id)
                break
        if not freeing and not idle and full:
            break  # nothing more can start or make room: the rest just wait
    recheck = None
    if blocked:
        stopped = set(stop)
        times = [gives_way_at(a, make_room_after) for a in agents
                 if a.session_id not in stopped]
        future = [t for t in times if t is not None and t > now]
        recheck = min(future) if future else None
    return Plan(tuple(start), tuple(stop), recheck)


# --- the cap itself -----------------------------------------------------------------


def parse_size(text: str) -> int | None:
    """Docker's memory notation ('512m', '2g', '1048576') in bytes; None if unusable."""
    text = text.strip().lower().removesuffix("b")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    mult = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    try:
        value = float(digits)
    except ValueError:
        return None
    size = int(value * mult)
    return size if size > 0 else None


def auto_max_agents(memory_total: int, cpus: int, agent_memory: int | None) -> int:
    """The host-derived cap: min(AUTO_PER_CPU × CPUs, 3/4 of RAM / per-agent memory)."""
    per_agent = agent_memory or DEFAULT_AGENT_MEMORY
    by_memory = int(memory_total * AUTO_MEMORY_SHARE) // per_agent
    return max(1, min(AUTO_PER_CPU * max(1, cpus), by_memory))


def host_memory() -> int:
    """MemTotal from /proc/meminfo in bytes (0 if unreadable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resolve_max_agents(setting: int | str, agent_memory: str) -> tuple[int, str]:
    """(cap, why) for ``[runtime] max_agents``; reads the host only for "auto"."""
    if setting != "auto":
        cap = int(setting)
        return cap, ("no cap ([runtime] max_agents = 0)" if cap == 0
                     else f"[runtime] max_agents = {cap}")
    memory, cpus = host_memory(), os.cpu_count() or 1
    per_agent = parse_size(agent_memory)
    if not memory:
        cap = AUTO_PER_CPU * cpus
        return cap, f"auto: {AUTO_PER_CPU} x {cpus} CPUs (host memory unknown)"
    cap = auto_max_agents(memory, cpus, per_agent)
    shown = agent_memory if per_agent else f"{DEFAULT_AGENT_MEMORY >> 20}m"
    return cap, (f"auto: min({AUTO_PER_CPU} x {cpus} CPUs, 3/4 of {memory >> 20} MiB RAM / "
                 f"{shown} per agent)")
