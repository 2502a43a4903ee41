"""The scenarios: each runs the real orchestrator (bench.host) on a fresh copy of a data dir.

Runs, each once per watch mode (events, then poll, back to back so the two are
measured under the same conditions):

- ``idle_1000``     1000 sessions, real local runtime, nothing due, no agents:
                    start-up to "every session reconciled", settle, inotify watch
                    count, idle CPU over a window, peak RSS.
- ``latency_<n>``   n ∈ {1, 1000} sessions, all played by the reply writer (the
                    synthetic runtime reports them running): paced replies spread
                    round-robin over the sessions; latency commit → recorded.
- ``agents_100``    100 sessions in one orchestrator: the same latency run, then
                    heartbeats at 1 Hz and 10 Hz from 100 synthetic agents (CPU over
                    a window each), then throughput: N replies written flat out,
                    time until every one is recorded, lost and duplicated counted
                    in the jsonl file and in ``delivered``.
- ``lockers_10``    20 sessions: paced replies to 10 healthy ones, first alone, then
                    while 10 other agents hold ``BEGIN EXCLUSIVE`` on their own
                    outbound.db and touch it (every touch an event, every event a
                    pass that meets the lock): one agent must not stall the others.
- ``budget``        (events only) a pretended watch budget below the tree size:
                    the sessions past it are polled; say so, and still deliver.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bench import collect, fixture, proc
from bench.proc import Orchestrator
from orchestrator.contract import schema
from orchestrator.contract.layout import registry_path, sessions_root
from orchestrator.watch import budget as watch_budget
from orchestrator.watch import watcher


@dataclass(frozen=True)
class Params:
    quick: bool
    latency_replies: int
    latency_rate: float
    idle_seconds: float
    hb_warmup: float
    hb_seconds: float
    throughput_replies: int
    budget_replies: int
    quiet_replies: int  # replies after a quiet spell (the watcher on its long step)
    quiet_gap: float  # seconds between them: longer than [watch] quiet_after
    sizes: tuple[int, ...] = (1, 100, 1000)
    idle_sessions: int = 1000
    agents: int = 100
    hb_rates: tuple[float, ...] = (1.0, 10.0)
    throughput_sessions: int = 100
    throughput_writers: int = 4  # agent processes writing flat out (one owns 25 sessions)
    poll_interval: float = 1.0
    modes: tuple[str, ...] = ("events", "poll")
    lockers: int = 10  # hostile agents holding write locks (lockers run)
    locker_hz: float = 20.0  # how often each touches its locked outbound.db
    drain_seconds: float = 40.0  # > one sweep: a missed event still gets delivered
    throughput_timeout: float = 180.0
    settle_max: float = 10.0
    ready_timeout: float = 90.0


QUICK = Params(quick=True, latency_replies=160, latency_rate=50.0, idle_seconds=6.0,
               hb_warmup=0.5, hb_seconds=4.0, throughput_replies=3000, budget_replies=20,
               quiet_replies=3, quiet_gap=2.4, throughput_timeout=90.0)
FULL = Params(quick=False, latency_replies=500, latency_rate=25.0, idle_seconds=30.0,
              hb_warmup=3.0, hb_seconds=30.0, throughput_replies=10000, budget_replies=50,
              quiet_replies=10, quiet_gap=3.0)


@dataclass
class Run:
    label: str
    mode: str
    n: int
    dir: Path
    data: Path
    folders: list[Path]
    orch: Orchestrator
    info: dict = field(default_factory=dict)

    @property
    def jsonl(self) -> Path:
        return self.data / "delivered.jsonl"


class Bench:
    def __init__(self, params: Params, tmp: Path, *, keep: bool = False,
                 profiler: Callable | None = None,
                 overrides: dict[str, dict] | None = None, wait_quiet: float = 0.0) -> None:
        self.p = params
        self.wait_quiet = wait_quiet
        self.quiet_waits: list[float] = []
        self.overrides = overrides or {}
        self.config = fixture.effective_config("events", params.poll_interval, self.overrides)
        self.sweep_interval = self.config.watch.sweep_interval
        self.tmp = tmp
        self.keep = keep
        self.profiler = profiler
        self.t0 = time.monotonic()
        self.templates: dict[int, Path] = {}
        self.sync_seconds: dict[str, float] = {}
        self.template_seconds: dict[int, float] = {}
        self.results: dict[str, dict] = {m: {} for m in params.modes}
        self.extra: dict[str, dict] = {}
        self._runs = 0

    # --- plumbing ---------------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def template(self, n: int) -> Path:
        if n not in self.templates:
            path = self.tmp / f"template-{n}"
            self.say(f"creating {n} sessions (Registry + sessions.create_folder) …")
            self.template_seconds[n] = round(fixture.build_template(path, n), 3)
            self.templates[n] = path
        return self.templates[n]

    def new_run(self, label: str, n: int, mode: str, *, agents: bool,
                watch_budget: int | None = None) -> Run:
        self._runs += 1
        run_dir = self.tmp / f"run{self._runs:02d}-{label}-{mode}"
        run_dir.mkdir()
        data = run_dir / "data"
        fixture.copy_template(self.template(n), data)
        (data / "delivered.jsonl").touch()
        # write the copy back now: otherwise the kernel flushes ~90 MB of dirty pages
        # while we measure, and every fsync (the writers' and the orchestrator's) waits
        t_sync = time.monotonic()
        os.sync()
        self.sync_seconds[run_dir.name] = round(time.monotonic() - t_sync, 3)
        config = run_dir / "config.toml"
        fixture.write_config(config, data, mode, self.p.poll_interval, self.overrides)
        folders = fixture.session_folders(data, n)
        agents_file = None
        if agents:
            agents_file = run_dir / "agents.txt"
            agents_file.write_text("".join(f"{fixture.GROUP}/{f.name}\n" for f in folders))
        orch = Orchestrator(run_dir, config, agents_file, watch_budget)
        if self.profiler is not None:
            orch.profile_dir = run_dir / "profile"
        return Run(label, mode, n, run_dir, data, folders, orch)

    @contextmanager
    def running(self, run: Run) -> Iterator[dict]:
        """Start, wait for readiness and for start-up work to settle; always stop and clean."""
        info = run.info
        try:
            self._quiet()
            load = proc.MachineLoad()
            run.orch.start()
            ready = run.orch.wait_ready(self.p.ready_timeout)
            startup_load = load.stop()
            t = ready["times"]
            info["startup"] = {
                "spawn_to_ready_s": t["ready"] - run.orch.t_spawn,
                "spawn_to_main_s": t["entry"] - run.orch.t_spawn,
                "serve_to_ready_s": t["ready"] - t["serve"],
                "serve_to_up_s": (t["up"] - t["serve"]) if "up" in t else None,
                "up_to_ready_s": (t["ready"] - t["up"]) if "up" in t else None,
                "cpu_s_at_ready": run.orch.cpu(),
                "sessions": ready["sessions"], "runtime": ready["runtime"],
                "synthetic_agents": ready["synthetic_agents"],
                "machine": startup_load,
            }
            info["t_serve"] = t["serve"]
            info["watch_mode"] = ready["watch_mode"]
            info["dirs_under_sessions_root"] = watcher.count_dirs(sessions_root(run.data))
            expect = info["dirs_under_sessions_root"] if ready["watch_mode"] == "events" else None
            info["settle"] = run.orch.settle(expect_watches=expect, window=0.5,
                                             max_seconds=self.p.settle_max)
            info["inotify_watches"] = run.orch.watches()
            info["threads"] = run.orch.threads()
            self.say(f"  up: {ready['sessions']} sessions, watch mode {ready['watch_mode']}, "
                     f"ready {info['startup']['spawn_to_ready_s']:.2f}s after spawn, "
                     f"settled in {info['settle']['seconds']:.1f}s, "
                     f"{info['inotify_watches']} inotify watches" + self._load_note(startup_load))
            yield info
        finally:
            if run.orch.alive():
                info["rss_peak_mb"] = run.orch.rss_peak_mb()
                info["rss_mb_at_end"] = run.orch.rss_mb()
                info["cpu_s_total"] = run.orch.cpu()
            t_stop = time.monotonic()
            info["exit_code"] = run.orch.stop()
            info["stop_s"] = round(time.monotonic() - t_stop, 3)
            info["log"] = run.orch.log_levels()
            info["status_changes"] = self._status_changes(run)
            if not self.keep:
                shutil.rmtree(run.dir, ignore_errors=True)

    @staticmethod
    def _status_changes(run: Run) -> dict:
        try:
            import sqlite3

            conn = sqlite3.connect(f"file:{registry_path(run.data)}?mode=ro", uri=True)
            try:
                rows = conn.execute("SELECT new, reason FROM status_changes").fetchall()
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return {"error": str(exc)}
        counts: Counter[str] = Counter(f"{new}: {reason.split('(')[0].strip()}"
                                       for new, reason in rows)
        return dict(counts.most_common(8))

    def _guard(self, mode: str, key: str, fn: Callable[[], dict]) -> None:
        try:
            self.results[mode][key] = fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the rest
            self.say(f"  !! {key} ({mode}) failed: {exc}")
            self.results[mode][key] = {"error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc().splitlines()[-8:]}

    def _profile(self, run: Run, name: str, seconds: float):
        if self.profiler is None:
            return None
        return self.profiler(run.orch, f"{run.mode}-{name}", seconds)

    # --- measurement phases -------------------------------------------------------------

    def _cpu_window(self, run: Run, seconds: float, name: str) -> dict:
        self._quiet()
        prof = self._profile(run, name, seconds)
        load = proc.MachineLoad()
        th0 = run.orch.thread_cpu()
        (u0, s0), t0 = run.orch.cpu_split(), time.time()
        time.sleep(seconds)
        (u1, s1), t1 = run.orch.cpu_split(), time.time()
        th1 = run.orch.thread_cpu()
        machine_load = load.stop()
        c = (u1 - u0) + (s1 - s0)
        out = {"window_s": t1 - t0, "cpu_s": c, "cpu_user_s": u1 - u0, "cpu_system_s": s1 - s0,
               "core_pct": 100.0 * c / (t1 - t0), "cpu_s_per_min": 60.0 * c / (t1 - t0),
               "t0": t0, "t1": t1, "machine": machine_load,
               "threads_cpu_s": _thread_deltas(th0, th1)}
        if prof is not None:
            out["profile"] = prof()
        return out

    def _quiet(self) -> None:
        """With --wait-quiet S: wait (≤ S s) until other programs use < 0.1 core."""
        if self.wait_quiet <= 0:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.wait_quiet:
            load = proc.MachineLoad()
            time.sleep(0.5)
            if load.stop()["foreign_cores"] < 0.1:
                break
        waited = time.monotonic() - t0
        self.quiet_waits.append(round(waited, 1))
        if waited > 1:
            self.say(f"    (waited {waited:.0f}s for other programs on the host to go quiet)")

    @staticmethod
    def _load_note(load: dict | None) -> str:
        f = (load or {}).get("foreign_cores")
        return f" [other programs used {f:.2f} cores meanwhile]" if f and f > 0.1 else ""

    def _sweeps_in(self, run: Run, t0: float, t1: float) -> int:
        start = run.info.get("t_serve", t0)
        k0 = int((t0 - start) // self.sweep_interval) + 1
        k1 = int((t1 - start) // self.sweep_interval)
        return max(0, k1 - k0 + 1)

    def idle(self, run: Run) -> dict:
        self.say(f"  idle: measuring CPU for {self.p.idle_seconds:g}s with nothing happening")
        w = self._cpu_window(run, self.p.idle_seconds, "idle")
        w["sweeps_in_window"] = self._sweeps_in(run, w["t0"], w["t1"])
        self.say(f"  idle: {w['core_pct']:.2f}% of a core ({w['cpu_s_per_min']:.3f} CPU-s/min, "
                 f"{w['sweeps_in_window']} sweep(s) in window)" + self._load_note(w["machine"]))
        return w

    def _wait_writer(self, writer, deadline: float, progress: Callable[[], str]) -> None:
        next_note = time.monotonic() + 5
        while writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if time.monotonic() >= next_note:
                self.say(f"    … {progress()}")
                next_note += 5
        if writer.poll() is None:
            self.say("    writer overran its time; stopping it")
        proc.stop(writer)

    def _drain(self, col: collect.Collector, prefix: str, want: int, seconds: float) -> float:
        t0 = time.monotonic()
        deadline = t0 + seconds
        next_note = t0 + 5
        while col.seen() < want and time.monotonic() < deadline:
            time.sleep(0.01)
            if time.monotonic() >= next_note:
                self.say(f"    … draining: {col.seen()}/{want} on the channel")
                next_note += 5
        # the record commit follows the channel line: wait until commits stop (≤ 5 s)
        quiet_deadline = time.monotonic() + 5
        while time.monotonic() < quiet_deadline:
            last = col.last_commit_at
            time.sleep(0.3)
            if col.last_commit_at == last:
                break
        return time.monotonic() - t0

    def replies(self, run: Run, folders: list[Path], *, count: int, rate: float,
                prefix: str, name: str, writers: int = 1) -> dict:
        """Write ``count`` replies round-robin over ``folders`` (rate 0 = flat out), from
        ``writers`` processes, each owning its share of the folders (one writer per
        file): one process alone commits ~1000 times a second at best here."""
        if len(folders) % writers:
            writers = 1
        sessions_file = run.dir / f"{prefix}.sessions"
        sessions_file.write_text("".join(f"{f}\n" for f in folders))
        outs = [run.dir / f"{prefix}.writer{j}" for j in range(writers)]
        expected = count / rate if rate else count / 200.0
        col = collect.Collector(run.jsonl, folders, prefix=prefix,
                                max_seconds=expected * 2 + self.p.drain_seconds + 240)
        col.start()
        self._quiet()
        prof = self._profile(run, name, expected + 2)
        load = proc.MachineLoad()
        th0 = run.orch.thread_cpu()
        (u0, s0), t0 = run.orch.cpu_split(), time.time()
        procs = [proc.spawn(proc.py("-m", "bench.agents", "replies", "--sessions",
                                    str(sessions_file), "--count", str(count), "--rate",
                                    str(rate), "--prefix", prefix, "--out", str(out),
                                    "--max-seconds", str(expected * 2 + 60),
                                    "--part", str(j), "--parts", str(writers)))
                 for j, out in enumerate(outs)]
        deadline = time.monotonic() + expected * 2 + 90
        for writer in procs:
            self._wait_writer(writer, deadline, lambda: f"{col.seen()}/{count} on the channel")
        t_writer_done = time.time()
        header, commits = collect.read_writers(outs)
        drain_s = self._drain(col, prefix, len(commits),
                              self.p.drain_seconds if rate else self.p.throughput_timeout)
        (u1, s1), t1 = run.orch.cpu_split(), time.time()
        th1 = run.orch.thread_cpu()
        machine_load = load.stop()
        col.finish()
        profile = prof() if prof else None
        folder_names = sorted({f for f, _, _ in commits.values()})
        delivered = collect.read_delivered(folder_names, prefix)
        recorded, match = collect.recorded_times(delivered, col.commits)
        lat_rec, lat_chan, lat_pass = [], [], []
        for mid, (_f, t_commit, _b) in commits.items():
            if mid in recorded:
                lat_rec.append(recorded[mid] - t_commit)
            if mid in col.line_time:
                lat_chan.append(col.line_time[mid] - t_commit)
            if mid in delivered:
                lat_pass.append(schema.parse_ts(delivered[mid][2]).timestamp() - t_commit)
        # lost / duplicated: the whole jsonl file, and the delivered rows
        in_file: Counter[str] = Counter()
        with open(run.jsonl, encoding="utf-8") as fh:
            for line in fh:
                try:
                    mid = json.loads(line)["message_id"]
                except (ValueError, KeyError, TypeError):
                    continue
                if mid.startswith(prefix):
                    in_file[mid] += 1
        written = set(commits)
        ok_rows = {m for m, (_f, st, _a) in delivered.items() if st == "delivered"}
        res = {
            "replies_requested": count, "replies_written": len(commits),
            "sessions": len(folders), "rate_requested_per_s": rate or None,
            "writer_seconds": header["t_end"] - header["t_start"],
            "writer_rate_per_s": len(commits) / max(1e-9, header["t_end"] - header["t_start"]),
            "outbound_rows": collect.count_outbound(folder_names, prefix),
            "latency_ms": {
                "commit_to_recorded": collect.summarize_ms(lat_rec),
                "commit_to_channel_line": collect.summarize_ms(lat_chan),
                "commit_to_pass_start": collect.summarize_ms(lat_pass),
            },
            "lost_on_channel": len(written - set(in_file)),
            "lost_not_recorded": len(written - ok_rows),
            "recorded_failed": sum(1 for _f, st, _a in delivered.values() if st != "delivered"),
            "duplicates_on_channel": sum(c - 1 for c in in_file.values() if c > 1),
            "unexpected_ids_on_channel": len(set(in_file) - written),
            "record_matching": match,
            "collector_queue_overflow": col.overflowed,
            "drain_s": drain_s,
            "orchestrator_cpu": {"window_s": t1 - t0, "cpu_user_s": u1 - u0,
                                 "cpu_system_s": s1 - s0,
                                 "core_pct": 100.0 * (u1 - u0 + s1 - s0) / (t1 - t0),
                                 "cpu_ms_per_reply": 1000.0 * (u1 - u0 + s1 - s0)
                                 / max(1, len(commits)),
                                 "threads_cpu_s": _thread_deltas(th0, th1)},
            "machine_load": machine_load,
        }
        if commits and recorded:
            t_first = min(c for _f, c, _b in commits.values())
            if rate:  # per-reply series for looking at tails: [s after first commit, ms, folder]
                res["series"] = sorted(
                    [round(c - t_first, 4), round(1000 * (recorded[m] - c), 2), Path(f).name]
                    for m, (f, c, _b) in commits.items() if m in recorded)
            t_last_rec = max(recorded.values())
            res["first_commit_to_last_recorded_s"] = t_last_rec - t_first
            res["writer_done_to_last_recorded_s"] = t_last_rec - t_writer_done
            res["delivered_per_s"] = len(ok_rows) / max(1e-9, t_last_rec - t_first)
            res["delivered_per_min"] = res["delivered_per_s"] * 60.0
        if profile is not None:
            res["profile"] = profile
        return res

    def heartbeats(self, run: Run, folders: list[Path], hz: float) -> dict:
        sessions_file = run.dir / "hb.sessions"
        sessions_file.write_text("".join(f"{f}\n" for f in folders))
        out = run.dir / f"hb-{hz:g}.json"
        total = self.p.hb_warmup + self.p.hb_seconds + 5.0
        self.say(f"  heartbeats: {len(folders)} agents at {hz:g} Hz "
                 f"({self.p.hb_warmup:g}s warm-up, {self.p.hb_seconds:g}s window)")
        writer = proc.spawn(proc.py("-m", "bench.agents", "heartbeat", "--sessions",
                                    str(sessions_file), "--hz", str(hz), "--seconds",
                                    str(total), "--out", str(out)))
        try:
            time.sleep(self.p.hb_warmup)
            if writer.poll() is not None:
                raise RuntimeError(f"heartbeat writer exited early ({writer.returncode})")
            w = self._cpu_window(run, self.p.hb_seconds, f"heartbeat-{hz:g}hz")
            if writer.poll() is not None:
                raise RuntimeError(
                    f"heartbeat writer ended inside the window ({writer.returncode})")
        finally:
            proc.stop(writer)  # SIGTERM: it stops touching and writes its counts
        w["writer"] = json.loads(out.read_text()) if out.exists() else None
        w["agents"] = len(folders)
        w["hz"] = hz
        w["sweeps_in_window"] = self._sweeps_in(run, w["t0"], w["t1"])
        self.say(f"  heartbeats {hz:g} Hz: {w['core_pct']:.2f}% of a core"
                 + self._load_note(w["machine"]))
        return w

    # --- runs ---------------------------------------------------------------------------

    def run_idle(self, mode: str) -> dict:
        n = self.p.idle_sessions
        self.say(f"[{mode}] idle/start-up/memory: {n} sessions, no agents")
        run = self.new_run("idle", n, mode, agents=False)
        with self.running(run) as info:
            info["idle"] = self.idle(run)
            if mode == "events":  # polling has no quiet step: its latency rows say it all
                info["after_quiet"] = self.after_quiet(run)
        return info

    def after_quiet(self, run: Run) -> dict:
        """Replies that each come after a quiet spell longer than ``[watch] quiet_after``:
        the watcher is on its long idle step when each one is committed, so this is
        what the first reply after a silence costs (the paced latency runs never let
        the watcher go quiet)."""
        p = self.p
        self.say(f"  after a quiet spell: {p.quiet_replies} replies, {p.quiet_gap:g}s apart")
        res = self.replies(run, run.folders[:p.quiet_replies], count=p.quiet_replies,
                           rate=1.0 / p.quiet_gap, prefix="Q", name="after-quiet")
        self.say("  after a quiet spell: " + _lat_line(res))
        return res

    def _latency(self, run, n: int) -> dict:
        """The paced reply-latency measurement shared by the latency scenarios."""
        p = self.p
        result = self.replies(run, run.folders, count=p.latency_replies, rate=p.latency_rate,
                              prefix=f"L{n}x", name=f"latency-{n}")
        self.say("  latency: " + _lat_line(result) + self._load_note(result["machine_load"]))
        return result

    def run_latency(self, n: int, mode: str) -> dict:
        p = self.p
        self.say(f"[{mode}] reply latency: {p.latency_replies} replies at {p.latency_rate:g}/s "
                 f"over {n} session(s)")
        run = self.new_run(f"latency{n}", n, mode, agents=True)
        with self.running(run) as info:
            info["latency"] = self._latency(run, n)
        return info

    def run_lockers(self, mode: str) -> dict:
        """Healthy sessions' reply latency without, then with, 10 agents holding write
        locks on their own outbound.db (the figure pair of issue 9)."""
        p = self.p
        k = p.lockers
        self.say(f"[{mode}] lockers: {p.latency_replies} replies at {p.latency_rate:g}/s over "
                 f"{k} healthy sessions, without and then with {k} agents holding "
                 "BEGIN EXCLUSIVE on their own outbound.db")
        run = self.new_run(f"lockers{k}", 2 * k, mode, agents=True)
        healthy, hostile = run.folders[:k], run.folders[k:]
        with self.running(run) as info:
            info["without_locks"] = self.replies(run, healthy, count=p.latency_replies,
                                                 rate=p.latency_rate, prefix="Ux",
                                                 name="lockers-free")
            self.say("  without locks: " + _lat_line(info["without_locks"]))
            sessions_file = run.dir / "lock.sessions"
            sessions_file.write_text("".join(f"{f}\n" for f in hostile))
            ready = run.dir / "lock.json"
            seconds = p.latency_replies / p.latency_rate * 2 + 120
            lockers = proc.spawn(proc.py("-m", "bench.agents", "lock", "--sessions",
                                         str(sessions_file), "--hz", str(p.locker_hz),
                                         "--seconds", str(seconds), "--out", str(ready)))
            try:
                deadline = time.monotonic() + 30
                while not ready.exists() and time.monotonic() < deadline:
                    if lockers.poll() is not None:
                        raise RuntimeError(f"lockers exited early ({lockers.returncode})")
                    time.sleep(0.05)
                if not ready.exists():
                    raise RuntimeError("lockers did not take their locks within 30 s")
                info["lockers"] = json.loads(ready.read_text())
                info["with_locks"] = self.replies(run, healthy, count=p.latency_replies,
                                                  rate=p.latency_rate, prefix="Kx",
                                                  name="lockers-held")
            finally:
                proc.stop(lockers)
            self.say(f"  with {k} lockers: " + _lat_line(info["with_locks"])
                     + self._load_note(info["with_locks"]["machine_load"]))
        return info

    def run_budget(self) -> dict:
        """Watch budget too small: the sessions past it are polled; warn, keep delivering."""
        n = 100
        dirs = 1 + 1 + n
        budget = watch_budget.RESERVE_MIN + 2 + n // 2  # half the sessions polled
        self.say(f"[events] watch budget demo: {n} sessions ≈ {dirs} folders, pretending "
                 f"max_user_watches={budget}")
        run = self.new_run("budget", n, "events", agents=True, watch_budget=budget)
        with self.running(run) as info:
            info["pretended_max_user_watches"] = budget
            info["latency"] = self.replies(run, run.folders, count=self.p.budget_replies,
                                           rate=10.0, prefix="Bx", name="budget")
            self.say("  fallback latency: " + _lat_line(info["latency"]))
        try:
            # the log is gone with the run dir unless --keep; the samples were kept
            info["warning_logged"] = [s for s in info["log"]["samples"]
                                      if "watch budget" in s]
        except (KeyError, TypeError):
            info["warning_logged"] = []
        return info

    def run_all(self, only: set[str] | None = None) -> None:
        """Every run, each mode back to back; ``only`` picks a subset
        (idle, latency1, latency1000, agents, budget)."""
        p = self.p
        def want(name: str) -> bool:
            return only is None or name in only
        sizes = sorted({p.idle_sessions} if want("idle") else set())
        sizes = sorted(set(sizes) | {n for n in p.sizes
                                     if want("agents" if n == p.agents else f"latency{n}")}
                       | ({2 * p.lockers} if want("lockers") else set())
                       | ({100} if want("budget") else set()))
        for n in sizes:
            self.template(n)
        if want("idle"):
            for mode in p.modes:
                self._guard(mode, "idle_1000", lambda: self.run_idle(mode))
        for n in sorted(p.sizes, reverse=True):
            name = "agents" if n == p.agents else f"latency{n}"
            if not want(name):
                continue
            for mode in p.modes:
                if n == p.agents:
                    self._guard(mode, f"agents_{n}", lambda: self.run_agents_and_latency(mode))
                else:
                    self._guard(mode, f"latency_{n}", lambda: self.run_latency(n, mode))
        if want("lockers"):
            for mode in p.modes:
                self._guard(mode, f"lockers_{p.lockers}", lambda: self.run_lockers(mode))
        if want("budget"):
            try:
                self.extra["budget_fallback"] = self.run_budget()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                self.say(f"  !! budget demo failed: {exc}")
                self.extra["budget_fallback"] = {"error": f"{type(exc).__name__}: {exc}"}

    def run_agents_and_latency(self, mode: str) -> dict:
        """At 100 sessions the latency run and the agents run share one orchestrator."""
        p = self.p
        n = p.agents
        self.say(f"[{mode}] {n} sessions: reply latency ({p.latency_replies} at "
                 f"{p.latency_rate:g}/s), heartbeats at "
                 f"{', '.join(f'{h:g}' for h in p.hb_rates)} Hz, throughput "
                 f"({p.throughput_replies} replies flat out)")
        run = self.new_run(f"sessions{n}", n, mode, agents=True)
        with self.running(run) as info:
            info["latency"] = self._latency(run, n)
            for hz in p.hb_rates:
                info[f"heartbeat_{hz:g}hz"] = self.heartbeats(run, run.folders, hz)
            time.sleep(0.5)
            self.say(f"  throughput: {p.throughput_replies} replies over "
                     f"{p.throughput_sessions} sessions, as fast as {p.throughput_writers} "
                     "writers commit")
            tp = self.replies(run, run.folders[:p.throughput_sessions],
                              count=p.throughput_replies, rate=0.0, prefix="Tx",
                              name="throughput", writers=p.throughput_writers)
            info["throughput"] = tp
            self.say(f"  throughput: {tp.get('delivered_per_min', 0):.0f} replies/min "
                     f"(writer {tp['writer_rate_per_s']:.0f}/s), lost "
                     f"{tp['lost_not_recorded']}, duplicates {tp['duplicates_on_channel']}"
                     + self._load_note(tp["machine_load"]))
        return info


def _thread_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU used per thread in a window, threads of the same name summed ('python' = a
    Python thread other than the event loop's, e.g. the watchfiles thread)."""
    out: dict[str, float] = {}
    for name, t in after.items():
        d = t - before.get(name, 0.0)
        key = name.split("#")[0]
        out[key] = round(out.get(key, 0.0) + d, 3)
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def _lat_line(res: dict) -> str:
    r = res["latency_ms"]["commit_to_recorded"]
    if not r.get("n"):
        return f"no latencies measured (written {res['replies_written']})"
    return (f"n={r['n']} p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f}, p99 {r['p99']:.1f}, "
            f"max {r['max']:.1f} (lost {res['lost_not_recorded']}, "
            f"dup {res['duplicates_on_channel']})")
