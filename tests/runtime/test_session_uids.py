"""Each session's agent runs as its own uid (root only), its folder its own (0700);
setuid files an agent leaves arrive in delivered/ without the bit.

Real parts: the registry file, real folders under umask 0o022, a real Docker
container per session (``docker`` mark), a real local agent process.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator.config.load import parse_range
from orchestrator.config.sections import DockerConfig, RuntimeConfig
from orchestrator.contract.layout import delivered_root
from orchestrator.engine.reply_files import move_files
from orchestrator.host.safefs import SessionDir
from orchestrator.host.sessions import create_folder
from orchestrator.host.uids import SessionUids
from orchestrator.runtime.base import AgentExit, SessionRef
from tests.support.helpers import needs_root

RANGE = (200000, 200099)
root_only = needs_root("per-session uids")


def status_uids(text: str) -> list[int]:
    line = next(ln for ln in text.splitlines() if ln.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


def test_uid_map_is_stable_unique_and_bounded(tmp_path: Path) -> None:
    registry = tmp_path / "orchestrator.db"
    uids = SessionUids(registry, (500, 501))
    a, b = uids.uid_for("sess-a"), uids.uid_for("sess-b")
    assert (a, b) == (500, 501) and uids.uid_for("sess-a") == 500
    with pytest.raises(RuntimeError, match="widen the range"):
        uids.uid_for("sess-c")
    uids.close()
    again = SessionUids(registry, (500, 510))  # a restart: the same uid for the same session
    assert again.uid_for("sess-b") == 501 and again.uid_for("sess-c") == 502
    again.close()
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600
    assert parse_range("auto") == (200000, 299999) and parse_range("") is None
    assert parse_range("auto", default=None) is None and parse_range("10-20") == (10, 20)
    with pytest.raises(ValueError, match="uid_range"):
        parse_range("20-10")


@root_only
def test_local_agent_runs_as_its_sessions_uid(tmp_path: Path, umask_022: None) -> None:
    from orchestrator.runtime.local.runtime import LocalRuntime

    data = tmp_path / "data"
    folders = [create_folder(data, "grp", sid).root for sid in ("sess-a", "sess-b")]
    exits: list[AgentExit] = []
    cfg = RuntimeConfig(command=("sh", "-c", "sleep 30", "agent"))

    async def go() -> list[tuple[int, list[int]]]:
        runtime = LocalRuntime(cfg, data, exits.append, uid_range=RANGE)
        seen = []
        try:
            for folder in folders:
                handle = await runtime.start(SessionRef("grp", folder.name, folder))
                text = Path(f"/proc/{handle.ident}/status").read_text()
                seen.append((int(handle.ident), status_uids(text)))
            for folder in folders:
                await runtime.kill(folder.name)
        finally:
            await runtime.close()
        return seen

    seen = asyncio.run(go())
    (_, uids_a), (_, uids_b) = seen
    assert uids_a == [RANGE[0]] * 4 and uids_b == [RANGE[0] + 1] * 4
    for folder, uid in zip(folders, (RANGE[0], RANGE[0] + 1), strict=True):
        st = folder.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, uid, 0o700)
        inbound = (folder / "inbound.db").stat()
        assert (inbound.st_uid, inbound.st_gid, stat.S_IMODE(inbound.st_mode)) == (0, uid, 0o640)
    # session b's uid cannot read session a's folder (nor list the sessions root)
    for target in (folders[0], folders[0] / "inbound.db", folders[0].parent):
        probe = subprocess.run(["cat" if target.name.endswith(".db") else "ls", str(target)],
                               user=RANGE[0] + 1, group=RANGE[0] + 1, extra_groups=[],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, target


@pytest.mark.docker
@root_only
def test_docker_agents_run_as_their_own_uids_and_setuid_is_not_delivered(
        tmp_path: Path, umask_022: None, docker_client, agent_image: str, instance: str) -> None:
    from orchestrator.runtime.docker.runtime import DockerRuntime

    data = tmp_path / "data"
    folders = [create_folder(data, "grp", sid).root for sid in ("sess-a", "sess-b")]
    script = ("grep ^Uid: /proc/self/status > /workspace/outbox/uid.txt; "
              "head -c 15 /workspace/inbound.db > /workspace/outbox/inbound-head; "
              "mkdir -p /workspace/outbox/r1 && printf '#!/bin/sh\\nid\\n' > "
              "/workspace/outbox/r1/tool && chmod 4755 /workspace/outbox/r1/tool")
    cfg = DockerConfig(instance=instance, image=agent_image, command=("sh", "-c", script),
                       network="none")
    exits: list[AgentExit] = []

    async def go() -> list[str]:
        runtime = DockerRuntime(cfg, data, exits.append, uid_range=RANGE)
        users = []
        try:
            for folder in folders:
                handle = await runtime.start(SessionRef("grp", folder.name, folder))
                users.append(docker_client.containers.get(handle.ident).attrs["Config"]["User"])
            for _ in range(600):
                if len(exits) == 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            await runtime.close()
        return users

    users = asyncio.run(go())
    assert users == [f"{RANGE[0]}:{RANGE[0]}", f"{RANGE[0] + 1}:{RANGE[0] + 1}"]
    assert len(exits) == 2
    for folder, uid in zip(folders, (RANGE[0], RANGE[0] + 1), strict=True):
        assert status_uids((folder / "outbox" / "uid.txt").read_text()) == [uid] * 4
        assert (folder / "outbox" / "inbound-head").read_bytes() == b"SQLite format 3"
        st = folder.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
        tool = folder / "outbox" / "r1" / "tool"
        assert tool.stat().st_mode & stat.S_ISUID
    with SessionDir(data, "grp", "sess-a") as folder:
        [moved] = move_files(folder, data, "r1", ["tool"])
    assert moved == delivered_root(data) / "r1" / "tool"
    assert stat.S_IMODE(moved.stat().st_mode) == 0o700  # no setuid, nothing for others


@root_only
@pytest.mark.docker
def test_a_group_folder_is_shared_through_the_groups_own_gid(
        tmp_path: Path, umask_022: None, docker_client, agent_image: str, instance: str) -> None:
    """Sessions with uids of their own share the group folder through a gid the group
    owns (never a session's uid): root:<gid> 02770, and each agent carries that gid."""
    from orchestrator.runtime.docker.runtime import DockerRuntime

    data = tmp_path / "data"
    folders = [create_folder(data, "grp", sid).root for sid in ("sess-a", "sess-b")]
    script = ("id -G > /workspace/outbox/groups.txt; "
              "cat /workspace/agent/*.txt > /workspace/outbox/seen.txt 2>&1; "
              "echo from-$ORCHESTRATOR_SESSION > /workspace/agent/$ORCHESTRATOR_SESSION.txt")
    cfg = DockerConfig(instance=instance, image=agent_image, command=("sh", "-c", script),
                       network="none", group_folder="{data_dir}/groups/{group}")
    exits: list[AgentExit] = []

    async def go() -> None:
        runtime = DockerRuntime(cfg, data, exits.append, uid_range=RANGE)
        try:
            for n, folder in enumerate(folders, start=1):  # one after the other
                await runtime.start(SessionRef("grp", folder.name, folder))
                for _ in range(600):
                    if len(exits) == n:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await runtime.close()

    asyncio.run(go())
    assert len(exits) == 2
    shared = data / "groups" / "grp"
    st = shared.stat()
    gid = st.st_gid
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o2770)
    session_uids = {folder.stat().st_uid for folder in folders}
    assert len(session_uids) == 2 and gid not in session_uids and RANGE[0] <= gid <= RANGE[1]
    for folder in folders:
        assert str(gid) in (folder / "outbox" / "groups.txt").read_text().split()
    assert (shared / "sess-a.txt").stat().st_gid == gid  # the setgid folder's group
    assert (folders[1] / "outbox" / "seen.txt").read_text() == "from-sess-a\n"
