"""``[lifecycle] max_run`` end to end on the local runtime: real agents, real kills.

A busy agent (it claims its message and works, heartbeating, far longer than its
lifetime) is killed ``max_run + max_run_grace`` after its start and its message
is retried once, by a fresh agent, and answered exactly once; an idle agent past
``max_run`` is stopped politely. The stop reason is in the registry (``status``),
the event log and the stop-reason metric. The rules are table tests in
tests/rules/test_lifecycle.py.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from orchestrator.contract.schema import parse_ts
from tests.support.e2e import (
    Client,
    agent_pids,
    make_config,
    milestones,
    pairs,
    replies_to,
    reply_counts,
    serving,
)
from tests.support.helpers import query, until

# the reference agent; its first start works 60 s on each message, the later ones not at all
SLOW_FIRST = '''
import os, sys
counter = sys.argv[1]
try:
    n = int(open(counter).read() or 0)
except FileNotFoundError:
    n = 0
with open(counter, "w") as fh:
    fh.write(str(n + 1))
work = "60" if n == 0 else "0"
os.execv(sys.executable, [sys.executable, "-m", "orchestrator.agent", "--work-seconds", work,
                          *sys.argv[2:]])
'''


def slow_first_agent(tmp_path: Path) -> list[str]:
    wrapper = tmp_path / "slow_first.py"
    wrapper.write_text(SLOW_FIRST)
    return ["{python}", str(wrapper), str(tmp_path / "starts"), "--poll-interval", "0.02",
            "--heartbeat-interval", "0.1"]


def stops(service, reason: str, group: str) -> float:
    """The stop-reason counter (a group not in the config is labelled "other")."""
    value = service.api.metrics.registry.get_sample_value(
        "orchestrator_agent_stops_total", {"reason": reason, "agent_group": group})
    return value or 0.0


def status_events(service, session_id: str) -> list[str]:
    return [e.data.get("reason", "") for e in service.api.events.since(0)
            if e.kind == "status" and e.data.get("session_id") == session_id]


async def test_a_busy_agent_is_killed_after_max_run_and_grace_and_its_work_retried_once(
        tmp_path: Path, reap_agents) -> None:
    lc = {"max_run": 1.5, "max_run_grace": 1.0, "idle_after": 0.5, "stop_idle_after": 30.0}
    cfg = make_config(tmp_path, command=slow_first_agent(tmp_path), lifecycle=lc)

    client = Client(cfg)
    async with serving(cfg) as service:
        row, mid = client.send("busy", "work long")
        paths = client.paths(row)
        [reply] = await until(lambda: replies_to(cfg, mid), timeout=30, message="the reply")
        changes = client.registry.status_changes(row.id)
        # the second agent, idle past its max_run, is stopped politely too
        await until(lambda: client.container_status(row.id) == "stopped"
                    and not agent_pids(paths.root), timeout=15, message="second agent stopped")
        later = client.registry.status_changes(row.id)
        events = status_events(service, row.id)
        killed_count = stops(service, "max_run", "other")

    assert reply["content"]["text"] == "echo: work long"
    assert reply_counts(cfg) == {reply["message_id"]: 1}
    assert int((tmp_path / "starts").read_text()) == 2
    seq = pairs(milestones(changes))
    assert [s for s, _ in seq[:3]] == ["running", "stopped", "running"], seq
    killed = seq[1][1]
    assert killed.startswith("killed: max_run: ran ") and killed.endswith(
        "(max_run 1.5s) and was not idle within max_run_grace (1s)"), killed
    at = [parse_ts(c["at"]) for c in milestones(changes)]
    # not before max_run + grace; well before the 60 s of work would have ended
    assert timedelta(seconds=2.5) <= at[1] - at[0] < timedelta(seconds=10), at
    # retried exactly as after a stuck kill: tries + 1, then completed by the next agent
    [(status, tries)] = query(paths.inbound_db,
                              "SELECT status, tries FROM messages_in WHERE id=?", (mid,))
    assert (status, tries) == ("completed", 1)
    last = pairs(milestones(later))[-1]
    assert last[0] == "stopped" and last[1].startswith("stopped: max_run: ran "), later
    # the reason is in the event log and the stop-reason metric too
    assert any(r.startswith("killed: max_run") for r in events), events
    assert any(r.startswith("stopped: max_run") for r in events), events
    assert killed_count == 2
    client.close()


async def test_an_idle_agent_past_max_run_is_stopped_politely(tmp_path: Path,
                                                              reap_agents) -> None:
    # idle stop far away: only the lifetime can end this agent
    lc = {"max_run": 2.0, "max_run_grace": 30.0, "idle_after": 0.3, "stop_idle_after": 60.0}
    cfg = make_config(tmp_path, lifecycle=lc)

    client = Client(cfg)
    async with serving(cfg) as service:
        row, mid = client.send("calm", "hello")
        paths = client.paths(row)
        await until(lambda: replies_to(cfg, mid), message="the reply")
        await until(lambda: client.container_status(row.id) == "stopped"
                    and not agent_pids(paths.root), timeout=15, message="stopped at max_run")
        changes = client.registry.status_changes(row.id)
        stopped = stops(service, "max_run", "other")

    seq = pairs(milestones(changes))
    assert [s for s, _ in seq] == ["running", "stopped"], seq
    assert seq[1][1].startswith("stopped: max_run: ran ") and seq[1][1].endswith(
        "s (max_run 2s)"), seq
    at = [parse_ts(c["at"]) for c in milestones(changes)]
    assert timedelta(seconds=2.0) <= at[1] - at[0] < timedelta(seconds=8), at
    assert stopped == 1
    assert reply_counts(cfg) == {replies_to(cfg, mid)[0]["message_id"]: 1}
    client.close()

