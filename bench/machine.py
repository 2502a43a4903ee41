"""What the numbers were measured on (and with which code)."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil

from bench.proc import REPO


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _fs_type(path: Path) -> str | None:
    """File system of ``path`` (longest mount prefix in /proc/mounts)."""
    best, kind = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def describe(tmp_root: Path) -> dict:
    freq = psutil.cpu_freq()
    return {
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_model": _cpu_model(),
        "cpu_mhz": round(freq.current) if freq else None,
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "watchfiles": _version("watchfiles"),
        "psutil": _version("psutil"),
        "sqlite": sqlite3.sqlite_version,
        "inotify_max_user_watches": _read("/proc/sys/fs/inotify/max_user_watches"),
        "inotify_max_user_instances": _read("/proc/sys/fs/inotify/max_user_instances"),
        "inotify_max_queued_events": _read("/proc/sys/fs/inotify/max_queued_events"),
        "bench_tmp": str(tmp_root),
        "bench_tmp_fs": _fs_type(tmp_root),
        "loadavg_at_start": os.getloadavg(),
    }


def code_state() -> dict:
    """The orchestrator code measured: HEAD plus uncommitted changes (others edit it)."""
    dirty = _git("status", "--porcelain", "--", "orchestrator")
    return {"git_head": _git("rev-parse", "HEAD"),
            "orchestrator_uncommitted": dirty.splitlines() if dirty else []}
