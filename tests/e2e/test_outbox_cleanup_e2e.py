"""Issue #21, class 5, end to end: removing an agent's huge outbox folder runs off the
event loop while every other session keeps being served.

The whole supervisor on real files and real inotify; the channel is the recording
double (it stamps when each reply arrived). Before: the 50 000-file folder was removed
with ``shutil.rmtree`` inside the delivery pass — the loop and every session stalled
for about 1.2 s here (200 000 files: 4.4 s); a 3 000-deep tree failed every pass with
RecursionError and was never removed.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from orchestrator.contract import schema
from tests.e2e.test_containment import add_reply
from tests.engine.test_outbox_cleanup import deep_tree
from tests.support.bounds import LoopWatch
from tests.support.e2e import Client, make_config, supervised
from tests.support.fakes import RecordingChannel
from tests.support.helpers import query, until

JUNK_FILES = 50_000


def junk(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"junk-{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


async def test_a_huge_outbox_is_removed_while_another_session_is_served(tmp_path: Path,
                                                                       reap_agents) -> None:
    cfg = make_config(tmp_path)
    channel = RecordingChannel()
    client = Client(cfg)
    async with supervised(cfg, channel=channel):
        hoarder = client.paths(client.session("hoarder", platform="h"))
        healthy = client.paths(client.session("healthy", platform="ok"))
        for p in (hoarder, healthy):
            schema.init_outbound(p.outbound_db)
        junk(hoarder.outbox / "big-1", JUNK_FILES)
        (hoarder.outbox / "big-1" / "a.txt").write_text("the listed file")
        deep_tree(hoarder.outbox / "big-1", 3000)
        latencies = []
        async with LoopWatch() as watch:
            add_reply(hoarder.outbound_db, "big-1", 1, files=["a.txt"])
            await until(lambda: "big-1" in channel.taken, timeout=10, message="big-1")
            seq = 1
            while (hoarder.outbox / "big-1").exists():
                mid = f"ok-{seq}"
                committed = add_reply(healthy.outbound_db, mid, seq)
                await until(lambda: mid in channel.taken, timeout=10, interval=0.002,
                            message=mid)
                latencies.append(channel.taken[mid] - committed)
                seq += 2
                assert seq < 10_000, "the folder is never removed"
        settled = query(hoarder.inbound_db, "SELECT status FROM delivered")
    client.close()
    print(f"\n{len(latencies)} replies of another session while {JUNK_FILES} files and a "
          f"3000-deep tree were removed: latency ms p50 "
          f"{1000 * statistics.median(latencies):.1f} max {1000 * max(latencies):.1f}; "
          f"max loop lag {1000 * watch.max_lag:.0f} ms")
    assert settled == [("delivered",)]
    assert len(latencies) >= 3  # the removal really ran alongside
    assert max(latencies) < 0.5, latencies
    assert watch.max_lag < 0.25, watch.max_lag
    assert all(channel.count(f"ok-{s}") == 1 for s in range(1, seq, 2))
    assert not os.path.lexists(hoarder.outbox / "big-1")
