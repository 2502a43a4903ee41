"""Pausing a Docker agent through its cgroup's freezer (``runtime/docker/freezer.py``).

Where the freezer is (pure, on ``/proc`` texts of v1, hybrid and v2 hosts; a path that
does not name the container is refused), and against the real engine: a frozen agent
is frozen (its freezer says so; Docker still calls it running), answers within
moments of its thaw, and a new runtime adopting it knows it is paused.
"""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from orchestrator.runtime.base import SessionRef
from orchestrator.runtime.docker.freezer import FreezerFile, locate_freezer
from tests.runtime.test_docker_runtime import make_runtime
from tests.support.docker_fixtures import in_thread, insert_message, make_session
from tests.support.helpers import ro_db, until

CID = "aa0208e75a43"
V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
34 31 0:31 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID_PROC = f"6:freezer:/docker/{CID}\n4:memory:/docker/{CID}\n0::/docker/{CID}\n"
V2_PROC = f"0::/system.slice/docker-{CID}.scope\n"


@pytest.mark.parametrize("proc,mounts,cid,found", [
    (HYBRID_PROC, V1_MOUNTS, CID,
     FreezerFile(1, Path(f"/sys/fs/cgroup/freezer/docker/{CID}/freezer.state"))),
    (V2_PROC, V2_MOUNTS, CID,
     FreezerFile(2, Path(f"/sys/fs/cgroup/system.slice/docker-{CID}.scope/cgroup.freeze"))),
    (HYBRID_PROC, V1_MOUNTS, "bb0000000000", None),  # a pid reused by someone else
    ("6:freezer:/user.slice\n", V1_MOUNTS, CID, None),
    (V2_PROC, V2_MOUNTS, "", None),
    (V2_PROC, "", CID, None),  # nothing mounted here
    ("", V1_MOUNTS, CID, None),
])
def test_where_a_container_freezer_is(proc: str, mounts: str, cid: str,
                                      found: FreezerFile | None) -> None:
    assert locate_freezer(proc, mounts, cid) == found


@pytest.mark.parametrize("version,frozen,thawed", [(1, "FROZEN", "THAWED"), (2, "1", "0")])
def test_what_a_freezer_is_told(version: int, frozen: str, thawed: str) -> None:
    f = FreezerFile(version, Path("/x"))
    assert (f.frozen_value, f.thawed_value) == (frozen, thawed)


def _replied(folder: Path, message_id: str) -> bool:
    with ro_db(folder / "outbound.db") as conn:
        return conn.execute("SELECT 1 FROM messages_out WHERE in_reply_to = ?",
                            (message_id,)).fetchone() is not None


@pytest.mark.docker
async def test_an_agent_frozen_through_its_cgroup_is_thawed_at_once_and_adopted_paused(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    insert_message(folder, "m2", "hi")
    rt, _ = make_runtime(tmp_path, instance, agent_image, netns_pool=0)
    again, _ = make_runtime(tmp_path, instance, agent_image, netns_pool=0)
    try:
        handle = await rt.start(SessionRef("g1", "s1", folder))
        await until(lambda: _replied(folder, "m2"), 30, "the first reply")
        await rt.pause("s1")
        assert rt.is_paused("s1")
        f = rt._freezer._files.get(handle.ident)
        assert f is not None, "this host's freezer is reachable (root, cgroupfs)"
        assert f.read_frozen()
        info = await in_thread(docker_client.api.inspect_container, handle.ident)
        assert info["State"]["Status"] == "running"  # Docker does not know
        insert_message(folder, "m4", "while frozen")
        # a restarted orchestrator adopts it paused (it reads the freezer)
        [adopted] = await again.recover()
        assert adopted.ident == handle.ident and again.is_paused("s1")
        assert not _replied(folder, "m4")  # frozen: nothing happens
        await again.resume("s1")
        assert not again.is_paused("s1") and not f.read_frozen()
        await until(lambda: _replied(folder, "m4"), 10, "the reply after the thaw")
        await again.pause("s1")  # frozen again, then stopped: the stop thaws it first
        await again.stop("s1", grace=5)
        assert not again.is_running("s1")
    finally:
        await again.close()
        await rt.close()
