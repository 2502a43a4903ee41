"""``python -m bench.burst [--quick]``: N sessions get one message each at once, with the
default agent cap ([runtime] max_agents = "auto") and real reference agents.

What it shows: how long a burst takes to drain through the cap, the longest any
message waited for its answer, and that the cap holds and nothing is lost. The
orchestrator runs as its own process (``python -m orchestrator run``) with the default
config (only the data dir, the jsonl channel and ``on_shutdown = "stop"`` so the bench
leaves no agent behind); the agents are the reference agent as local processes.

Measured from outside the orchestrator: agent processes are counted from /proc
(command lines naming this run's sessions folder) every 20 ms; "host memory" is the
summed RSS of the orchestrator and those agents at each sample (shared pages counted
once per process: an upper bound); a message is answered when its reply line appears in
the jsonl channel file (read every 20 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench import fixture, machine, proc
from orchestrator.contract.layout import registry_path, sessions_root
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import Sessions

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Census(threading.Thread):
    """Agent processes of one data dir and the memory of those plus the orchestrator."""

    def __init__(self, data_dir: Path, orchestrator_pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.marker = f"--workspace {sessions_root(data_dir)}/".encode()
        self.orchestrator_pid = orchestrator_pid
        self.interval = interval
        self.peak_agents = 0
        self.peak_rss = 0
        self.peak_orchestrator_rss = 0
        self.agent_pids: set[int] = set()
        self.samples = 0
        self.stop = threading.Event()

    def agents(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if self.marker in cmd.replace(b"\0", b" "):
                found.append(int(entry))
        return found

    def run(self) -> None:
        while not self.stop.is_set():
            pids = self.agents()
            self.agent_pids.update(pids)
            orch = rss(self.orchestrator_pid)
            self.peak_agents = max(self.peak_agents, len(pids))
            self.peak_orchestrator_rss = max(self.peak_orchestrator_rss, orch)
            self.peak_rss = max(self.peak_rss, orch + sum(rss(p) for p in pids))
            self.samples += 1
            self.stop.wait(self.interval)


class Replies:
    """Reads the jsonl channel file incrementally: reply line -> when it was seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buffer = b""
        self.seen: dict[str, float] = {}  # in_reply_to -> time first seen
        self.lines = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        now = time.time()
        self.offset += len(data)
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        for line in complete:
            if line.strip():
                self.lines += 1
                self.seen.setdefault(json.loads(line)["in_reply_to"], now)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else float("nan")


def run(n: int, tmp: Path, timeout: float) -> dict:
    data_dir = tmp / "data"
    build_s = fixture.build_template(data_dir, n)
    config = tmp / "config.toml"
    fixture.write_config(config, data_dir, "events", 1.0, {"runtime": {"on_shutdown": "stop"}})
    log = tmp / "orchestrator.log"
    orch = proc.spawn(proc.py("-m", "orchestrator", "run", "--config", str(config)), log)
    census = None
    try:
        deadline = time.monotonic() + 120
        while "orchestrator up" not in log.read_text(errors="replace"):
            if orch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"orchestrator did not come up:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        cap_line = next((line for line in log.read_text().splitlines()
                         if "admission:" in line), "")
        census = Census(data_dir, orch.pid)
        census.start()
        registry = Registry(registry_path(data_dir))
        sessions = Sessions(data_dir, registry, 1 << 20)
        rows = [registry.session(sid) for sid in fixture.session_ids(n)]
        sent: dict[str, float] = {}
        t0 = time.time()
        for i, row in enumerate(rows):
            mid, _ = sessions.write_message(row, {"text": f"burst {i}"})
            sent[mid] = time.time()
        send_s = time.time() - t0
        replies = Replies(data_dir / "delivered.jsonl")
        end = time.monotonic() + timeout
        while len(replies.seen) < n and time.monotonic() < end and orch.poll() is None:
            replies.poll()
            time.sleep(0.02)
        replies.poll()
        registry.close()
    finally:
        if census is not None:
            census.stop.set()
            census.join()
        proc.stop(orch, timeout=60)
        for pid in census.agent_pids if census else ():  # only agents of this run
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    waits = [replies.seen[m] - t for m, t in sent.items() if m in replies.seen]
    answered = [m for m in sent if m in replies.seen]
    return {
        "sessions": n,
        "admission": cap_line.split("admission: ", 1)[-1],
        "build_fixture_s": round(build_s, 2),
        "send_all_s": round(send_s, 2),
        "all_answered_s": round(max(replies.seen.values()) - t0, 2) if replies.seen else None,
        "wait_s": {"p50": round(percentile(waits, 50), 2), "p95": round(percentile(waits, 95), 2),
                   "max": round(max(waits), 2) if waits else None},
        "peak_agents": census.peak_agents,
        "agents_started": len(census.agent_pids),
        "peak_rss_mb": round(census.peak_rss / 2**20, 1),
        "peak_orchestrator_rss_mb": round(census.peak_orchestrator_rss / 2**20, 1),
        "answered": len(answered),
        "lost": n - len(answered),
        "duplicated": replies.lines - len(replies.seen),
        "census_samples": census.samples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 sessions instead of 1000")
    ap.add_argument("--sessions", type=int, default=None, help="number of sessions")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up after S seconds")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/burst*.json)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir and log")
    args = ap.parse_args(argv)
    n = args.sessions or (200 if args.quick else 1000)
    out = Path(args.out or f"bench/results/burst{'-quick' if args.quick else ''}.json")
    tmp = Path(tempfile.mkdtemp(prefix="orch-burst-"))
    load_before = os.getloadavg()
    try:
        result = run(n, tmp, args.timeout)
    finally:
        proc.kill_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_before"] = load_before
    result["loadavg_after"] = os.getloadavg()
    result["machine"] = machine.describe(Path(tempfile.gettempdir()))
    result["code"] = machine.code_state()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    w = result["wait_s"]
    print(f"burst: {n} sessions, one message each, admission {result['admission']}")
    print(f"  all answered after      {result['all_answered_s']} s "
          f"(sending took {result['send_all_s']} s)")
    print(f"  wait per message        p50 {w['p50']} s, p95 {w['p95']} s, max {w['max']} s")
    print(f"  peak agents             {result['peak_agents']} "
          f"({result['agents_started']} agent processes in all)")
    print(f"  peak RSS                {result['peak_rss_mb']} MB orchestrator + agents "
          f"(orchestrator alone {result['peak_orchestrator_rss_mb']} MB)")
    print(f"  lost / duplicated       {result['lost']} / {result['duplicated']}")
    print(f"  load average before/after {load_before[0]:.1f} / {result['loadavg_after'][0]:.1f}"
          f" (shared machine)")
    print(f"  JSON: {out}")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
