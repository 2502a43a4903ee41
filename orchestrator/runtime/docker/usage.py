"""What each Docker agent run used: CPU seconds and peak memory from its cgroup.

    UsageMeter(exec: DockerExec, interval=SAMPLE_INTERVAL)
    meter.watch(cid)  meter.sample([cid])  meter.take(cid, finished=...) -> Usage

Why sampled while it runs, not read at its exit: measured on a cgroup v1 host
(cgroupfs driver, kernel 6.18), the container's cgroup directory is gone ~27 ms
*before* Docker's ``die`` event, and the stats API of an exited container answers
zeros; on cgroup v2 the scope is removed with its last process too. So the meter
reads every running container's counters each ``interval`` (0.5 s) — one call in the
docker thread pool for all of them, two small files each — plus once more when a
stop or kill is asked for, and the exit takes the last reading. CPU seconds are a
lower bound short by at most one interval of the run's last CPU use; the peak is
exact whenever the kernel keeps a high-water mark (v1 ``memory.max_usage_in_bytes``,
v2 ``memory.peak`` from 5.19), else the largest ``memory.current`` read.

Where the files are: the container's main process's ``/proc/<pid>/cgroup`` (pid from
one ``inspect``) mapped through this process's ``/proc/self/mountinfo`` — any cgroup
driver (cgroupfs, systemd), v1, v2 or hybrid. When they cannot be read (the
orchestrator in a container of its own, without the host's /proc), the Docker stats
API (``one-shot``) stands in, every ``STATS_EVERY``-th round: CPU from
``cpu_stats.cpu_usage.total_usage``, peak from ``memory_stats.max_usage`` (v1) or the
largest ``usage`` seen (v2).

Wall time: the container's own ``State.StartedAt`` to its end (the ``die`` event's
time, ``State.FinishedAt``, or now).

Counters are read from files of the kernel's, never from anything the agent writes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from orchestrator.runtime.base import RuntimeUnavailable, Usage, wall_between
from orchestrator.runtime.docker.calls import DockerExec

SAMPLE_INTERVAL = 0.5  # s between readings of every running container's counters
STATS_EVERY = 4  # rounds between stats-API readings (when the cgroup files are not visible)
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class CgroupFiles:
    """The counters of one container's cgroup. ``version`` 1: ``cpu`` is
    ``cpuacct.usage`` (ns), ``memory`` ``memory.max_usage_in_bytes``; 2: ``cpu`` is
    ``cpu.stat`` (``usage_usec``), ``memory`` its directory (``memory.peak`` or
    ``memory.current``)."""

    version: int
    cpu: Path
    memory: Path


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_seconds: float | None = None
    memory_bytes: int | None = None  # a high-water mark, or the current size (v2 < 5.19)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup``: controller -> path ("" is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def parse_mountinfo(text: str) -> dict[str, tuple[str, str]]:
    """``/proc/self/mountinfo``: controller -> (root within the hierarchy, mount point)
    of each cgroup mount ("": the cgroup2 one)."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if tail[0] == "cgroup2":
            out.setdefault("", (root, point))
        elif tail[0] == "cgroup":
            for opt in tail[2].split(","):
                out.setdefault(opt, (root, point))
    return out


def _under(mount: tuple[str, str], path: str) -> Path | None:
    root, point = mount
    if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
        return None  # not below what is mounted here (another cgroup namespace)
    rel = path[len(root):] if root != "/" else path
    return Path(point) / rel.lstrip("/")


def locate(proc_cgroup: str, mountinfo: str) -> CgroupFiles | None:
    """Where a process's CPU and memory counters are (pure). v1 controllers win over
    the unified hierarchy (a hybrid host's v2 has no controllers); None: not mapped."""
    paths, mounts = parse_proc_cgroup(proc_cgroup), parse_mountinfo(mountinfo)
    if all(k in paths and k in mounts for k in ("cpuacct", "memory")):
        cpu, mem = _under(mounts["cpuacct"], paths["cpuacct"]), _under(mounts["memory"],
                                                                       paths["memory"])
        if cpu is not None and mem is not None:
            return CgroupFiles(1, cpu / "cpuacct.usage", mem / "memory.max_usage_in_bytes")
    if "" in paths and "" in mounts:
        d = _under(mounts[""], paths[""])
        if d is not None:
            return CgroupFiles(2, d / "cpu.stat", d)
    return None


