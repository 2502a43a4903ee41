"""What a Docker agent run used (``runtime/docker/usage.py``): where its cgroup's
counters are (pure, table-tested on real ``/proc`` texts of v1, hybrid and v2 hosts),
and against the real engine: a container that burns one CPU for 2 s and touches
200 MB reports ≥ 1.5 CPU-s and a peak ≥ 200 MB with its exit — whether it ends by
itself (the sampler's last reading: its cgroup is gone before the ``die`` event, so a
peak is seen once it has lasted one sampling interval) or is stopped (the reading
taken before the signal)."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from orchestrator.config.sections import DockerConfig
from orchestrator.runtime.base import AgentExit, SessionRef, Usage, wall_between
from orchestrator.runtime.docker.runtime import DockerRuntime
from orchestrator.runtime.docker.usage import (
    SAMPLE_INTERVAL,
    CgroupFiles,
    Sample,
    UsageMeter,
    cpu_stat_seconds,
    locate,
    read_cgroup,
    stats_sample,
)
from tests.support.docker_fixtures import make_session
from tests.support.heavy_agent import BURN, MIB
from tests.support.helpers import until

CID = "aa0208e75a43"

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_COMBINED = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_NS = "30 23 0:26 /docker/outer /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
V1_PROC = f"4:memory:/docker/{CID}\n2:cpuacct:/docker/{CID}\n1:cpu:/docker/{CID}\n0::/docker/{CID}\n"
V1_COMBINED_PROC = f"4:memory:/docker/{CID}\n2:cpu,cpuacct:/docker/{CID}\n"
V2_PROC = f"0::/system.slice/docker-{CID}.scope\n"


@pytest.mark.parametrize("proc,mounts,want", [
    # v1 cgroupfs, hybrid host (this one): the v1 controllers win over the empty unified
    (V1_PROC, V1_MOUNTS, CgroupFiles(1, Path(f"/sys/fs/cgroup/cpuacct/docker/{CID}/cpuacct.usage"),
                                     Path(f"/sys/fs/cgroup/memory/docker/{CID}/"
                                          "memory.max_usage_in_bytes"))),
    (V1_COMBINED_PROC, V1_COMBINED,
     CgroupFiles(1, Path(f"/sys/fs/cgroup/cpu,cpuacct/docker/{CID}/cpuacct.usage"),
                 Path(f"/sys/fs/cgroup/memory/docker/{CID}/memory.max_usage_in_bytes"))),
    # v2, systemd driver
    (V2_PROC, V2_MOUNTS, CgroupFiles(2, Path(f"/sys/fs/cgroup/system.slice/docker-{CID}.scope/"
                                             "cpu.stat"),
                                     Path(f"/sys/fs/cgroup/system.slice/docker-{CID}.scope"))),
    # v2 seen from inside a cgroup namespace rooted at /docker/outer
    ("0::/docker/outer/inner\n", V2_NS, CgroupFiles(2, Path("/sys/fs/cgroup/inner/cpu.stat"),
                                                    Path("/sys/fs/cgroup/inner"))),
    ("0::/elsewhere\n", V2_NS, None),  # not below this mount
    (V2_PROC, "", None),  # no cgroup mounted here
    ("", V1_MOUNTS, None),
])
def test_locate(proc: str, mounts: str, want: CgroupFiles | None) -> None:
    assert locate(proc, mounts) == want


@pytest.mark.parametrize("text,seconds", [
    ("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n", 2.5),
    ("user_usec 1\n", None),
    ("usage_usec x\n", None),
])
def test_cpu_stat_seconds(text: str, seconds: float | None) -> None:
    assert cpu_stat_seconds(text) == seconds


@pytest.mark.parametrize("stats,want", [
    ({"cpu_stats": {"cpu_usage": {"total_usage": 2_000_000_000}},
      "memory_stats": {"usage": 5, "max_usage": 300 * MIB}}, Sample(2.0, 300 * MIB)),  # v1
    ({"cpu_stats": {"cpu_usage": {"total_usage": 10**9}}, "memory_stats": {"usage": 7}},
     Sample(1.0, 7)),  # v2: no high-water mark, the current size
    ({"cpu_stats": {"cpu_usage": {"total_usage": 0}}, "memory_stats": {}}, None),  # exited
    ({}, None),
])
def test_stats_sample(stats: dict, want: Sample | None) -> None:
    assert stats_sample(stats) == want


@pytest.mark.parametrize("started,finished,wall", [
    ("2026-12-07T14:52:01.296686159Z", "2026-12-07T14:52:03.368876634Z", 2.072),
    ("2026-12-07T14:52:01Z", "2026-12-07T14:52:01+00:00", 0.0),
    ("0001-01-01T00:00:00Z", "2026-12-07T14:52:01Z", None),  # Docker's "never"
    ("2026-12-07T14:52:03Z", "2026-12-07T14:52:01Z", None),  # backwards
    (None, "2026-12-07T14:52:01Z", None),
    ("soon", "2026-12-07T14:52:01Z", None),
    ("2026-12-07T14:52:01", "2026-12-07T14:52:02", None),  # no zone: not comparable
])
def test_wall_between(started: str | None, finished: str | None, wall: float | None) -> None:
    assert wall_between(started, finished) == wall


def test_read_cgroup_v1_v2_and_gone(tmp_path: Path) -> None:
    (tmp_path / "cpuacct.usage").write_text("1500000000\n")
    (tmp_path / "memory.max_usage_in_bytes").write_text(f"{210 * MIB}\n")
    v1 = CgroupFiles(1, tmp_path / "cpuacct.usage", tmp_path / "memory.max_usage_in_bytes")
    assert read_cgroup(v1) == Sample(1.5, 210 * MIB)
    (tmp_path / "cpu.stat").write_text("usage_usec 250000\n")
    (tmp_path / "memory.current").write_text("4096\n")
    v2 = CgroupFiles(2, tmp_path / "cpu.stat", tmp_path)
    assert read_cgroup(v2) == Sample(0.25, 4096)  # before 5.19: the current size
    (tmp_path / "memory.peak").write_text("8192\n")
    assert read_cgroup(v2) == Sample(0.25, 8192)
    assert read_cgroup(CgroupFiles(2, tmp_path / "gone" / "cpu.stat", tmp_path / "gone")) is None


# --- against the real engine ------------------------------------------------------------

HEAVY = "import time\n" + BURN + f"""\
time.sleep({2 * SAMPLE_INTERVAL})  # held past a reading: the last 0.5 s of a run is unseen
print('done', flush=True)
"""


def heavy_runtime(tmp_path: Path, instance: str, image: str, then: str
                  ) -> tuple[DockerRuntime, list[AgentExit]]:
    exits: list[AgentExit] = []
    cfg = DockerConfig(instance=instance, image=image, network="none", memory="512m",
                       command=("python3", "-c", HEAVY + then))
    return DockerRuntime(cfg, tmp_path / "data", exits.append), exits


def check_heavy(usage: Usage | None) -> None:
    print(f"usage: {usage}")
    assert usage is not None
    assert usage.cpu_seconds is not None and usage.cpu_seconds >= 1.5, usage
    assert usage.peak_memory_bytes is not None and usage.peak_memory_bytes >= 200 * MIB, usage
    assert usage.wall_seconds is not None and usage.wall_seconds >= 2.0, usage


@pytest.mark.docker
async def test_a_container_that_ends_by_itself_reports_its_cpu_and_peak(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    rt, exits = heavy_runtime(tmp_path, instance, agent_image, "")
    folder = make_session(tmp_path / "data", "g", "s1")
    try:
        await rt.start(SessionRef("g", "s1", folder))
        await until(lambda: exits, timeout=60, message="the container's exit")
    finally:
        await rt.close()
    [ev] = exits
    assert (ev.reason, ev.exit_code) == ("exited", 0)
    check_heavy(ev.usage)


@pytest.mark.docker
@pytest.mark.parametrize("source", ["cgroup", "stats"])
async def test_a_stopped_container_reports_its_cpu_and_peak(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str, source: str) -> None:
    """``stats``: the cgroup files not visible (no /proc where the meter looks, as for an
    orchestrator in a container of its own): the stats API's readings instead."""
    rt, exits = heavy_runtime(tmp_path, instance, agent_image, "time.sleep(600)\n")
    if source == "stats":
        rt.usage = UsageMeter(rt.exec, proc=tmp_path / "no-proc")
    folder = make_session(tmp_path / "data", "g", "s2")
    try:
        await rt.start(SessionRef("g", "s2", folder))
        # its work done (the log says so), it waits to be stopped
        await until(lambda: b"done" in docker_client.api.logs(rt._by_session["s2"].container_id),
                    timeout=60, message="the burn and the allocation done")
        await rt.stop("s2", grace=1.0)
    finally:
        await rt.close()
    [ev] = exits
    assert ev.reason == "stopped"
    check_heavy(ev.usage)
