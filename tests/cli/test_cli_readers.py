"""``orchestrator status`` (a real subprocess, with a deadline) over a data dir where
every hostile case of tests/support/hostile.py is planted at once, each in its own
session: it returns in time, each bad session's row has a one-line error, the good
rows are whole (docs/contract.md §11, "Every reader is contained")."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from tests.support.e2e import config_dict
from tests.support.helpers import REPO
from tests.support.hostile import build_world, release_fifos, table

BOUND = 10.0  # seconds for the whole command, interpreter start-up included


def status(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(config_dict(tmp_path)))
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--config",
                               str(config), *extra], cwd=REPO, capture_output=True,
                              timeout=BOUND)
    except subprocess.TimeoutExpired:  # (subprocess.run kills it)
        release_fifos(tmp_path)
        raise AssertionError(f"orchestrator status {' '.join(extra)} hung "
                             f"(killed after {BOUND}s)") from None
    return proc, time.monotonic() - start


def test_status_json_contains_every_hostile_session(tmp_path: Path) -> None:
    cases = table(tmp_path)
    world = build_world(tmp_path / "data", cases)
    proc, _ = status(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = {r["session_id"]: r for r in json.loads(proc.stdout)}
    assert len(rows) == len(world.good) + len(cases)
    for g in world.good:
        r = rows[g.id]
        assert r["error"] is None, r["error"]
        assert (r["pending"], r["processing"]) == (1, 0) and r["last_heartbeat"]
    for case, row in world.bad.items():
        err = rows[row.id]["error"]
        assert err and "\n" not in err, (case, err)


def test_status_table_names_each_bad_session_on_one_line(tmp_path: Path) -> None:
    world = build_world(tmp_path / "data", [("outbound.db", "fifo"), ("session", "symlink")])
    proc, _ = status(tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for row in world.bad.values():
        [line] = [ln for ln in out.splitlines() if ln.startswith(f"! {row.id}: ")]
        assert "refusing" in line
