"""An upgrade from a data dir written by an earlier commit of this project.

``tests/fixtures/upgrade-<commit>.tar.gz`` was made by
``scripts/make_upgrade_fixture.sh`` running that commit's code (the last one before
schema versions): real sessions whose three messages were answered and delivered,
three messages sent while nothing ran (pending), and two replies an agent wrote
while nothing ran (undelivered); ``fixture.json`` names them. The current code opens
it: the registry and the event log are migrated to the current schema versions, every
pending message is answered once, the undelivered replies go out once, and nothing
delivered before the upgrade goes out again. A session's log from before runs were
kept apart becomes its run 0.
"""

from __future__ import annotations

import json
import sqlite3
import tarfile
from collections import Counter
from pathlib import Path

from orchestrator.api.events import SCHEMA_VERSION as EVENTS_VERSION
from orchestrator.contract.layout import registry_path
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.host.registry_schema import SCHEMA_VERSION
from tests.support.e2e import Client, make_config, replies, supervised
from tests.support.helpers import query, until

FIXTURE = Path(__file__).parents[1] / "fixtures" / "upgrade-9708206.tar.gz"


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def status_of(data_dir: Path, message_id: str) -> str | None:
    for db in data_dir.glob("sessions/*/*/inbound.db"):
        rows = query(db, "SELECT status FROM messages_in WHERE id=?", (message_id,))
        if rows:
            return rows[0][0]
    return None


async def test_a_data_dir_from_before_schema_versions_upgrades_and_delivers_once(
        tmp_path: Path, reap_agents) -> None:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    data = tmp_path / "data"
    made = json.loads((data / "fixture.json").read_text())
    assert user_version(registry_path(data)) == 0 and user_version(data / "events.db") == 0
    before = Counter(r["in_reply_to"] for r in replies(make_config(tmp_path)))
    assert before == Counter(made["delivered"])  # answered and delivered by the old code

    cfg = make_config(tmp_path)
    assert cfg.data_dir == data
    client = Client(cfg)
    async with supervised(cfg):
        expected = made["delivered"] + made["pending"] + made["answered_while_down"]
        await until(lambda: Counter(r["in_reply_to"] for r in replies(cfg)).keys()
                    >= set(expected), timeout=30, message="every message answered")
        await until(lambda: all(status_of(data, m) == "completed"
                                for m in made["pending"] + made["answered_while_down"]),
                    message="every message completed")
    client.close()

    counts = Counter(r["in_reply_to"] for r in replies(cfg))
    assert counts == Counter(expected), counts  # each exactly once, none lost
    ids = Counter(r["message_id"] for r in replies(cfg))
    assert set(ids.values()) == {1}
    assert {"out-down-0", "out-down-1"} <= set(ids)  # the replies written while down
    assert user_version(registry_path(data)) == SCHEMA_VERSION
    assert user_version(data / "events.db") == EVENTS_VERSION
    # the sessions that ran again: their old log is run 0, the new run is run 1
    logs = AgentLogs.of(cfg)
    ran = {p.parent.name: p.name for p in data.glob("sessions/g[123]/*")}
    for group, session_id in ran.items():
        assert logs.runs(group, session_id) == [0, 1], (group, logs.runs(group, session_id))
        assert not (data / "logs" / group / f"{session_id}.log").exists()
