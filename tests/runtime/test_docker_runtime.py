"""DockerRuntime against a real Docker engine, with the real reference agent.

Every container carries a per-test ``orchestrator.instance`` label and is removed
afterwards. Containers use network none. Nothing sleeps and hopes: each wait is a
condition polled against a deadline while the event loop keeps running.

Pure helpers (names, mounts, users, exit reasons) are tested without Docker.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from loguru import logger

from orchestrator.config.mounts import MountNotAllowed
from orchestrator.config.sections import DockerConfig
from orchestrator.contract import layout
from orchestrator.runtime.base import AgentExit, AgentHandle, RuntimeUnavailable, SessionRef
from orchestrator.runtime.docker import image as image_mod
from orchestrator.runtime.docker.calls import Conflict, DockerExec
from orchestrator.runtime.docker.runtime import DockerRuntime
from orchestrator.runtime.docker.spec import (
    FALLBACK_UID,
    LABEL_GROUP,
    LABEL_INSTANCE,
    LABEL_SESSION,
    MountRefused,
    container_name,
    container_spec,
    exit_reason,
    group_folder,
    group_mounts,
    host_config_kwargs,
    parse_extra_mounts,
    prepare_folder,
    resolve_user,
    session_mounts,
)
from orchestrator.runtime.docker.tracked import Phase, Tracked
from tests.support.docker_fixtures import (
    PrivateDockerd,
    in_thread,
    insert_message,
    make_session,
    remove_labelled,
)
from tests.support.helpers import needs_root, ro_db, until

AGENT = ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace",
         "--poll-interval", "0.05", "--heartbeat-interval", "0.2"]


def make_runtime(data_dir: Path, instance: str, image: str, *, command: list[str] | None = None,
                 **overrides: Any) -> tuple[DockerRuntime, list[AgentExit]]:
    exits: list[AgentExit] = []
    # no container created ahead after a stop unless a test asks (test_docker_ahead.py):
    # these tests count the containers left after one
    overrides.setdefault("prepared_containers", 0)
    cfg = DockerConfig(instance=instance, image=image, command=tuple(command or AGENT),
                       network="none", **overrides)
    return DockerRuntime(cfg, data_dir, exits.append), exits


def labelled(client: docker.DockerClient, instance: str, **extra: str) -> list[Any]:
    labels = [f"{LABEL_INSTANCE}={instance}"] + [f"orchestrator.{k}={v}" for k, v in extra.items()]
    return client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)


# --- pure helpers (no Docker) ---------------------------------------------------------------


def test_container_name_is_docker_safe_and_unambiguous() -> None:
    assert container_name("default", "g1", "s1") == "orch-default-g1-s1"
    a, b = container_name("i", "g", "a@b"), container_name("i", "g", "a_b")
    assert a != b and a.startswith("orch-i-g-a_b-")
    assert all(ch.isalnum() or ch in "_.-" for ch in a)


@pytest.mark.parametrize("kwargs,reason", [
    ({"exit_code": 0}, "exited"),
    ({"exit_code": 3}, "exited"),
    ({"exit_code": 137}, "killed"),
    ({"exit_code": 137, "kill_signal": "9"}, "killed"),
    ({"exit_code": 143, "kill_signal": "15"}, "stopped"),
    ({"exit_code": 137, "oom": True}, "oom"),
    ({"exit_code": 0, "stopping": True}, "stopped"),
    ({"exit_code": 137, "killing": True}, "killed"),
])
def test_exit_reason(kwargs: dict, reason: str) -> None:
    assert exit_reason(**kwargs) == reason


def test_extra_mounts_only_under_allowed_roots(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "models").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed / "escape").symlink_to(tmp_path / "secret")
    ok = parse_extra_mounts(DockerConfig(mounts=(f"{allowed}/models:/models:ro",),
                                         allowed_mounts=(str(allowed),)))
    assert ok[0]["Source"] == str(allowed / "models") and ok[0]["ReadOnly"] is True
    for spec in (f"{tmp_path}/secret:/s", f"{allowed}/escape:/s", "relative:/s",
                 f"{allowed}/models:/workspace/models", f"{allowed}/models"):
        with pytest.raises(MountNotAllowed):
            parse_extra_mounts(DockerConfig(mounts=(spec,), allowed_mounts=(str(allowed),)))
    # refused at a start: also a RuntimeUnavailable (the work stays pending)
    with pytest.raises(MountRefused, match="allowed_mounts"):
        parse_extra_mounts(DockerConfig(mounts=(f"{allowed}/models:/m",)))


def test_resolve_user(tmp_path: Path) -> None:
    st = tmp_path.stat()
    user, uid, gid = resolve_user("auto", tmp_path)
    if st.st_uid == 0:
        assert (uid, gid) == (FALLBACK_UID, FALLBACK_UID) and user == "10001:10001"
    else:
        assert uid == st.st_uid
    assert resolve_user("1234:55", tmp_path) == ("1234:55", 1234, 55)
    assert resolve_user("1234", tmp_path) == ("1234:1234", 1234, 1234)
    assert resolve_user("nobody", tmp_path) == ("nobody", None, None)


def test_session_mounts_folder_rw_and_inbound_db_ro_on_top(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = make_session(data, "g", "s")
    rw, ro = session_mounts(folder, data)
    assert (rw["Target"], rw["Source"], rw["ReadOnly"]) == ("/workspace", str(folder), False)
    assert (ro["Target"], ro["Source"], ro["ReadOnly"]) == (
        "/workspace/inbound.db", str(folder / "inbound.db"), True)
    outside = make_session(tmp_path / "elsewhere", "g", "s")
    with pytest.raises(MountRefused, match="not under data_dir"):
        session_mounts(outside, data)
    (folder / "inbound.db").rename(folder / "real.db")
    with pytest.raises(RuntimeUnavailable, match="does not exist"):
        session_mounts(folder, data)
    (folder / "inbound.db").symlink_to(folder / "real.db")
    with pytest.raises(MountNotAllowed, match="symlinks are not followed"):
        session_mounts(folder, data)


def test_group_folder_template(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert group_folder("", data, "g") is None
    assert group_folder("{data_dir}/groups/{group}", data, "g") == data / "groups" / "g"
    assert group_folder("agents/{group}", data, "g") == data / "agents" / "g"
    with pytest.raises(MountNotAllowed, match="only {data_dir} and {group}"):
        group_folder("{home}/x", data, "g")
    with pytest.raises(ValueError, match="invalid agent group"):
        group_folder("{data_dir}/{group}", data, "../up")


def test_group_mounts_folder_rw_and_container_json_ro_on_top(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = make_session(data, "g", "s")
    group = data / "groups" / "g"
    assert group_mounts(None, folder, data) == []
    (rw,) = group_mounts(group, folder, data)  # created; no container.json yet
    assert (rw["Target"], rw["Source"], rw["ReadOnly"]) == ("/workspace/agent", str(group), False)
    assert (folder / "agent").is_dir() and not (folder / "agent").is_symlink()
    (group / "container.json").write_text('{"assistantName": "Andy"}')
    (folder / "agent").rmdir()
    (folder / "agent").symlink_to("/etc")  # planted by the agent: replaced, never followed
    rw, ro = group_mounts(group, folder, data)
    assert (ro["Target"], ro["Source"], ro["ReadOnly"]) == (
        "/workspace/agent/container.json", str(group / "container.json"), True)
    assert (folder / "agent").is_dir() and not (folder / "agent").is_symlink()
    (group / "container.json").unlink()
    (group / "container.json").symlink_to("/etc/passwd")
    assert len(group_mounts(group, folder, data)) == 1  # a symlinked container.json: not mounted
    with pytest.raises(MountNotAllowed, match="not under sessions/"):
        group_mounts(data / "sessions" / "g" / "shared", folder, data)
    with pytest.raises(MountNotAllowed, match="under data_dir or"):
        group_mounts(tmp_path / "elsewhere", folder, data)
    assert len(group_mounts(tmp_path / "elsewhere", folder, data, (str(tmp_path),))) == 1


def test_container_spec_and_host_config_are_least_privilege(tmp_path: Path) -> None:
    cfg = DockerConfig(instance="i1", image="img:1", command=("agent", "--x"), memory="256m",
                       cpus=0.5, pids_limit=64)
    spec = container_spec(cfg, SessionRef("g", "s", tmp_path), "10001:10001")
    assert spec["name"] == "orch-i1-g-s" and spec["image"] == "img:1"
    assert spec["command"] == ["agent", "--x"] and spec["user"] == "10001:10001"
    assert spec["labels"] == {LABEL_INSTANCE: "i1", LABEL_GROUP: "g", LABEL_SESSION: "s"}
    assert spec["working_dir"] == "/workspace"
    hc = host_config_kwargs(cfg, [])
    assert hc["network_mode"] == "none" and hc["cap_drop"] == ["ALL"]
    assert hc["security_opt"] == ["no-new-privileges=true"] and hc["read_only"] is True
    assert hc["mem_limit"] == "256m" and hc["nano_cpus"] == 500_000_000
    assert hc["pids_limit"] == 64 and hc["init"] is True and hc["auto_remove"] is False
    assert "privileged" not in hc and "cap_add" not in hc
    loose = host_config_kwargs(DockerConfig(no_new_privileges=False, network="bridge"), [])
    assert loose["security_opt"] == [] and loose["network_mode"] == "bridge"


@needs_root("chown")
def test_prepare_folder_gives_agent_only_its_writable_parts(tmp_path: Path) -> None:
    folder = make_session(tmp_path, "g", "s")
    (folder / layout.OUTBOX / "m1").mkdir()
    (folder / layout.OUTBOX / "m1" / "f.txt").write_text("x")
    (folder / layout.INBOX / "m2").mkdir()
    prepare_folder(folder, 4242, 4243)
    owner = lambda p: (p.lstat().st_uid, p.lstat().st_gid)  # noqa: E731
    for p in (folder, folder / layout.OUTBOUND_DB, folder / layout.OUTBOX,
              folder / layout.OUTBOX / "m1", folder / layout.OUTBOX / "m1" / "f.txt"):
        assert owner(p) == (4242, 4243), p
    # what the agent only reads stays the host's, readable by the agent's gid only
    for p in (folder / layout.INBOUND_DB, folder / layout.INBOX, folder / layout.INBOX / "m2"):
        assert owner(p) == (0, 4243), p
    mode = lambda p: stat.S_IMODE(p.lstat().st_mode)  # noqa: E731
    assert (mode(folder), mode(folder / layout.INBOUND_DB), mode(folder / layout.INBOX)) == (
        0o700, 0o640, 0o2750)


# --- against the engine ----------------------------------------------------------------------


@pytest.mark.docker
def test_image_build_is_idempotent(docker_client: docker.DockerClient, agent_image: str) -> None:
    t0 = time.monotonic()
    result = image_mod.build_image(agent_image, client=docker_client)
    assert result.built is False and time.monotonic() - t0 < 5
    labels = docker_client.images.get(agent_image).labels
    assert labels[image_mod.CODE_LABEL] == image_mod.code_hash()
    cfg = docker_client.images.get(agent_image).attrs["Config"]
    assert cfg["WorkingDir"] == "/workspace" and cfg["User"] not in ("", "0", "root")


@pytest.mark.docker
def test_start_applies_least_privilege(tmp_path: Path, docker_client: docker.DockerClient,
                                       agent_image: str, instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")

    async def main() -> dict:
        rt, _ = make_runtime(tmp_path, instance, agent_image)
        try:
            handle = await rt.start(SessionRef("g1", "s1", folder))
            assert rt.is_running("s1") and rt.running() == [handle] and not handle.adopted
            return await in_thread(docker_client.api.inspect_container, handle.ident)
        finally:
            await rt.close()

    info = asyncio.run(main())
    assert info["State"]["Running"] is True
    assert info["Name"] == f"/orch-{instance}-g1-s1"
    labels = info["Config"]["Labels"]
    assert labels[LABEL_INSTANCE] == instance and labels[LABEL_GROUP] == "g1"
    assert labels[LABEL_SESSION] == "s1"
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert set(mounts) == {"/workspace", "/workspace/inbound.db"}
    assert mounts["/workspace"]["Source"] == str(folder.resolve()) and mounts["/workspace"]["RW"]
    assert mounts["/workspace/inbound.db"]["Source"] == str(folder.resolve() / "inbound.db")
    assert mounts["/workspace/inbound.db"]["RW"] is False
    hc = info["HostConfig"]
    assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd")
    assert any(o.startswith("no-new-privileges") for o in hc["SecurityOpt"])
    assert hc["ReadonlyRootfs"] is True and "/tmp" in hc["Tmpfs"]
    assert hc["Memory"] == 512 * 1024 * 1024 and hc["NanoCpus"] == 1_000_000_000
    assert hc["PidsLimit"] == 256 and hc["NetworkMode"] == "none"
    assert hc["Privileged"] is False and hc["AutoRemove"] is False and hc["Init"] is True
    uid = info["Config"]["User"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    if os.geteuid() == 0:  # root-owned data dir → the fixed unprivileged uid
        assert uid == str(FALLBACK_UID)
        assert folder.stat().st_uid == FALLBACK_UID
        assert (folder / "inbound.db").stat().st_uid == 0  # host-owned, never chowned


@pytest.mark.docker
async def test_agent_works_through_the_mounts(tmp_path: Path, docker_client: docker.DockerClient,
                                        agent_image: str, instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    (folder / "inbox" / "m2").mkdir()
    (folder / "inbox" / "m2" / "hello.txt").write_text("attached")
    insert_message(folder, "m2", "hi there",
                   attachments=[{"path": "inbox/m2/hello.txt", "name": "hello.txt"}])

    def replies() -> list[tuple]:
        with ro_db(folder / "outbound.db") as conn:
            return conn.execute("SELECT id, seq, in_reply_to, content FROM messages_out").fetchall()

    rt, exits = make_runtime(tmp_path, instance, agent_image)
    try:
        handle = await rt.start(SessionRef("g1", "s1", folder))
        rows = await until(replies, 30, "reply row in outbound.db")
        out_id, seq, in_reply_to, content = rows[0]
        assert in_reply_to == "m2" and seq % 2 == 1 and "echo: hi there" in content
        await until(lambda: (folder / "outbox" / out_id / "hello.txt").is_file(), 10,
                    "outbox file on the host")
        assert (folder / "outbox" / out_id / "hello.txt").read_text() == "attached"
        await until(lambda: (folder / ".heartbeat").is_file(), 10, "heartbeat on the host")
        first = (folder / ".heartbeat").stat().st_mtime_ns
        insert_message(folder, "m4", "again")  # host writes while the agent runs
        await until(lambda: len(replies()) == 2, 30, "second reply")
        await until(lambda: (folder / ".heartbeat").stat().st_mtime_ns != first, 10,
                    "heartbeat touched again")
        # The agent cannot write inbound.db: the same python3 + sqlite3 inside fails.
        probe = ("import sqlite3; c = sqlite3.connect('/workspace/inbound.db'); "
                 "c.execute(\"UPDATE messages_in SET status='completed'\"); c.commit()")
        res = await in_thread(lambda: docker_client.api.exec_create(
            handle.ident, ["python3", "-c", probe]))
        out = await in_thread(docker_client.api.exec_start, res["Id"])
        code = (await in_thread(docker_client.api.exec_inspect, res["Id"]))["ExitCode"]
        assert code != 0 and b"readonly" in out.replace(b"-", b"").lower(), out
        # ... nor replace it (the read-only file is a mount point), nor write the rootfs.
        for cmd in (["sh", "-c", "rm -f /workspace/inbound.db"],
                    ["sh", "-c", "mv /workspace/inbound.db /workspace/x"],
                    ["sh", "-c", "touch /etc/owned"]):
            res = await in_thread(lambda: docker_client.api.exec_create(handle.ident, cmd))
            await in_thread(docker_client.api.exec_start, res["Id"])
            info = await in_thread(docker_client.api.exec_inspect, res["Id"])
            assert info["ExitCode"] != 0, cmd
        assert (folder / "inbound.db").is_file()
        with ro_db(folder / "inbound.db") as conn:
            assert set(conn.execute("SELECT status FROM messages_in").fetchall()) == {("pending",)}
        await rt.stop("s1", grace=5)
        assert exits == [AgentExit("g1", "s1", exits[0].exit_code, "stopped")]
        assert not rt.is_running("s1") and labelled(docker_client, instance) == []
    finally:
        await rt.close()


@pytest.mark.docker
async def test_agent_wakes_on_a_host_write_through_the_read_only_mount(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    """inotify in the container sees the host's commits to inbound.db, which is
    bind-mounted read-only on top of the folder: the agent's only other ways to
    notice (its poll, its safety poll) are set to 10 minutes, and it must not start
    without inotify (--wake inotify)."""
    folder = make_session(tmp_path, "g1", "s1")
    command = AGENT + ["--wake", "inotify", "--safety-poll", "600", "--poll-interval", "600"]

    def replies() -> list[tuple]:
        with ro_db(folder / "outbound.db") as conn:
            return conn.execute("SELECT in_reply_to FROM messages_out ORDER BY seq").fetchall()

    rt, _exits = make_runtime(tmp_path, instance, agent_image, command=command)
    try:
        handle = await rt.start(SessionRef("g1", "s1", folder))
        # .heartbeat: the agent is up (the first message may still be found by its
        # first read; the later ones, sent after a reply, only inotify can report)
        await until(lambda: (folder / ".heartbeat").is_file(), 30, "agent started")
        await until(lambda: b"waking on" in docker_client.api.logs(handle.ident), 30,
                    "the agent's start-up line")
        logs = await in_thread(lambda: docker_client.api.logs(handle.ident))
        assert b"waking on inotify" in logs, logs
        for n, mid in enumerate(("m2", "m4", "m6"), start=1):
            t0 = time.monotonic()
            insert_message(folder, mid, f"hello {n}")  # the host's write, host side
            await until(lambda: len(replies()) == n, 20, f"reply {n} (woken by inotify)")
            assert time.monotonic() - t0 < 20  # a poll would have taken 600 s
        assert replies() == [("m2",), ("m4",), ("m6",)]
        await rt.stop("s1", grace=5)
    finally:
        await rt.close()


@pytest.mark.docker
async def test_docker_kill_reports_killed_quickly(tmp_path: Path, docker_client: docker.DockerClient,
                                            agent_image: str, instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    marker = make_session(tmp_path, "g1", "s2")

    rt, exits = make_runtime(tmp_path, instance, agent_image)
    try:
        handle = await rt.start(SessionRef("g1", "s1", folder))
        await until(lambda: rt.events_connected, 10, "event stream connected")
        await in_thread(docker_client.api.kill, handle.ident)
        t0 = time.monotonic()
        await until(lambda: exits, 2.0, "on_exit after docker kill")
        assert time.monotonic() - t0 < 2.0
        assert exits == [AgentExit("g1", "s1", 137, "killed")]
        assert not rt.is_running("s1") and rt.running() == []
        await until(lambda: not labelled(docker_client, instance), 10, "container removed")
        # a late duplicate (die vs kill vs destroy) would come before any later event of
        # the same stream: kill a second agent and wait for its exit to come through
        second = await rt.start(SessionRef("g1", "s2", marker))
        await in_thread(docker_client.api.kill, second.ident)
        await until(lambda: any(e.session_id == "s2" for e in exits), 10, "the later exit")
        assert [e.session_id for e in exits] == ["s1", "s2"]
    finally:
        await rt.close()


@pytest.mark.docker
def test_exit_and_runtime_kill(tmp_path: Path, docker_client: docker.DockerClient,
                               agent_image: str, instance: str) -> None:
    """An agent exiting by itself reports 'exited' with its code; kill() reports 'killed'.

    Two runtimes, so each is its own orchestrator instance: one label each. (Sharing
    one, either may adopt the other's container in a reconcile, as it should.)"""
    idle = make_session(tmp_path, "g1", "idle")
    busy = make_session(tmp_path, "g1", "busy")
    idle_instance = f"{instance}i"

    async def main() -> None:
        rt_idle, exits_idle = make_runtime(tmp_path, idle_instance, agent_image,
                                           command=AGENT + ["--exit-when-idle", "0.3"])
        rt, exits = make_runtime(tmp_path, instance, agent_image)
        try:
            await rt_idle.start(SessionRef("g1", "idle", idle))
            await until(lambda: exits_idle, 20, "self-exit reported")
            assert exits_idle == [AgentExit("g1", "idle", 0, "exited")]
            await rt.start(SessionRef("g1", "busy", busy))
            await rt.kill("busy")
            assert exits == [AgentExit("g1", "busy", 137, "killed")]
            assert labelled(docker_client, instance, session="busy") == []
            await rt.kill("busy")  # absent = done
            await rt.stop("busy", grace=1)
            assert len(exits) == 1
            await until(lambda: not labelled(docker_client, instance)
                        and not labelled(docker_client, idle_instance), 10, "all removed")
        finally:
            await rt_idle.close()
            await rt.close()

    try:
        asyncio.run(main())
    finally:
        remove_labelled(docker_client, f"{LABEL_INSTANCE}={idle_instance}")


@pytest.mark.docker
async def test_reconcile_reports_exits_the_event_stream_missed(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")

    rt, exits = make_runtime(tmp_path, instance, agent_image)
    try:
        handle = await rt.start(SessionRef("g1", "s1", folder))
        await rt._stop_events()  # deaf: as if the stream had dropped
        await in_thread(docker_client.api.kill, handle.ident)
        await in_thread(docker_client.api.wait, handle.ident)
        assert exits == [] and rt.is_running("s1")  # nobody told it yet
        await rt.reconcile()
        assert exits == [AgentExit("g1", "s1", 137, "killed")] and not rt.is_running("s1")
        await until(lambda: not labelled(docker_client, instance), 10, "container removed")
        await rt.reconcile()
        assert len(exits) == 1
    finally:
        await rt.close()


@pytest.mark.docker
def test_recover_adopts_running_and_removes_exited(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    live = make_session(tmp_path, "g1", "live")

    async def first_life() -> str:
        rt, _ = make_runtime(tmp_path, instance, agent_image)
        handle = await rt.start(SessionRef("g1", "live", live))
        await rt.close()  # the orchestrator goes away; its container stays
        return handle.ident

    ident = asyncio.run(first_life())
    # A dead container of ours from the previous life (its exit was never handled).
    dead = docker_client.containers.run(
        agent_image, ["python3", "-c", "raise SystemExit(3)"], detach=True, network_mode="none",
        name=f"orch-{instance}-g1-dead", labels={LABEL_INSTANCE: instance, LABEL_GROUP: "g1",
                                                 LABEL_SESSION: "dead"})
    assert dead.wait(timeout=30)["StatusCode"] == 3

    async def second_life() -> None:
        rt, exits = make_runtime(tmp_path, instance, agent_image)
        try:
            adopted = await rt.recover()
            assert [(h.session_id, h.ident, h.adopted) for h in adopted] == [("live", ident, True)]
            assert rt.is_running("live") and not rt.is_running("dead")
            assert [c.id for c in labelled(docker_client, instance)] == [ident]
            again = await rt.start(SessionRef("g1", "live", live))  # no second container
            assert again.ident == ident
            assert len(labelled(docker_client, instance, session="live")) == 1
            # An adopted container's exit is reported like any other.
            await until(lambda: rt.events_connected, 10, "event stream connected")
            await in_thread(docker_client.api.kill, ident)
            await until(lambda: exits, 5, "adopted container's exit")
            assert exits == [AgentExit("g1", "live", 137, "killed")]
        finally:
            await rt.close()

    asyncio.run(second_life())


@pytest.mark.docker
def test_reconcile_adopts_a_live_container_that_recover_could_not_list(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    """Restarted while the daemon did not answer, the runtime never ran ``recover``:
    the reconcile that follows the event stream's connection (or a sweep) adopts
    the container, and until a list succeeded ``listed`` says the runtime cannot
    tell "not running" from "unknown"."""
    live = make_session(tmp_path, "g1", "live")

    async def first_life() -> str:
        rt, _ = make_runtime(tmp_path, instance, agent_image)
        handle = await rt.start(SessionRef("g1", "live", live))
        await rt.close()
        return handle.ident

    ident = asyncio.run(first_life())

    async def second_life() -> None:
        rt, exits = make_runtime(tmp_path, instance, agent_image)
        try:
            assert not rt.listed and not rt.is_running("live")
            await rt.reconcile()
            assert rt.listed and rt.is_running("live")
            assert [(h.session_id, h.ident, h.adopted) for h in rt.running()] == [
                ("live", ident, True)]
            await rt.reconcile()  # idempotent
            assert len(rt.running()) == 1 and exits == []
        finally:
            await rt.close()

    asyncio.run(second_life())


@pytest.mark.docker
def test_foreign_containers_are_never_touched(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    keep = ["python3", "-c", "import time; time.sleep(600)"]
    tag = f"foreign-{uuid.uuid4().hex[:8]}"
    # Same name our runtime would use, no label at all; and one of a neighbouring instance
    # (same session label), dead; both must survive everything below.
    unlabelled = docker_client.containers.run(
        agent_image, keep, detach=True, network_mode="none", name=f"orch-{instance}-g1-s1",
        labels={"test.cleanup": tag})
    neighbour = docker_client.containers.create(
        agent_image, keep, network_mode="none", name=f"orch-{instance}x-g1-s1",
        labels={"test.cleanup": tag, LABEL_INSTANCE: instance + "x", LABEL_GROUP: "g1",
                LABEL_SESSION: "s1"})
    try:
        async def main() -> None:
            rt, exits = make_runtime(tmp_path, instance, agent_image)
            try:
                assert await rt.recover() == []
                await rt.stop("s1", grace=1)
                await rt.kill("s1")
                with pytest.raises(RuntimeUnavailable, match="does not own"):
                    await rt.start(SessionRef("g1", "s1", folder))
                assert exits == [] and not rt.is_running("s1")
            finally:
                await rt.close()

        asyncio.run(main())
        unlabelled.reload()
        neighbour.reload()
        assert unlabelled.status == "running" and neighbour.status == "created"
    finally:
        remove_labelled(docker_client, f"test.cleanup={tag}")


@pytest.mark.docker
async def test_unavailable_cases_are_one_line_and_create_nothing(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")

    rt, _ = make_runtime(tmp_path, instance, "orchestrator-agent:does-not-exist")
    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
    try:
        with pytest.raises(RuntimeUnavailable, match="run `orchestrator image build`") as e:
            await rt.start(SessionRef("g1", "s1", folder))
        assert "\n" not in str(e.value) and e.value.reported  # logged here, once
        other = make_session(tmp_path, "g1", "s2")
        with pytest.raises(RuntimeUnavailable, match="run `orchestrator image build`"):
            await rt.start(SessionRef("g1", "s2", other))  # a second session, same image
        assert errors == [str(e.value)]
    finally:
        logger.remove(sink)
        await rt.close()
    rt, _ = make_runtime(tmp_path, instance, agent_image,
                         base_url=f"unix://{tmp_path}/no-daemon.sock")
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeUnavailable, match="unreachable at .*no-daemon.sock.*"
                                                     r"start it or set \[docker\] base_url"):
            await rt.start(SessionRef("g1", "s1", folder))
        assert time.monotonic() - t0 < 5
    finally:
        await rt.close()
    rt, _ = make_runtime(tmp_path, instance, agent_image,
                         mounts=(f"{tmp_path}:/data",), allowed_mounts=("/nonexistent",))
    try:
        with pytest.raises(MountNotAllowed):
            await rt.start(SessionRef("g1", "s1", folder))
    finally:
        await rt.close()
    assert labelled(docker_client, instance) == []


@pytest.mark.docker
def test_allowed_extra_mount_is_applied(tmp_path: Path, docker_client: docker.DockerClient,
                                        agent_image: str, instance: str) -> None:
    data = tmp_path / "data"
    folder = make_session(data, "g1", "s1")
    shared = tmp_path / "shared" / "models"
    shared.mkdir(parents=True)

    async def main() -> dict:
        rt, _ = make_runtime(data, instance, agent_image, mounts=(f"{shared}:/models:ro",),
                             allowed_mounts=(str(tmp_path / "shared"),))
        try:
            handle = await rt.start(SessionRef("g1", "s1", folder))
            return await in_thread(docker_client.api.inspect_container, handle.ident)
        finally:
            await rt.close()

    mounts = {m["Destination"]: m for m in asyncio.run(main())["Mounts"]}
    assert mounts["/models"]["Source"] == str(shared) and mounts["/models"]["RW"] is False


@pytest.mark.docker
async def test_daemon_restart(tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
                        private_dockerd: PrivateDockerd) -> None:
    """Daemon stops: start raises RuntimeUnavailable, the running agent's end is reported
    after the event stream reconnects, and start works again — without a new runtime."""
    private_dockerd.load_image(docker_client, agent_image)
    instance = f"t{uuid.uuid4().hex[:10]}"
    one = make_session(tmp_path, "g1", "one")
    two = make_session(tmp_path, "g1", "two")

    rt, exits = make_runtime(tmp_path, instance, agent_image,
                             base_url=private_dockerd.base_url)
    available: list[int] = []  # event_connects at each "available" call
    rt.on_available = lambda: available.append(rt.event_connects)
    try:
        await rt.start(SessionRef("g1", "one", one))
        await until(lambda: rt.events_connected, 10, "event stream connected")
        connects = rt.event_connects
        await in_thread(private_dockerd.stop)
        await until(lambda: not rt.events_connected, 10, "event stream noticed the stop")
        with pytest.raises(RuntimeUnavailable, match="unreachable"):
            await rt.start(SessionRef("g1", "two", two))
        assert not rt.is_running("two")
        await in_thread(private_dockerd.start)
        # The stream comes back by itself (backoff is capped at 5 s) and reconciles:
        # the daemon stopped 'one' while nobody listened.
        await until(lambda: rt.event_connects > connects, 15, "event stream reconnected")
        # ... and tells the supervisor, after the reconcile, that it can start again
        await until(lambda: available and available[-1] > connects, 10, "on_available")
        await until(lambda: exits, 10, "exit of the container stopped with the daemon")
        assert [(e.session_id, e.reason in ("exited", "stopped", "killed")) for e in exits] \
            == [("one", True)]
        assert not rt.is_running("one")
        handle = await rt.start(SessionRef("g1", "two", two))
        assert rt.is_running("two")
        await rt.kill("two")
        assert exits[-1] == AgentExit("g1", "two", 137, "killed")
        client = private_dockerd.client()
        try:
            await until(lambda: not client.containers.list(
                all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"}), 10,
                "dead containers removed after the restart")
        finally:
            client.close()
        assert handle.ident
    finally:
        await rt.close()


# --- the container phase (no engine needed) ----------------------------------------------

_ALL_PHASES = list(Phase)
_ALLOWED = {(Phase.STARTING, Phase.RUNNING), (Phase.STARTING, Phase.DONE),
            (Phase.RUNNING, Phase.STOPPING), (Phase.RUNNING, Phase.KILLING),
            (Phase.RUNNING, Phase.DONE), (Phase.STOPPING, Phase.DONE),
            (Phase.KILLING, Phase.STOPPING), (Phase.KILLING, Phase.DONE)}


@pytest.mark.parametrize("start", _ALL_PHASES)
@pytest.mark.parametrize("to", _ALL_PHASES)
def test_a_container_phase_moves_only_where_it_may(start: Phase, to: Phase) -> None:
    t = Tracked(AgentHandle("g", "s", "c"), "c", "n", start)
    moved = t.move(to)
    assert moved == ((start, to) in _ALLOWED)
    assert t.phase is (to if moved else start)


@pytest.mark.parametrize("steps, code, oom, signal_, reason, live", [
    ([], 0, False, None, "exited", True),
    ([], 137, False, None, "killed", True),
    ([], 1, True, None, "oom", True),
    ([], 0, False, "SIGTERM", "stopped", True),
    ([Phase.STOPPING], 143, False, None, "stopped", True),
    ([Phase.KILLING], 137, False, None, "killed", True),
    ([Phase.STOPPING, Phase.KILLING], 137, False, None, "stopped", True),  # a stop's reason wins
    ([Phase.KILLING, Phase.STOPPING], 137, False, None, "stopped", True),
    ([Phase.KILLING], 137, True, None, "killed", True),  # we killed it: not an oom
    ([Phase.DONE], 0, False, None, "exited", False),
])
def test_a_container_exit_reason_follows_its_phase(steps, code, oom, signal_, reason,
                                                   live) -> None:
    t = Tracked(AgentHandle("g", "s", "c"), "c", "n", oom=oom, kill_signal=signal_)
    for step in steps:
        t.move(step)
    assert t.exit_reason(code) == reason
    assert t.live is live and t.done is (not live)


def test_a_starting_container_is_not_running_yet() -> None:
    t = Tracked(AgentHandle("g", "s", "c"), "c", "n", Phase.STARTING)
    assert not t.live and not t.done
    assert t.move(Phase.DONE) and not t.move(Phase.RUNNING)  # ended before start() returned


@pytest.mark.parametrize("status, explanation, kind", [
    (409, 'Conflict. The container name "/x" is already in use by container "abc"', Conflict),
    (409, "some other conflict, worded anyhow", Conflict),
    (500, "Conflict in the text alone is not a conflict", RuntimeUnavailable),
    (400, "bad parameter", RuntimeUnavailable),
])
def test_translate_types_a_409_as_a_conflict(status: int, explanation: str, kind) -> None:
    response = requests.Response()
    response.status_code = status
    exc = docker.errors.APIError("boom", response=response, explanation=explanation)
    translated = DockerExec().translate("create", exc)
    assert type(translated) is kind
    assert str(translated) == f"docker create failed: {explanation}"


@pytest.mark.parametrize("asked, events, code, reason", [
    (None, [], "0", "exited"),
    (None, [("oom", {})], "137", "oom"),
    (None, [("kill", {"signal": "15"})], "143", "stopped"),
    (Phase.STOPPING, [], "143", "stopped"),
    (Phase.KILLING, [("kill", {"signal": "9"})], "137", "killed"),
])
def test_a_die_event_reports_the_exit_once_by_phase(tmp_path: Path, asked, events, code,
                                                    reason) -> None:
    """The event path alone (no engine): what we asked for and what Docker said decide
    the reason; a second ``die`` for the same container reports nothing."""
    rt, exits = make_runtime(tmp_path, "inst", "img")
    t = Tracked(AgentHandle("g", "s", "cid"), "cid", "n")
    if asked is not None:
        t.move(asked)
    rt._track(t)
    attrs = {LABEL_INSTANCE: "inst"}
    for action, extra in events + [("die", {"exitCode": code}), ("die", {"exitCode": code})]:
        if asked is None and action == "die":  # a self-exit removes its container: a task
            rt._spawn = lambda coro: coro.close()  # type: ignore[method-assign]
        rt._on_event({"Action": action, "Actor": {"ID": "cid", "Attributes": {**attrs, **extra}}})
    assert exits == [AgentExit("g", "s", int(code), reason)]
    assert t.done and not rt.is_running("s")
