"""An agent waiting on its question card keeps its slot and its card goes out once
(issue 21: "a make-room stop of an agent waiting on a question card delivers the card
twice").

At the cap (``max_agents = 1``, ``make_room_after = 0.2``) a second session's work waits
while the first session's agent asks a question and waits, silent, for the answer —
NanoClaw's runner holds the asking message's claim while its ``ask_user_question`` tool
waits. The make-room rule must not stop it (a stop would lose the wait, and the retried
claim would ask again: a second card), and the waiting session must be served as soon
as the answer lets the first agent finish and give way — within ``make_room_after``,
not after ``answer_wait`` (the reply after the answer names the answer's system row,
which must not take the reply from the prompt that asked) nor ``stop_idle_after`` (the
plan, which saw the asker working, must look again when its claim is answered).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.cli import commands as cli
from tests.support.e2e import Client, make_config, milestones, pairs, replies, run, supervised
from tests.support.helpers import REPO, until

SCRIPT = REPO / "tests" / "support" / "nanoclaw_agent.py"
AGENT = [sys.executable, str(SCRIPT), "--silent", "0.2"]
LIFECYCLE = {"idle_after": 0.3, "stop_idle_after": 120.0, "claim_stuck": 30.0,
             "answer_wait": 60.0, "backoff_base": 0.2}


def cards(cfg) -> list[dict]:
    return [r for r in replies(cfg) if isinstance(r["content"], dict)
            and r["content"].get("type") == "ask_question"]


def texts(cfg, session_id: str) -> list[str]:
    return [str(r["content"].get("text")) for r in replies(cfg)
            if r["session_id"] == session_id and isinstance(r["content"], dict)
            and r["content"].get("text")]


async def scenario(cfg, config_path: Path) -> None:
    client = Client(cfg)
    try:
        async with supervised(cfg):
            asking, _ = client.send("nano", "ask", platform="asker")
            (card,) = await until(lambda: cards(cfg), timeout=60, message="the question card")
            other, waiting = client.send("nano", "hello", platform="other")
            await until(lambda: client.registry.session(other.id).queued_since is not None,
                        timeout=30, message="the other session queued behind the cap")
            # The window in which a make-room stop would come: the asker has done nothing
            # but wait since its card, and the rule's delay is 0.2 s. Five times that, with
            # the queue non-empty all along, and the asker is still the one running.
            window_end = time.monotonic() + 5 * 0.2
            await until(lambda: time.monotonic() >= window_end, timeout=5)
            assert client.registry.session(other.id).queued_since is not None
            assert client.container_status(asking.id) == "running"
            starts = [s for s, _ in pairs(milestones(client.registry.status_changes(asking.id)))]
            assert starts == ["running"], starts  # never stopped while it waits
            assert len(cards(cfg)) == 1
            assert cli.main(["answer", "--config", str(config_path), asking.id,
                             card["content"]["questionId"], "yes"]) == 0
            await until(lambda: any("chose yes" in t for t in texts(cfg, asking.id)),
                        timeout=60, message="the asker's answer after the card was answered")
            await until(lambda: any(t.startswith(f"answer to {waiting}:")
                                    for t in texts(cfg, other.id)),
                        timeout=15, message="the queued session served once the asker gave way")
        assert len(cards(cfg)) == 1, cards(cfg)
        asker = pairs(milestones(client.registry.status_changes(asking.id)))
        assert [s for s, _ in asker][:2] == ["running", "stopped"], asker
        assert [s for s, _ in asker].count("running") == 1, asker
        assert asker[1][1].startswith("stopped: making room for queued work"), asker
    finally:
        client.close()


def test_an_agent_waiting_on_its_question_keeps_its_slot_and_asks_once(
        tmp_path: Path, reap_agents) -> None:  # noqa: F811
    cfg = make_config(tmp_path, command=AGENT, lifecycle=LIFECYCLE,
                      runtime={"max_agents": 1, "make_room_after": 0.2})
    config_path = tmp_path / "config.toml"
    config_path.write_text(f'data_dir = "{cfg.data_dir}"\n')
    run(scenario(cfg, config_path), timeout=120)
