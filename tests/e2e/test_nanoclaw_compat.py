"""NanoClaw's agent-runner behaviour against our session folders (issue 15), end to end.

``tests/support/nanoclaw_agent.py`` does what NanoClaw v2's runner does (replies only to
destinations, acks follow-ups ``completed`` before answering them, is silent while
its model thinks and while a tool runs, reads ``localPath``, asks a question and
waits for its answer). It runs under the real supervisor (local runtime, inotify,
SQLite). The idle timings are short on purpose — idle after 0.5 s, stopped 0.5 s
later — and the model is silent for longer (1.5 s per prompt, a 2.5 s tool), so
every follow-up would be lost if only claims counted as work.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.cli import commands as cli
from orchestrator.config.model import Config
from orchestrator.host import inbound
from tests.support.e2e import Client, make_config, milestones, pairs, replies, run, supervised
from tests.support.helpers import REPO, query, until

SCRIPT = REPO / "tests" / "support" / "nanoclaw_agent.py"
AGENT = [sys.executable, str(SCRIPT), "--silent", "1.5"]
# short on purpose: a silent model (1.5 s) or tool (2.5 s) outlasts idle + stop (1 s)
LIFECYCLE = {"idle_after": 0.5, "stop_idle_after": 0.5, "claim_stuck": 30.0,
             "answer_wait": 60.0, "backoff_base": 0.2}


def answers_to(cfg, mid: str) -> list[dict]:
    return [r for r in replies(cfg) if isinstance(r["content"], dict)
            and str(r["content"].get("text", "")).startswith(f"answer to {mid}:")]


def lifecycle_of(client: Client, session_id: str) -> list[tuple[str, str]]:
    """Starts and stops, in order. A second "stopped" record right after one (the Docker
    runtime may report a stopped container once more when it is removed) is merged:
    what matters here is when agents started and why they stopped."""
    out: list[tuple[str, str]] = []
    for status, reason in pairs(milestones(client.registry.status_changes(session_id))):
        if not (out and out[-1][0] == status == "stopped"):
            out.append((status, reason))
    return out


def answer_counts(cfg) -> Counter:
    return Counter(str(r["content"].get("text", "")).split(":")[0] for r in replies(cfg)
                   if isinstance(r["content"], dict) and r["content"].get("text"))


async def scenario(cfg: Config, config_path: Path, signed: str) -> None:
    """The whole story against one running supervisor; exact counts at the end."""
    client = Client(cfg)
    try:
        async with supervised(cfg):
            # --- phase A: one query, follow-ups pushed into it, a tool, a question ---------
            row, m1 = client.send("nano", "first")
            paths = client.paths(row)
            await until(lambda: query(paths.outbound_db, "SELECT 1 FROM processing_ack"),
                        timeout=60, message="the first batch claimed")
            mids = [m1]
            for text in ("second", "third"):
                mids.append(client.sessions.write_message(
                    row, {"text": text, "sender": "Ann"},
                    routing=client.sessions.routing_of(row))[0])
            mids.append(client.send("nano", "see file", files={"note.txt": b"hello file"})[1])
            mids.append(client.send("nano", "tool:2.5")[1])
            mids.append(client.send("nano", "ask")[1])
            _, m7 = client.send("nano", "from the web", channel="web", platform="room 1")
            (card,) = await until(lambda: [r for r in replies(cfg) if isinstance(
                r["content"], dict) and r["content"].get("type") == "ask_question"],
                timeout=60, message="the question card")
            assert cli.main(["answer", "--config", str(config_path), row.id,
                             card["content"]["questionId"], "yes"]) == 0
            await until(lambda: all(answers_to(cfg, m) for m in mids + [m7]), timeout=60,
                        message="every message of phase A answered")
            await until(lambda: client.container_status(row.id) == "stopped", timeout=30,
                        message="stopped by the idle rule once everything was answered")
            phase_a = lifecycle_of(client, row.id)
            assert [s for s, _ in phase_a] == ["running", "stopped"], phase_a
            assert phase_a[1][1].startswith("stopped: idle for"), phase_a

            # --- phase B: the agent dies with a follow-up acked but not answered --------
            _, warm = client.send("nano", "warm up")
            await until(lambda: query(paths.outbound_db, "SELECT 1 FROM processing_ack WHERE"
                                      " message_id=? AND status='processing'", (warm,)),
                        timeout=60, message="the warm-up claimed")
            _, die = client.send("nano", "die")
            await until(lambda: answers_to(cfg, die), timeout=60, message="the retried answer")
            await until(lambda: client.container_status(row.id) == "stopped", timeout=30)

        # exact counts: every message answered once, the card once, nothing else
        counts = answer_counts(cfg)
        for mid in mids + [m7, warm, die]:
            assert counts[f"answer to {mid}"] == 1, (mid, counts)
        assert len(replies(cfg)) == len(mids) + 3 + 1  # + m7, warm, die; + the card
        texts = {mid: answers_to(cfg, mid)[0]["content"]["text"] for mid in mids + [m7]}
        assert "sender=Ann" in texts[mids[1]] and "sender=Unknown" in texts[m1]
        assert all(f"by {signed}" in t for t in texts.values()), texts
        assert "read note.txt (10 bytes): hello file" in texts[mids[3]]
        assert "tool done" in texts[mids[4]]
        assert "chose yes" in texts[mids[5]]
        # replies went to destinations: the web chat's answer to the web chat
        (web,) = answers_to(cfg, m7)
        assert (web["channel_type"], web["platform_id"]) == ("web", "room 1")
        assert {(r["channel_type"], r["platform_id"]) for r in replies(cfg)
                if r["session_id"] == row.id} == {("cli", "local")}
        # the dying agent's acked-but-unanswered message was retried once
        rows = {r["id"]: r for r in inbound.read_messages(paths.inbound_db)}
        assert rows[die]["tries"] == 1 and rows[die]["status"] == "completed"
        assert all(rows[m]["tries"] == 0 for m in mids + [warm])
        phases = lifecycle_of(client, row.id)
        assert [s for s, _ in phases] == ["running", "stopped"] * 3, phases
        assert phases[3][1] == "agent exited, exit code 3", phases
        assert phases[5][1].startswith("stopped: idle for"), phases
    finally:
        client.close()


def test_nanoclaw_runner_behaviour_loses_nothing(tmp_path: Path, reap_agents) -> None:  # noqa: F811
    cfg = make_config(tmp_path, command=AGENT, lifecycle=LIFECYCLE)
    config_path = tmp_path / "config.toml"
    config_path.write_text(f'data_dir = "{cfg.data_dir}"\n')
    run(scenario(cfg, config_path, "?"), timeout=180)


@pytest.mark.docker
def test_nanoclaw_runner_behaviour_in_docker_with_a_group_folder(
        tmp_path: Path, agent_image: str, instance: str) -> None:  # noqa: F811
    """The same story with the agent in a container: the script is mounted from the
    tests folder, the group folder at /workspace/agent carries its container.json."""
    data = tmp_path / "data"
    groups = data / "groups" / "nano"
    groups.mkdir(parents=True)
    (groups / "container.json").write_text('{"assistantName": "Andy"}')
    cfg = make_config(tmp_path, lifecycle=LIFECYCLE, runtime={"kind": "docker"}, docker={
        "instance": instance, "image": agent_image, "network": "none",
        "command": ["python3", "/opt/nanoclaw/agent.py", "--workspace", "/workspace",
                    "--silent", "1.5"],
        "mounts": [f"{SCRIPT}:/opt/nanoclaw/agent.py:ro"],
        "allowed_mounts": [str(SCRIPT.parent)],
        "group_folder": "{data_dir}/groups/{group}"})
    config_path = tmp_path / "config.toml"
    config_path.write_text(f'data_dir = "{cfg.data_dir}"\n')
    run(scenario(cfg, config_path, "Andy"), timeout=240)
