"""The local runtime on real processes: start, stop (TERM then KILL), kill, exit
callbacks with codes, and adoption after a restart from the pid file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.contract.layout import OUTBOUND_DB, PID_FILE
from orchestrator.host.sessions import create_folder
from orchestrator.runtime.base import AgentExit, RuntimeUnavailable, SessionRef
from orchestrator.runtime.local.procs import (
    MARKER,
    TOKEN,
    StartRecords,
    marker,
    process_start_time,
)
from orchestrator.runtime.local.runtime import (
    AGENT_MAIN,
    PACKAGE_ROOT,
    LocalRuntime,
    quick_start,
    read_pid_file,
)
from tests.support.docker_fixtures import insert_message
from tests.support.e2e import AGENT, make_config, run
from tests.support.helpers import query, until, wait_for

# ignores SIGTERM (so do its children), and says so in ./trapped once it does
IGNORES_TERM = ["/bin/sh", "-c", "trap '' TERM; : > trapped; while :; do sleep 0.05; done", "sh"]


class Exits:
    """Collects exit callbacks; ``wait`` awaits the next one with a deadline."""

    def __init__(self) -> None:
        self.seen: list[AgentExit] = []
        self._event: asyncio.Event | None = None

    def __call__(self, ev: AgentExit) -> None:
        self.seen.append(ev)
        if self._event is not None:
            self._event.set()

    async def wait(self, count: int = 1, timeout: float = 15.0) -> AgentExit:
        await until(lambda: len(self.seen) >= count, timeout=timeout, message="exit callback")
        return self.seen[count - 1]


def setup(tmp_path: Path, command: list[str] = AGENT, group: str = "grp",
          sid: str = "sess-1") -> tuple[LocalRuntime, Exits, SessionRef]:
    cfg = make_config(tmp_path, command=command)
    paths = create_folder(cfg.data_dir, group, sid)
    exits = Exits()
    return LocalRuntime(cfg.runtime, cfg.data_dir, exits), exits, SessionRef(group, sid,
                                                                             paths.root)


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in process group ``pgid``?"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


async def test_start_writes_pid_file_and_stop_is_polite(tmp_path: Path, reap_agents) -> None:
    runtime, exits, ref = setup(tmp_path)

    handle = await runtime.start(ref)
    pid = int(handle.ident)
    assert group_alive(pid)
    assert (handle.session_id, handle.adopted) == ("sess-1", False)
    assert runtime.is_running("sess-1") and runtime.running() == [handle]
    assert read_pid_file(ref.folder / PID_FILE) == (pid, process_start_time(pid))
    assert os.getpgid(pid) == pid  # its own process group: stop/kill reach its children
    assert await runtime.start(ref) == handle  # starting twice does not double it
    # the agent's log goes to <data_dir>/logs/<group>/<session>/run-<N>.log
    await until(lambda: (ref.folder / ".heartbeat").exists(), message="agent up")
    await runtime.stop("sess-1", grace=5)
    ev = await exits.wait()
    assert ev == AgentExit("grp", "sess-1", 0, "stopped")
    assert not runtime.is_running("sess-1") and runtime.running() == []
    assert not (ref.folder / PID_FILE).exists()
    log = runtime.data_dir / "logs" / "grp" / "sess-1" / "run-1.log"
    assert "stopping on signal" in log.read_text()
    await runtime.stop("sess-1", grace=5)  # absent = done
    await runtime.kill("sess-1")
    assert len(exits.seen) == 1
    await runtime.close()


async def test_stop_escalates_to_sigkill_after_grace(tmp_path: Path, reap_agents) -> None:
    runtime, exits, ref = setup(tmp_path, command=IGNORES_TERM)

    handle = await runtime.start(ref)
    pid = int(handle.ident)
    await until(lambda: (ref.folder / "trapped").exists(), message="TERM trapped")
    grace = 0.5
    started = time.monotonic()
    await runtime.stop("sess-1", grace=grace)
    elapsed = time.monotonic() - started
    ev = await exits.wait()
    assert elapsed >= grace
    assert ev == AgentExit("grp", "sess-1", -signal.SIGKILL, "killed")
    # the whole group, the shell's children too
    await until(lambda: not group_alive(pid), timeout=5, message="process group gone")
    assert not (ref.folder / PID_FILE).exists()
    await runtime.close()


async def test_kill_is_immediate(tmp_path: Path, reap_agents) -> None:
    runtime, exits, ref = setup(tmp_path, command=IGNORES_TERM)

    handle = await runtime.start(ref)
    await runtime.kill("sess-1")
    ev = await exits.wait()
    assert ev == AgentExit("grp", "sess-1", -signal.SIGKILL, "killed")
    await until(lambda: not group_alive(int(handle.ident)), timeout=5,
                message="process group gone")
    await runtime.close()


@pytest.mark.parametrize(("script", "code", "reason"), [
    ("exit 7", 7, "exited"),
    ("exit 0", 0, "exited"),
    ("kill -KILL $$", -signal.SIGKILL, "killed by signal 9"),
])
async def test_exit_callback_carries_the_code(tmp_path: Path, script: str, code: int,
                                        reason: str) -> None:
    runtime, exits, ref = setup(tmp_path, command=["/bin/sh", "-c", script, "sh"])

    await runtime.start(ref)
    ev = await exits.wait()
    assert ev == AgentExit("grp", "sess-1", code, reason)
    assert not runtime.is_running("sess-1")
    assert not (ref.folder / PID_FILE).exists()
    await runtime.close()


PY = sys.executable
FAST = [PY, "-S", "-P", AGENT_MAIN]


@pytest.mark.parametrize("configured,group_path,cmd,path", [
    (("{python}", "-m", "orchestrator.agent"), None, FAST, PACKAGE_ROOT),
    (("{python}", "-m", "orchestrator.agent", "--wake", "poll"), "/g/lib",
     FAST + ["--wake", "poll"], PACKAGE_ROOT + os.pathsep + "/g/lib"),
    (("python3", "-m", "orchestrator.agent"), "/g/lib", ["python3", "-m", "orchestrator.agent"],
     "/g/lib"),  # another interpreter: its own site-packages may be what makes it work
    (("{python}", "-m", "orchestrator.agentx"), None, [PY, "-m", "orchestrator.agentx"], None),
    (("{python}", "my_agent.py", "-m", "orchestrator.agent"), None,
     [PY, "my_agent.py", "-m", "orchestrator.agent"], None),
])
def test_quick_start_only_rewrites_the_reference_agent(configured: tuple, group_path: str | None,
                                                      cmd: list[str], path: str | None) -> None:
    expanded = [PY if part == "{python}" else part for part in configured]
    env = {"HOME": "/h"} | ({"PYTHONPATH": group_path} if group_path else {})
    got_cmd, got_env = quick_start(configured, expanded + ["--workspace", "/w"], env)
    assert got_cmd == cmd + ["--workspace", "/w"]
    assert got_env.get("PYTHONPATH") == path
    assert got_env["HOME"] == "/h"


async def test_reference_agent_starts_without_site_and_ignores_its_folder(
        tmp_path: Path, reap_agents) -> None:
    """The quick start (-S -P, PYTHONPATH) runs the real agent, which answers; an
    ``orchestrator`` package planted in the session folder (the agent's cwd) is not
    what it imports."""
    runtime, exits, ref = setup(tmp_path)
    planted = ref.folder / "orchestrator"
    planted.mkdir()
    (planted / "__init__.py").write_text("open('planted-ran', 'w').close()\nraise SystemExit(9)\n")
    insert_message(ref.folder, "m2", "hello")

    handle = await runtime.start(ref)
    # it runs from the package, or from the data dir's compiled copy (bytecode.prepare)
    code = runtime.bytecode.root if runtime.bytecode and runtime.bytecode.root else PACKAGE_ROOT
    fast = [PY, "-S", "-P", os.path.join(code, "orchestrator", "agent", "__main__.py")]
    # Popen returns once exec has begun; the new image's arguments are in place a
    # moment later (an empty cmdline until then)
    cmdline = Path(f"/proc/{handle.ident}/cmdline")
    await until(lambda: cmdline.read_bytes(), 10, "the agent's command line")
    assert cmdline.read_bytes().split(b"\0")[:4] == [os.fsencode(part) for part in fast]
    await until(lambda: query(ref.folder / OUTBOUND_DB,
                              "SELECT 1 FROM messages_out WHERE in_reply_to = 'm2'"), 20, "reply")
    assert not (ref.folder / "planted-ran").exists()
    await runtime.stop("sess-1", 10)
    assert (await exits.wait()).exit_code == 0
    await runtime.close()


async def test_missing_command_is_runtime_unavailable(tmp_path: Path) -> None:
    runtime, exits, ref = setup(tmp_path, command=[str(tmp_path / "no-such-agent")])

    with pytest.raises(RuntimeUnavailable, match="no-such-agent"):
        await runtime.start(ref)
    assert not runtime.is_running("sess-1")
    await runtime.close()


async def test_recover_adopts_a_live_agent_from_its_pid_file(tmp_path: Path, reap_agents) -> None:
    first, first_exits, ref = setup(tmp_path)
    other, _, other_ref = setup(tmp_path, sid="sess-2")

    handle = await first.start(ref)
    await until(lambda: (ref.folder / ".heartbeat").exists(), message="agent up")
    await first.close()  # the orchestrator goes away; the agent does not

    second_exits = Exits()
    second = LocalRuntime(first.cfg, first.data_dir, second_exits)
    adopted = await second.recover()
    assert [(h.session_id, h.ident, h.adopted) for h in adopted] == [
        ("sess-1", handle.ident, True)]
    assert second.is_running("sess-1")
    assert not second.is_running("sess-2")
    # an adopted agent is watched like our own: stop it, get its exit
    await second.stop("sess-1", grace=5)
    ev = await second_exits.wait()
    assert (ev.session_id, ev.reason) == ("sess-1", "stopped")
    assert not (ref.folder / PID_FILE).exists()
    assert first_exits.seen == []
    await second.close()


def test_recover_never_trusts_a_pid_file(tmp_path: Path) -> None:
    """A session folder is its agent's to write: a pid file naming a live process of
    ours — with its real start time, so it would pass any check of the file — or a dead
    one, or junk, adopts nothing and signals nothing."""
    runtime, exits, ref = setup(tmp_path)
    _, _, dead_ref = setup(tmp_path, sid="sess-dead")
    _, _, junk_ref = setup(tmp_path, sid="sess-junk")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        real_start = process_start_time(bystander.pid)
        assert real_start is not None
        (ref.folder / PID_FILE).write_text(f"{bystander.pid} {real_start}\n")
        gone = subprocess.Popen(["/bin/true"])
        gone.wait()
        (dead_ref.folder / PID_FILE).write_text(f"{gone.pid} 1\n")
        (junk_ref.folder / PID_FILE).write_text("not a pid file")

        async def body() -> None:
            assert await runtime.recover() == []
            assert runtime.running() == []
            await runtime.close()

        run(body())
        assert bystander.poll() is None  # never signalled
        assert exits.seen == []
    finally:
        bystander.kill()
        bystander.wait()


def test_an_agent_whose_pid_file_was_never_written_is_adopted(tmp_path: Path) -> None:
    """The host SIGKILLed between the spawn and the pid file: the agent is found by the
    marker in its environment and adopted (not doubled by a second start); its pid
    file is written then."""
    runtime, exits, ref = setup(tmp_path)
    token = StartRecords(runtime.data_dir).begin(ref.agent_group, ref.session_id)  # before spawn
    env = {**os.environ, MARKER: marker(runtime.data_dir, ref.agent_group, ref.session_id),
           TOKEN: token}
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    child_of_other = subprocess.Popen(  # the marker of another data dir: not ours
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, MARKER: marker(tmp_path / "elsewhere", "g", "s")})
    traversing = subprocess.Popen(  # a marker naming no session folder: never followed
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, MARKER: marker(runtime.data_dir, "..", "..")})
    try:
        until_found = wait_for(lambda: process_start_time(orphan.pid), message="orphan up")
        assert until_found and not (ref.folder / PID_FILE).exists()

        async def body() -> None:
            [handle] = await runtime.recover()
            assert (handle.session_id, handle.adopted, handle.ident) == (
                ref.session_id, True, str(orphan.pid))
            assert read_pid_file(ref.folder / PID_FILE) == (orphan.pid,
                                                            process_start_time(orphan.pid))
            await runtime.stop(ref.session_id, grace=5)
            assert (await exits.wait()).reason == "stopped"
            await runtime.close()

        run(body())
        assert orphan.wait(5) is not None and child_of_other.poll() is None
        assert traversing.poll() is None
    finally:
        for p in (orphan, child_of_other, traversing):
            p.kill()
            p.wait()


def test_a_process_forging_another_sessions_marker_is_never_adopted(tmp_path: Path) -> None:
    """An agent's child that calls setsid and sets another session's marker (with its
    own token, or none) is left alone after a restart: only the token the host recorded
    for a session makes a process that session's agent. The real agent is adopted."""
    runtime, exits, ref = setup(tmp_path)
    group = ref.agent_group
    create_folder(runtime.data_dir, group, "other")
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = []

    async def body() -> None:
        handle = await runtime.start(ref)  # the real agent of ref, with its own token
        with open(f"/proc/{handle.ident}/environ", "rb") as fh:
            env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        own_token = env[TOKEN.encode()].decode()
        other_token = StartRecords(runtime.data_dir).begin(group, "other")  # other's start...
        # ...forged by ref's child (the last forgery differs in its last digit: "0"
        # when the real token ended in another one, else "1")
        forged = other_token[:-1] + ("1" if other_token.endswith("0") else "0")
        for token in (own_token, "", forged):
            procs.append(subprocess.Popen(sleep, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env={
                **os.environ, MARKER: marker(runtime.data_dir, group, "other"), TOKEN: token}))
        wait_for(lambda: all(process_start_time(p.pid) for p in procs), message="forgers up")
        await runtime.close()  # the host goes away, leaving agents running

        again = LocalRuntime(runtime.cfg, runtime.data_dir, exits)
        adopted = await again.recover()
        assert [(h.session_id, h.ident) for h in adopted] == [(ref.session_id, handle.ident)]
        await again.kill(ref.session_id)
        await again.close()

    try:
        run(body())
        assert all(p.poll() is None for p in procs)  # never signalled
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_link_in_place_of_the_pid_file_is_never_written_through(tmp_path: Path) -> None:
    runtime, exits, ref = setup(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (ref.folder / f"{PID_FILE}.tmp").symlink_to(outside)
    (ref.folder / PID_FILE).symlink_to(outside)

    async def body() -> None:
        handle = await runtime.start(ref)
        assert read_pid_file(ref.folder / PID_FILE)[0] == int(handle.ident)
        await runtime.kill(ref.session_id)
        await exits.wait()
        await runtime.close()

    run(body())
    assert outside.read_text() == "keep me"


def test_process_start_time_and_pid_file_parsing(tmp_path: Path) -> None:
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(os.getpid()) == process_start_time(os.getpid())
    assert process_start_time(2 ** 22 + 12345) is None
    pid_file = tmp_path / PID_FILE
    pid_file.write_text("123 456\n")
    assert read_pid_file(pid_file) == (123, "456")
    for bad in ("", "123", "abc 456", "1 2 3"):
        pid_file.write_text(bad)
        assert read_pid_file(pid_file) is None
    assert read_pid_file(tmp_path / "missing") is None


FLOOR_SCRIPT = '''
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from orchestrator.runtime.local.runtime import own_rss
block = bytearray(300 * 1024 * 1024)
for i in range(0, len(block), 4096):  # resident, then given back: size small, mark high
    block[i] = 1
del block
floor = own_rss()
child = subprocess.Popen(["/bin/true"])
_pid, _status, ru = os.wait4(child.pid, 0)
print(floor, ru.ru_maxrss * 1024)
'''


def test_the_peak_floor_is_the_high_water_mark_a_child_inherits() -> None:
    """A forked agent's ru_maxrss starts at its parent's high-water size (the kernel
    copies it with the memory map and keeps it across exec), not at the parent's size
    now: the floor under which a peak says nothing about the agent is that mark. With
    the size now (300 MB allocated and freed first) a do-nothing child would show ~300 MB
    of 'its own' peak."""
    out = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, str(Path(__file__).parents[2])],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    floor, child = (int(v) for v in out.split())
    assert floor >= 300 * 1024 * 1024, floor
    assert child <= floor, (floor, child)
