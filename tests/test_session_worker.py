"""The session worker on real files: a real supervisor, the reference agent as a
real subprocess (local runtime), real SQLite and inotify. The rules it applies
are table-tested in test_lifecycle.py; here is what applying them does on disk.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from e2e import (Client, failures, make_config, replies_to, reap_agents, run,  # noqa: F401
                 supervised, until)
from helpers import query


def message_status(paths, message_id: str) -> str:
    [(status,)] = query(paths.inbound_db, "SELECT status FROM messages_in WHERE id=?",
                        (message_id,))
    return status


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
            assert sup.tracked[row.id].start_errors == 0  # counted afresh for new work

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