def cpu_stat_seconds(text: str) -> float | None:
    """v2 ``cpu.stat``'s ``usage_usec`` in seconds."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            try:
                return int(value) / 1e6
            except ValueError:
                return None
    return None


def read_cgroup(files: CgroupFiles) -> Sample | None:
    """One reading of the counters; None once the cgroup is gone (the container ended)."""
    try:
        if files.version == 1:
            cpu: float | None = int(files.cpu.read_text()) / 1e9
            mem = int(files.memory.read_text())
        else:
            cpu = cpu_stat_seconds(files.cpu.read_text())
            try:
                mem = int((files.memory / "memory.peak").read_text())
            except FileNotFoundError:  # kernels before 5.19: the largest reading instead
                mem = int((files.memory / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return Sample(cpu, mem)


def stats_sample(stats: dict[str, Any]) -> Sample | None:
    """A reading from the stats API's answer (pure); None for a stopped container (its
    answer is all zeros)."""
    cpu = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
    mem = stats.get("memory_stats") or {}
    peak = mem.get("max_usage") or mem.get("usage")
    if not cpu and not peak:
        return None
    return Sample(cpu / 1e9 if cpu else None, int(peak) if peak else None)


@dataclass
class _Meter:
    """What is known of one running container."""

    cid: str
    pid: int | None = None  # None: not inspected yet
    started_at: str | None = None  # State.StartedAt
    files: CgroupFiles | None = None
    cpu_seconds: float | None = None
    peak: int | None = None
    via_stats: bool = False
    rounds: int = field(default=0)

    def add(self, s: Sample) -> None:
        if s.cpu_seconds is not None:
            self.cpu_seconds = max(self.cpu_seconds or 0.0, s.cpu_seconds)
        if s.memory_bytes is not None:
            self.peak = max(self.peak or 0, s.memory_bytes)


def _read_all(meters: list[_Meter], proc: Path) -> list[Sample | None]:
    """In the pool: locate the new ones, read every one (never on the loop)."""
    mountinfo: str | None = None
    out: list[Sample | None] = []
    for m in meters:
        if m.files is None and not m.via_stats and m.pid:
            try:
                if mountinfo is None:
                    mountinfo = (proc / "self" / "mountinfo").read_text()
                m.files = locate((proc / str(m.pid) / "cgroup").read_text(), mountinfo)
            except OSError:
                m.files = None
            if m.files is None or read_cgroup(m.files) is None:
                m.files, m.via_stats = None, True
                logger.debug("container {}: cgroup not readable here; usage from the stats "
                             "API", m.cid[:12])
        out.append(read_cgroup(m.files) if m.files is not None else None)
    return out


class UsageMeter:
    """Per-container CPU and memory readings while they run (see the module docstring)."""

    def __init__(self, exec_: DockerExec, interval: float = SAMPLE_INTERVAL,
                 proc: Path = PROC) -> None:
        self.exec = exec_
        self.interval = interval
        self.proc = proc
        self._meters: dict[str, _Meter] = {}
        self._task: asyncio.Task | None = None
        self.rounds = 0  # completed sampling rounds (observable in tests)

    def watch(self, cid: str) -> None:
        """Start metering a container (started or adopted); the loop runs while any is."""
        self._meters.setdefault(cid, _Meter(cid))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # bookkeeping outside a loop (a test of the event path)
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def forget(self, cid: str) -> None:
        self._meters.pop(cid, None)

    def take(self, cid: str, finished: str | None = None) -> Usage | None:
        """The run's usage at its end (and stop metering it); None if it was not metered.
        ``finished``: its end (Docker's timestamp); default now."""
        m = self._meters.pop(cid, None)
        if m is None:
            return None
        end = finished or datetime.now(timezone.utc).isoformat()
        return Usage(cpu_seconds=None if m.cpu_seconds is None else round(m.cpu_seconds, 3),
                     peak_memory_bytes=m.peak, wall_seconds=wall_between(m.started_at, end))

    async def sample(self, cids: list[str] | None = None) -> None:
        """One round now (all, or just ``cids``: before a stop or kill). A daemon that
        does not answer skips the round; the last readings stand."""
        meters = [m for cid, m in list(self._meters.items()) if cids is None or cid in cids]
        if not meters:
            return
        try:
            await asyncio.gather(*(self._inspect(m) for m in meters if m.pid is None))
            located = [m for m in meters if not m.via_stats]
            for m, s in zip(located, await self.exec.offload(
                    lambda: _read_all(located, self.proc)), strict=True):
                if s is not None:
                    m.add(s)
            for m in meters:
                if m.via_stats and (m.rounds % STATS_EVERY == 0 or cids is not None):
                    await self._stats(m)
                m.rounds += 1
        except RuntimeUnavailable as exc:
            logger.debug("usage round skipped: {}", exc)

    async def _inspect(self, m: _Meter) -> None:
        info = await self.exec.inspect(m.cid) or {}
        state = info.get("State") or {}
        if info and state.get("Status") == "created":
            return  # ``docker start`` under way: the next round looks again
        m.pid = int(state.get("Pid") or 0)
        m.started_at = state.get("StartedAt")
        if not m.pid:  # not running any more: the stats API, if anything
            m.via_stats = True

    async def _stats(self, m: _Meter) -> None:
        got = await self.exec.call("stats", lambda api: api.stats(m.cid, stream=False,
                                                                  one_shot=True),
                                   missing_ok=True)
        s = stats_sample(got) if isinstance(got, dict) else None
        if s is not None:
            m.add(s)

    async def _run(self) -> None:
        """A round each ``interval``; the first one ``interval`` after a start, not
        beside its ``docker start`` (a cold start is not slowed by an inspect)."""
        began = time.monotonic()
        while self._meters:
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))
            began = time.monotonic()
            try:
                await self.sample()
            except Exception:  # noqa: BLE001 - a reading's bug must not end the metering
                logger.exception("usage round failed")
            self.rounds += 1

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
