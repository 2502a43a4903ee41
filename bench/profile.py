"""Optional profiles of the orchestrator during the measurement windows.

``python -m bench --profile cprofile`` (default for ``--profile``): bench.host runs
cProfile with ``time.thread_time`` on the event-loop thread between SIGUSR1 and
SIGUSR2, so each function's figure is CPU time, not wall time; the .json beside
each .pstats gives loop-thread CPU vs whole-process CPU (the difference is
watchfiles' Rust thread and anyio's worker thread, which cProfile cannot see).

``--profile py-spy``: ``py-spy record --nonblocking`` attached for the window
(raw collapsed stacks; wall-clock samples of every thread that does not look
idle, so blocking I/O such as fsync counts too). py-spy is a development tool,
not a dependency: ``.venv/bin/pip install py-spy``.

Profiling slows the orchestrator (cProfile more than py-spy): figures from a
profiled run are marked ``profiled`` in the JSON and are not the ones to quote.
"""

from __future__ import annotations

import json
import math
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from bench import proc

Finisher = Callable[[], dict]

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", str(proc.REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --- cProfile (in bench.host, driven by signals) --------------------------------------


def cprofile_top(pstats_file: Path, n: int = 20) -> dict:
    st = pstats.Stats(str(pstats_file))
    total = st.total_tt or 1e-12
    rows = []
    for (file, line, func), (_cc, ncalls, tt, ct, _callers) in st.stats.items():
        rows.append((tt, ct, ncalls, f"{func} ({_short_path(file)}:{line})"))
    by_self = sorted(rows, reverse=True)[:n]
    by_cum = sorted(rows, key=lambda r: r[1], reverse=True)[:n]
    return {
        "loop_thread_profiled_cpu_s": total,
        "self": [[name, round(tt, 4), round(100 * tt / total, 1), calls]
                 for tt, _ct, calls, name in by_self],
        "cumulative": [[name, round(ct, 4), round(100 * ct / total, 1), calls]
                       for _tt, ct, calls, name in by_cum],
        "columns": "function, CPU s, % of loop-thread CPU, calls",
    }


class CProfiler:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self._k: dict[int, int] = {}

    def __call__(self, orch: proc.Orchestrator, name: str, seconds: float) -> Finisher:
        pid = orch.proc.pid
        os.kill(pid, signal.SIGUSR1)

        def finish() -> dict:
            k = self._k[pid] = self._k.get(pid, 0) + 1
            os.kill(pid, signal.SIGUSR2)
            side = orch.profile_dir / f"prof-{k}.json"
            deadline = time.monotonic() + 15
            while not side.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not side.exists():
                return {"error": "no profile written"}
            dest = self.out_dir / f"{name}.pstats"
            shutil.copyfile(orch.profile_dir / f"prof-{k}.pstats", dest)
            return {"file": str(dest), **json.loads(side.read_text()), **cprofile_top(dest)}

        return finish


# --- py-spy (external sampler) ----------------------------------------------------------


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return f"{m['func']} ({_short_path(m['file'])})" if m else frame.strip()


def pyspy_top(path: Path, n: int = 15) -> dict:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        count = int(m[2])
        frames = [_short(f) for f in m[1].split(";") if f]
        if not frames:
            continue
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    share = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
    return {"samples": total,
            "self_pct": [[f, share(c)] for f, c in self_c.most_common(n)],
            "inclusive_pct": [[f, share(c)] for f, c in incl.most_common(n)]}


class PySpy:
    def __init__(self, out_dir: Path) -> None:
        venv_bin = str(Path(sys.executable).parent)
        exe = shutil.which("py-spy", path=venv_bin) or shutil.which("py-spy")
        if exe is None:
            raise SystemExit("--profile py-spy needs py-spy: .venv/bin/pip install py-spy")
        self.exe = exe
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, orch: proc.Orchestrator, name: str, seconds: float) -> Finisher:
        path = self.out_dir / f"{name}.txt"
        child = proc.spawn([self.exe, "record", "--pid", str(orch.proc.pid), "--duration",
                            str(max(1, math.ceil(seconds))), "--rate", "250", "--nonblocking",
                            "--format", "raw", "--output", str(path)],
                           log=self.out_dir / f"{name}.log")

        def finish() -> dict:
            try:
                child.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                pass
            proc.stop(child)
            return {"file": str(path), **pyspy_top(path)}

        return finish


def make_profiler(kind: str, out_dir: Path):
    return CProfiler(out_dir) if kind == "cprofile" else PySpy(out_dir)
