"""The paused tier end to end on the local runtime: real agents, SIGSTOP / SIGCONT.

An idle agent is frozen after ``pause_idle_after``, thawed (not restarted: same
pid) by new work, still stopped after ``stop_idle_after``, and never killed by
the stuck rules for the time it spent frozen. The rules themselves are table
tests in test_lifecycle.py; the Docker flavour is in test_docker_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.runtime.local.procs import process_stopped
from tests.support.e2e import Client, agent_pids, make_config, replies_to, supervised
from tests.support.helpers import until


def reasons(client: Client, session_id: str) -> list[str]:
    return [reason for _status, reason in client.statuses(session_id)]


def frozen(pids: list[int]) -> bool:
    return len(pids) == 1 and process_stopped(pids[0])


async def answered_then_frozen(client: Client, cfg) -> tuple:
    """A first message answered, then its agent left idle until it is frozen:
    (the session row, its paths, the agent's pid)."""
    row, m1 = client.send("helpers", "first")
    paths = client.paths(row)
    await until(lambda: replies_to(cfg, m1), message="first reply")
    [pid] = await until(lambda: agent_pids(paths.root), message="agent pid")
    await until(lambda: frozen(agent_pids(paths.root)), message="agent frozen")
    return row, paths, pid


async def test_paused_agent_resumed_by_work_then_stopped_after_stop_idle_after(
        tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, lifecycle={"idle_after": 0.3, "pause_idle_after": 0.3,
                                           "stop_idle_after": 4.0})

    client = Client(cfg)
    async with supervised(cfg) as sup:
        row, m1 = client.send("helpers", "first")
        paths = client.paths(row)
        await until(lambda: replies_to(cfg, m1), message="first reply")
        [pid] = await until(lambda: agent_pids(paths.root), message="agent pid")
        await until(lambda: frozen(agent_pids(paths.root)), message="agent frozen (state T)")
        await until(lambda: sup.runtime.is_paused(row.id), message="runtime says paused")
        assert client.container_status(row.id) == "idle"  # paused is a detail of idle
        assert client.registry.session(row.id).status_reason.startswith("paused after")

        _, m2 = client.send("helpers", "second")
        [reply] = await until(lambda: replies_to(cfg, m2), 10, message="reply after resume")
        assert reply["content"]["text"] == "echo: second"
        assert agent_pids(paths.root) == [pid]  # thawed, not restarted
        assert "resumed: 1 message(s) due" in reasons(client, row.id)

        # frozen again, and still stopped once stop_idle_after has passed
        await until(lambda: frozen(agent_pids(paths.root)), message="frozen again")
        await until(lambda: client.container_status(row.id) == "stopped"
                    and not agent_pids(paths.root), 15, message="stopped after idling")
    found = reasons(client, row.id)
    assert found[-1].startswith("stopped: idle for"), found
    assert not [r for r in found if r.startswith("killed")], found
    assert sum(r.startswith("paused after") for r in found) == 2, found
    assert sum(r.startswith("agent started") for r in found) == 1, found
    client.close()


async def test_a_paused_agent_is_not_killed_for_its_frozen_time(tmp_path: Path, reap_agents) -> None:
    """Frozen for longer than both stuck windows, then thawed by work it claims: its
    heartbeat from before the freeze is older than the ceiling, yet nothing is killed."""
    cfg = make_config(tmp_path, lifecycle={"idle_after": 0.2, "pause_idle_after": 0.2,
                                           "stop_idle_after": 60.0, "ceiling": 0.5,
                                           "claim_stuck": 0.5},
                      agent_args=["--work-seconds", "0.3", "--heartbeat-interval", "0.1"])

    client = Client(cfg)
    async with supervised(cfg):
        row, paths, pid = await answered_then_frozen(client, cfg)
        hb = paths.heartbeat.stat().st_mtime
        # stay frozen well past ceiling and claim_stuck
        await until(lambda: __import__("time").time() - hb > 1.5, 5, interval=0.05,
                    message="frozen past the stuck windows")
        assert frozen(agent_pids(paths.root))
        _, m2 = client.send("helpers", "second")
        [reply] = await until(lambda: replies_to(cfg, m2), 10, message="reply after resume")
        assert reply["content"]["text"] == "echo: second"
        assert agent_pids(paths.root) == [pid]
    found = reasons(client, row.id)
    assert not [r for r in found if r.startswith("killed")], found
    assert "resumed: 1 message(s) due" in found
    client.close()


async def test_a_paused_agent_left_at_shutdown_is_adopted_paused_and_thawed_by_work(
        tmp_path: Path, reap_agents) -> None:
    """on_shutdown = "leave": the frozen agent outlives the orchestrator; the next one
    adopts it as paused (its state read from /proc) and thaws it for new work."""
    cfg = make_config(tmp_path, runtime={"on_shutdown": "leave"},
                      lifecycle={"idle_after": 0.3, "pause_idle_after": 0.3,
                                 "stop_idle_after": 60.0})

    client = Client(cfg)
    async with supervised(cfg):
        row, paths, pid = await answered_then_frozen(client, cfg)
    assert frozen(agent_pids(paths.root))  # left as it was
    async with supervised(cfg) as sup:
        assert sup.runtime.is_paused(row.id)
        _, m2 = client.send("helpers", "second")
        [reply] = await until(lambda: replies_to(cfg, m2), 10, message="reply after thaw")
        assert reply["content"]["text"] == "echo: second"
        assert agent_pids(paths.root) == [pid]
        await sup.runtime.stop(row.id, 2.0)  # leave nothing behind
    client.close()
