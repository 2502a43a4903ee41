"""Child processes of the bench: the orchestrator under test and the synthetic agents.

Every child is started in its own session (process group) and recorded here, so
``kill_all`` — called on normal exit, on an exception and on Ctrl-C — ends
exactly the processes this bench started and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
_children: list[subprocess.Popen] = []


def spawn(argv: list[str], log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGTERM, wait, then SIGKILL the child's own process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        except ProcessLookupError:
            pass
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


def kill_all() -> None:
    for proc in list(_children):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        _children.remove(proc)


def _our_cpu() -> float:
    """CPU seconds of the bench and every process it started (reaped ones included)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


class MachineLoad:
    """Machine-wide CPU and disk activity over a window. ``foreign_cores`` is what
    neither the bench nor its children (orchestrator, writers) used: other programs
    on the host. Anything much above 0 means the window was shared and the
    figures are less clean (the JSON keeps it next to each figure)."""

    def __init__(self) -> None:
        self.cpu0 = psutil.cpu_times()
        self.io0 = psutil.disk_io_counters()
        self.ours0 = _our_cpu()
        self.t0 = time.monotonic()

    def stop(self) -> dict:
        c1, io1 = psutil.cpu_times(), psutil.disk_io_counters()
        ours = _our_cpu() - self.ours0
        dt = max(1e-9, time.monotonic() - self.t0)
        d = {f: getattr(c1, f) - getattr(self.cpu0, f) for f in c1._fields}
        idle = d.get("idle", 0.0) + d.get("iowait", 0.0)
        busy = (sum(d.values()) - idle) / dt
        out = {"busy_cores": busy, "bench_and_children_cores": ours / dt,
               "foreign_cores": max(0.0, busy - ours / dt),
               "iowait_cores": d.get("iowait", 0.0) / dt}
        if self.io0 is not None and io1 is not None:
            out["disk_write_mb"] = (io1.write_bytes - self.io0.write_bytes) / 2**20
            out["disk_writes"] = io1.write_count - self.io0.write_count
        return out


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


# --- /proc readings ---------------------------------------------------------------


def status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def inotify_watches(pid: int) -> int | None:
    """Watches held by the process: 'inotify wd:' lines in fdinfo of its inotify fds."""
    total = 0
    found = False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                total += sum(1 for line in fh if line.startswith("inotify wd:"))
            found = True
        except OSError:
            continue
    return total if found else 0


@dataclass
class Orchestrator:
    """``python -m bench.host`` on one data dir; CPU/RSS/watch readings by pid."""

    run_dir: Path
    config: Path
    agents_file: Path | None = None
    watch_budget: int | None = None
    profile_dir: Path | None = None
    proc: subprocess.Popen | None = None
    ps: psutil.Process | None = None
    t_spawn: float = 0.0
    ready: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.run_dir / "orchestrator.log"

    @property
    def ready_file(self) -> Path:
        return self.run_dir / "ready.json"

    def start(self) -> None:
        argv = py("-m", "bench.host", "--config", str(self.config),
                  "--ready-file", str(self.ready_file))
        if self.agents_file:
            argv += ["--agents-file", str(self.agents_file)]
        if self.watch_budget is not None:
            argv += ["--watch-budget", str(self.watch_budget)]
        if self.profile_dir is not None:
            argv += ["--profile-dir", str(self.profile_dir)]
        self.t_spawn = time.time()
        self.proc = spawn(argv, self.log)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"orchestrator exited with {self.proc.returncode} before "
                                   f"ready; log tail:\n{self.log_tail(15)}")
            if self.ready_file.exists():
                self.ready = json.loads(self.ready_file.read_text())
                return self.ready
            time.sleep(0.01)
        raise RuntimeError(f"orchestrator not ready within {timeout:g}s; log tail:\n"
                           f"{self.log_tail(15)}")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def cpu_split(self) -> tuple[float, float]:
        t = self.ps.cpu_times()
        return t.user, t.system

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds per live thread, keyed 'main' / '<comm>#<tid>'."""
        out: dict[str, float] = {}
        pid = self.proc.pid
        try:
            threads = self.ps.threads()
        except psutil.Error:
            return out
        for t in threads:
            if t.id == pid:
                name = "main"
            else:
                try:
                    comm = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                name = f"{comm}#{t.id}"
            out[name] = t.user_time + t.system_time
        return out

    def rss_peak_mb(self) -> float | None:
        kb = status_kb(self.proc.pid, "VmHWM")
        return kb / 1024 if kb is not None else None

    def rss_mb(self) -> float | None:
        kb = status_kb(self.proc.pid, "VmRSS")
        return kb / 1024 if kb is not None else None

    def watches(self) -> int | None:
        return inotify_watches(self.proc.pid)

    def threads(self) -> int:
        return self.ps.num_threads()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settle(self, *, expect_watches: int | None, max_seconds: float,
               quiet_share: float = 0.05, window: float = 1.0) -> dict:
        """Wait until the watches are in place and one ``window`` uses < ``quiet_share``
        of a core (start-up work done), bounded by ``max_seconds``."""
        t0 = time.monotonic()
        deadline = t0 + max_seconds
        watches = None
        while expect_watches and time.monotonic() < deadline:
            watches = self.watches()
            if watches is not None and watches >= expect_watches:
                break
            time.sleep(0.02)
        share = None
        while time.monotonic() < deadline:
            c0 = self.cpu()
            time.sleep(window)
            share = (self.cpu() - c0) / window
            if share < quiet_share:
                break
        return {"seconds": round(time.monotonic() - t0, 3), "watches": watches,
                "last_window_core_share": share,
                "converged": share is not None and share < quiet_share}

    def log_tail(self, n: int) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_levels(self) -> dict:
        counts = {"WARNING": 0, "ERROR": 0}
        samples: list[str] = []
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return {"counts": counts, "samples": samples}
        for line in lines:
            parts = line.split(None, 2)
            if len(parts) >= 2 and parts[1] in counts:
                counts[parts[1]] += 1
                if len(samples) < 5:
                    samples.append(line[:300])
        return {"counts": counts, "samples": samples}

    def stop(self) -> int | None:
        return stop(self.proc) if self.proc else None
