"""Issue 21, class 2: space is per session.

A real tmpfs as the data dir, a real agent (``tests/support/filler_agent.py``) that
fills its outbox until ENOSPC and dies, the reference agent answering in another
session, the whole supervisor. The filler's work must end failed after its tries
with a reason naming the quota, the filler must not be restarted over and over, and
the other session's reply must come within a bound while the disk is full: the
host's reserve gives its own records room.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.host.space import Reserve, free_bytes
from tests.support.e2e import Client, failures, make_config, replies_to, run, supervised
from tests.support.helpers import REPO, holds, query, until
from tests.support.mounts import tmpfs

MIB = 1 << 20
QUOTA = 6 * MIB
RESERVE = 3 * MIB
MAX_TRIES = 3
REPLY_BOUND = 10.0  # s, on two shared cores, a wake included


def status_of(paths, message_id: str) -> tuple[str, int]:
    rows = query(paths.inbound_db, "SELECT status, tries FROM messages_in WHERE id=?",
                 (message_id,))
    assert rows, message_id
    return rows[0][0], rows[0][1]


def test_a_filler_ends_failed_after_its_tries_while_another_session_keeps_answering(
        tmp_path: Path, reap_agents) -> None:
    starts = tmp_path / "filler-starts"
    starts.touch()
    filler_cmd = ["{python}", str(REPO / "tests" / "support" / "filler_agent.py"),
                  "--starts", str(starts)]
    with tmpfs(tmp_path / "disk", "24m") as disk:
        cfg = make_config(
            disk, api={"listen": ""}, watch={"sweep_interval": 1.0},
            lifecycle={"max_tries": MAX_TRIES}, runtime={"start_retry_max": 1.0},
            sessions={"max_session_bytes": QUOTA, "min_free_bytes": RESERVE},
            groups={"filler": {"command": filler_cmd,
                               "env": {"PYTHONPATH": str(REPO)}}})
        client = Client(cfg)
        reserve = Reserve(cfg.data_dir, RESERVE)

        async def body() -> None:
            async with supervised(cfg):
                _, warm = client.send("echo", "warm up")
                await until(lambda: replies_to(cfg, warm), timeout=30, message="warm-up reply")
                await until(lambda: reserve.held() >= RESERVE, timeout=10,
                            message="the host's reserve taken")

                row, fill_id = client.send("filler", "fill the disk")
                paths = client.paths(row)
                await until(lambda: free_bytes(cfg.data_dir) < RESERVE, timeout=30,
                            message="the disk filled by the agent")

                full = time.monotonic()
                await until(lambda: reserve.held() == 0, timeout=5,
                            message="the host's reserve released for its records (and sends)")
                print(f"reserve released {time.monotonic() - full:.2f}s after the disk filled",
                      file=sys.stderr)
                sent = time.monotonic()
                _, ping = client.send("echo", "still there?")
                await until(lambda: replies_to(cfg, ping), timeout=REPLY_BOUND,
                            message="the other session's reply on the full disk")
                latency = time.monotonic() - sent
                print(f"reply latency while full: {latency:.2f}s", file=sys.stderr)

                await until(lambda: status_of(paths, fill_id)[0] == "failed", timeout=60,
                            message="the filler's message failed")
                reasons = [f["reason"] for f in failures(cfg) if f.get("id") == fill_id
                           or f.get("message_id") == fill_id]
                assert any("space quota" in r for r in reasons), failures(cfg)
                n_starts = len(starts.read_text().splitlines())
                assert 1 <= n_starts <= MAX_TRIES, n_starts
                print(f"filler starts: {n_starts}", file=sys.stderr)

                # still over its quota: new work is refused (counted) and fails, unstarted
                _, again = client.send("filler", "hello")
                await until(lambda: status_of(paths, again)[0] == "failed", timeout=60,
                            message="new work of the over-quota session failed")
                await holds(lambda: len(starts.read_text().splitlines()) == n_starts, 3.0,
                            message="the filler never started again")
                echo_row = client.session("echo")
                assert not [r for _, r in client.statuses(echo_row.id) if "space" in r
                            or "disk" in r], client.statuses(echo_row.id)
            client.close()

        run(body(), timeout=240)
