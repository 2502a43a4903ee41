"""CPU of one session pass, by the number of replies it finds (issue 28).

``python -m bench.passcost [--replies 1,5,10] [--passes 200] [--profile]``

The real ``SessionWorker.process`` on a real session folder (real SQLite, the real
jsonl channel, the real registry), its agent running (a ``FakeRuntime`` that starts
nothing, as the bench's synthetic runtime): before each pass a writer commits N
replies to ``outbound.db`` the agent's way (one row per transaction, then a
``.heartbeat`` touch), then one pass with the flags a commit's events give
(``OUTBOUND | INBOUND``) is timed with ``time.thread_time`` (CPU of this thread:
the writer is not counted, nor is anything another process does to the machine).
The sizes alternate pass by pass, so each is measured under the same conditions.

Why: in events mode a busy session's pass finds a reply or two, in poll mode several,
so what a pass costs whatever it finds (its fixed cost) is paid per reply in events
mode. Printed: the median CPU per pass and per reply for each size, and the fixed
cost and the cost per reply fitted from the smallest and the largest size.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from orchestrator.cli.compose import make_channel
from orchestrator.contract import schema
from orchestrator.contract.layout import sessions_root
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import Deliverer
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.tracked import Flag, Tracked
from tests.support.e2e import Client, make_config
from tests.support.fakes import FakeRuntime


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Agent:
    """The agent side: its own connection to outbound.db, odd seqs, a heartbeat."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.conn = schema.connect(folder / "outbound.db")
        self.n = 0

    def reply(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            with schema.transaction(self.conn):
                (top,) = self.conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()
                top = top or 0
                seq = top + 1 if top % 2 == 0 else top + 2
                self.conn.execute(
                    "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, content)"
                    " VALUES (?, ?, NULL, ?, 'chat', ?)",
                    (f"r-{self.n}", seq, schema.now_ts(), json.dumps({"text": f"r {self.n}"})))
            fd = os.open(self.folder / ".heartbeat", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
            try:
                os.utime(fd)
            finally:
                os.close(fd)


async def measure(sizes: list[int], passes: int, profile: Path | None) -> dict[int, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="passcost-"))
    cfg = make_config(tmp)
    sessions_root(cfg.data_dir).mkdir(parents=True)
    client = Client(cfg)
    runtime = FakeRuntime()
    deliverer = Deliverer(cfg.data_dir, client.registry, make_channel(cfg.delivery),
                          cfg.delivery)
    worker = SessionWorker(cfg, client.registry, client.sessions, runtime, deliverer, _now,
                           lambda sid, flags: None)
    row = client.session("grp")
    t = Tracked(row.agent_group_id, row.id, client.paths(row))
    runtime.alive.add(row.id)
    await worker.process(t, Flag.FULL)
    t.status = Status.RUNNING
    agent = Agent(Path(client.paths(row).root))
    prof = cProfile.Profile(time.thread_time) if profile else None
    cpu: dict[int, list[float]] = {k: [] for k in sizes}
    try:
        for _ in range(passes):
            for k in sizes:
                agent.reply(k)
                if prof:
                    prof.enable()
                c0 = time.thread_time()
                await worker.process(t, Flag.OUTBOUND | Flag.INBOUND)
                cpu[k].append((time.thread_time() - c0) * 1000)
                if prof:
                    prof.disable()
        with schema.opened(client.paths(row).inbound_db, readonly=True) as conn:
            (n,) = conn.execute("SELECT count(*) FROM delivered").fetchone()
        if n != agent.n:  # every reply recorded once: the passes did their work
            raise SystemExit(f"delivered {n} of {agent.n} replies")
    finally:
        worker.kept.close()
        await deliverer.aclose()
        client.close()
    if prof is not None and profile is not None:
        prof.dump_stats(str(profile))
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passcost")
    p.add_argument("--replies", default="1,5,10", help="replies per pass, alternated")
    p.add_argument("--passes", type=int, default=200, help="passes of each size")
    p.add_argument("--profile", type=Path, default=None, help="write a .pstats here")
    args = p.parse_args(argv)
    logger.remove()
    sizes = [int(x) for x in args.replies.split(",")]
    cpu = asyncio.run(measure(sizes, args.passes, args.profile))
    med = {k: statistics.median(v) for k, v in cpu.items()}
    for k in sizes:
        print(f"{k:3d} replies/pass: {med[k]:.3f} ms CPU per pass, {med[k] / k:.3f} per reply"
              f" (median of {len(cpu[k])})")
    lo, hi = min(sizes), max(sizes)
    if hi > lo:
        per = (med[hi] - med[lo]) / (hi - lo)
        print(f"fitted: {med[lo] - per * lo:.3f} ms per pass + {per:.3f} ms per reply")
    print("load:", " ".join(open("/proc/loadavg").read().split()[:3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
