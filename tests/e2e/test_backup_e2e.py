"""Backup and restore under load: a real ``orchestrator run`` (a subprocess) answering
100 messages, ``orchestrator backup`` taken while its replies are in flight, the run
stopped part-way, the documented restore into a fresh data dir (the backup's two
stores, the session folders, delivered/ and the channel's file copied back), a new
``run`` started there: every message answered exactly once, nothing lost, nothing
delivered twice."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import tomli_w

from orchestrator.config.load import read_config
from orchestrator.contract.layout import registry_path
from orchestrator.host.backup import STORES
from tests.support.e2e import Client, OrchestratorProcess, config_dict, replies
from tests.support.helpers import query, wait_for

SESSIONS, PER_SESSION = 4, 25


def answered(data_dir: Path) -> int:
    total = 0
    for db in (data_dir / "sessions").glob("*/*/inbound.db"):
        total += query(db, "SELECT COUNT(*) FROM messages_in WHERE status='completed'")[0][0]
    return total


def test_a_backup_taken_while_replies_are_in_flight_restores_without_loss_or_doubles(
        tmp_path: Path, reap_agents) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    raw = config_dict(first_dir, agent_args=["--work-seconds", "0.08"],
                      lifecycle={"stop_idle_after": 60.0})
    config = first_dir / "config.toml"
    config.write_text(tomli_w.dumps(raw))
    cfg = read_config(config)
    client = Client(cfg)
    sent = [client.send(f"group-{i % SESSIONS}", f"message {i}")[1]
            for i in range(SESSIONS * PER_SESSION)]
    client.close()
    total = len(sent)

    run = OrchestratorProcess(config, first_dir / "run.log")
    try:
        run.wait_up()
        wait_for(lambda: len(replies(cfg)) >= 15, timeout=60, message="replies flowing")
        before = len(replies(cfg))
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator", "backup", str(tmp_path / "backup"),
             "--config", str(config), "--json"], capture_output=True, text=True, timeout=60,
            cwd=first_dir)
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        after = len(replies(cfg))
        # taken mid-flight: replies went out before, during and after it
        assert 0 < before <= after < total, (before, after)
        wait_for(lambda: len(replies(cfg)) >= after + 10, timeout=60,
                 message="more replies after the backup")
    finally:
        assert run.end(signal.SIGTERM) == 0, run.text()
    stopped_at = len(replies(cfg))
    assert stopped_at < total, "the run must stop with work left for the restored one"
    report = json.loads(done.stdout)
    assert {f["name"] for f in report["files"]} == set(STORES)
    print(f"backup: {seconds:.3f} s for the CLI, "
          + ", ".join(f"{f['name']} {f['bytes']} B in {f['seconds']} s" for f in report["files"]))

    # the documented restore, into a fresh data dir: the stores from the backup, the
    # rest as files (copied once the run had stopped)
    new_data = second_dir / "data"
    shutil.copytree(cfg.data_dir / "sessions", new_data / "sessions", symlinks=True)
    if (cfg.data_dir / "delivered").exists():  # reply files (none in this test)
        shutil.copytree(cfg.data_dir / "delivered", new_data / "delivered", symlinks=True)
    shutil.copy2(cfg.data_dir / "delivered.jsonl", new_data / "delivered.jsonl")
    for name in STORES:
        shutil.copy2(tmp_path / "backup" / name, new_data / name)
    raw2 = config_dict(second_dir, agent_args=["--work-seconds", "0.01"],
                       lifecycle={"stop_idle_after": 60.0})
    config2 = second_dir / "config.toml"
    config2.write_text(tomli_w.dumps(raw2))
    cfg2 = read_config(config2)
    assert cfg2.data_dir == new_data and registry_path(new_data).exists()

    second = OrchestratorProcess(config2, second_dir / "run.log")
    try:
        second.wait_up()
        wait_for(lambda: answered(new_data) == total and len(replies(cfg2)) >= total,
                 timeout=90, message="every message answered after the restore")
    finally:
        assert second.end(signal.SIGTERM) == 0, second.text()

    lines = replies(cfg2)
    by_message = Counter(r["in_reply_to"] for r in lines)
    assert set(by_message) == set(sent), set(sent) - set(by_message)  # nothing lost
    assert set(by_message.values()) == {1}, by_message.most_common(3)  # nothing twice
    assert len({r["message_id"] for r in lines}) == len(lines) == total
    for db in new_data.glob("sessions/*/*/inbound.db"):
        assert dict(query(db, "SELECT status, COUNT(*) FROM delivered GROUP BY status")) == {
            "delivered": PER_SESSION}
