"""Local runtime: each agent is a process group on this host (dev runner, tests).

Exits are noticed through a pidfd registered with the event loop — no thread per
process and no polling — which also works for agents *adopted* after a restart
(they are no longer our children, so ``waitpid`` cannot see them). Which processes
are ours is read from /proc (``local_procs``: a marker in each agent's environment),
never from a file an agent can write.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from orchestrator.config.groups import read_env
from orchestrator.config.sections import RuntimeConfig
from orchestrator.contract.layout import PID_FILE, session_paths
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.host.safefs import SessionDir
from orchestrator.host.uids import give_folder, open_uids
from orchestrator.runtime.base import (
    AgentExit,
    AgentHandle,
    ExitCallback,
    RuntimeUnavailable,
    SessionRef,
    Usage,
)
from orchestrator.runtime.local.bytecode import Bytecode
from orchestrator.runtime.local.bytecode import prepare as prepare_bytecode
from orchestrator.runtime.local.procs import (
    MARKER,
    TOKEN,
    StartRecords,
    marked_agents,
    marker,
    process_stopped,
    write_pid_file,
)


def read_pid_file(path: Path) -> tuple[int, str] | None:
    """(pid, start time) from a ``.agent.pid`` (for people and tests; the host itself
    never trusts one: see ``local_procs``)."""
    try:
        pid_text, start = path.read_text().split()
        return int(pid_text), start
    except (OSError, ValueError):
        return None


REFERENCE_AGENT = ("{python}", "-m", "orchestrator.agent")
# where ``orchestrator`` is importable from: the folder holding the package
PACKAGE_ROOT = str(Path(os.path.abspath(__file__)).parents[3])
AGENT_MAIN_REL = os.path.join("orchestrator", "agent", "__main__.py")
AGENT_MAIN = os.path.join(PACKAGE_ROOT, AGENT_MAIN_REL)


def build_command(cfg: RuntimeConfig, folder: Path) -> list[str]:
    cmd = [sys.executable if part == "{python}" else part for part in cfg.command]
    return cmd + ["--workspace", str(folder)]


def quick_start(configured: tuple[str, ...] | list[str], cmd: list[str],
                env: dict[str, str], bytecode: Bytecode | None = None
                ) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start the reference agent quickly.

    ``{python} -m orchestrator.agent ARGS`` becomes ``{python} -S -P
    <package>/orchestrator/agent/__main__.py ARGS`` with the package's folder first on
    PYTHONPATH. Why, in a cold start's milliseconds: ``-m`` runs ``runpy`` (importlib
    machinery, ~5 ms) where running the file does not; ``site`` (site-packages, every
    ``.pth`` file, an editable install's import finder) is 3-10 ms the stdlib-only
    agent has no use for. ``-P`` keeps the session folder (the agent's cwd, which the
    agent writes) off ``sys.path``, so nothing there can stand in for the agent's own
    modules. Any other command is left alone, and so is a group's PYTHONPATH (after ours).
    ``bytecode``: where the host compiled the agent's modules (``bytecode.prepare``: the
    package, or a copy in the data dir); the agent runs from there and never writes
    byte code itself.
    """
    if tuple(configured[:3]) != REFERENCE_AGENT:
        return cmd, env
    path = env.get("PYTHONPATH")
    root = bytecode.root if bytecode is not None and bytecode.root else PACKAGE_ROOT
    main = os.path.join(root, AGENT_MAIN_REL)
    return ([cmd[0], "-S", "-P", main, *cmd[3:]],
            {**env, **(bytecode.env() if bytecode is not None else {}),
             "PYTHONPATH": root + (os.pathsep + path if path else "")})


def own_rss() -> int:
    """This process's memory map's high-water resident size (``VmHWM``, bytes; 0 if
    /proc cannot say): what a child forked now inherits as the floor of its own
    ``ru_maxrss`` (the kernel copies the mark with the map and keeps it across
    ``exec``). Not the size now, which may be far smaller after a large allocation was
    freed; and not our own ``ru_maxrss``, which also holds the mark *our* parent passed
    us (a test runner's, say) and which no child of ours inherits."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wait(agent: "_Agent") -> tuple[int | None, Usage | None]:
    """Reap our own child with its resource usage (``wait4``): CPU seconds (user +
    system, its waited-for descendants included) and its peak resident memory (the
    largest of them). An adopted agent is not our child: no usage (None).

    The peak has a floor: a forked child starts as a copy of this process, and Linux
    carries this process's high-water resident size into the child's ``ru_maxrss``
    across its ``exec``. So a peak at or below that mark when it was spawned says
    nothing about the agent: it is recorded as unknown (None), a larger one is the
    agent's own."""
    assert agent.popen is not None
    try:
        _pid, status, ru = os.wait4(agent.pid, 0)
    except ChildProcessError:  # reaped elsewhere meanwhile: the code, if Popen has it
        return agent.popen.poll(), None
    code = os.waitstatus_to_exitcode(status)
    agent.popen.returncode = code  # (Popen would otherwise wait for it again)
    peak = ru.ru_maxrss * 1024  # Linux: KiB
    floor = agent.spawn_rss + SPAWN_RSS_MARGIN
    return code, Usage(cpu_seconds=round(ru.ru_utime + ru.ru_stime, 3),
                       peak_memory_bytes=peak if peak > floor else None)


SPAWN_RSS_MARGIN = 4 * 1024 * 1024  # our size may have grown a little before the fork


@dataclass
class _Agent:
    ref: SessionRef
    pid: int
    pidfd: int
    popen: subprocess.Popen | None
    adopted: bool
    exited: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    ending: str | None = None  # "stopped" | "killed" when we asked for it
    paused: bool = False  # SIGSTOPped by us (or found stopped when adopted)
    spawn_rss: int = 0  # our peak resident size when we spawned it (see ``_wait``)


class LocalRuntime:
    name = "local"
    listed = True  # /proc is always readable: nothing is ever unknown

    def __init__(self, cfg: RuntimeConfig, data_dir: Path, on_exit: ExitCallback, *,
                 uid_range: tuple[int, int] | None = None,
                 agent_logs: AgentLogs | None = None) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        # each run's stdout and stderr: logs/<group>/<session>/run-<N>.log (agent_logs)
        self.logs = agent_logs or AgentLogs(Path(data_dir))
        self.on_exit = on_exit
        self._agents: dict[str, _Agent] = {}
        self._uids = open_uids(Path(data_dir), uid_range)  # root and a range: one per session
        self._records = StartRecords(data_dir)
        # the reference agent's modules compiled now, not at each of its starts
        self.bytecode: Bytecode | None = None
        self._bytecode_tried = False
        if tuple(cfg.command[:3]) == REFERENCE_AGENT:
            self._agent_bytecode()

    def _agent_bytecode(self) -> Bytecode | None:
        """``bytecode.prepare``'s result, prepared once: when the runtime is built if its
        command is the reference agent, else at the first start of a group's that is."""
        if not self._bytecode_tried:
            self._bytecode_tried = True
            self.bytecode = prepare_bytecode(os.path.join(PACKAGE_ROOT, "orchestrator"),
                                             Path(self.data_dir),
                                             own_uid_agents=self._uids is None)
        return self.bytecode

    # --- bookkeeping ------------------------------------------------------------

    def is_running(self, session_id: str) -> bool:
        return session_id in self._agents

    def running(self) -> list[AgentHandle]:
        return [self._handle(a) for a in self._agents.values()]

    def is_paused(self, session_id: str) -> bool:
        agent = self._agents.get(session_id)
        return agent is not None and agent.paused

    @staticmethod
    def _handle(a: _Agent) -> AgentHandle:
        return AgentHandle(a.ref.agent_group, a.ref.session_id, str(a.pid), a.adopted)

    def _watch(self, ref: SessionRef, pid: int, popen: subprocess.Popen | None,
               adopted: bool) -> _Agent:
        pidfd = os.pidfd_open(pid)
        agent = _Agent(ref, pid, pidfd, popen, adopted)
        self._agents[ref.session_id] = agent
        asyncio.get_running_loop().add_reader(pidfd, self._reap, ref.session_id)
        return agent

    def _reap(self, session_id: str) -> None:
        agent = self._agents.pop(session_id, None)
        if agent is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(agent.pidfd)
        os.close(agent.pidfd)
        code, usage = _wait(agent) if agent.popen is not None else (None, None)
        if agent.ending:
            reason = agent.ending
        elif code is not None and code < 0:
            reason = f"killed by signal {-code}"
        else:
            reason = "exited"
        self._pid_file(agent.ref, None)
        self._records.end(agent.ref.agent_group, session_id)
        if not agent.exited.done():
            agent.exited.set_result(code)
        self.on_exit(AgentExit(agent.ref.agent_group, agent.ref.session_id, code, reason,
                               usage))

    # --- protocol ---------------------------------------------------------------

    async def recover(self) -> list[AgentHandle]:
        """Adopt the agents started for this data dir that outlived the last run: the
        process-group leaders carrying one of its sessions' markers (``local_procs``)."""
        adopted = []
        found = marked_agents(self.data_dir, self._records)
        for key in set(self._records.recorded()) - set(found):  # their agents are gone
            self._records.end(*key)
        for (group, session_id), pid in sorted(found.items()):
            ref = SessionRef(group, session_id, session_paths(self.data_dir, group,
                                                              session_id).root)
            try:
                agent = self._watch(ref, pid, None, adopted=True)
            except ProcessLookupError:
                continue
            agent.paused = process_stopped(pid)
            self._pid_file(ref, pid)
            logger.info("adopted agent pid {} of session {}{}", pid, session_id,
                        " (paused)" if agent.paused else "")
            adopted.append(self._handle(agent))
        return adopted

    def _pid_file(self, ref: SessionRef, pid: int | None) -> None:
        """Write (``pid``) or remove (None) the session's ``.agent.pid``, by descriptor."""
        try:
            with SessionDir(self.data_dir, ref.agent_group, ref.session_id) as folder:
                if pid is None:
                    folder.unlink(PID_FILE)
                else:
                    write_pid_file(folder, pid)
        except OSError as exc:  # a linked/removed folder, a full disk: the file is a nicety
            logger.debug("session {}: {} not {} ({})", ref.session_id, PID_FILE,
                         "removed" if pid is None else "written", exc)

    async def start(self, session: SessionRef) -> AgentHandle:
        if session.session_id in self._agents:
            return self._handle(self._agents[session.session_id])
        settings = session.settings
        runtime_cfg = settings.runtime if settings else self.cfg
        # group variables over ours; secret files are read now (SecretUnreadable: OSError)
        uid = self._uids.uid_for(session.session_id) if self._uids is not None else None
        if uid is not None:  # its folder is its own; the folders above it stay 0700 (root's):
            give_folder(Path(session.folder), uid, uid)  # it starts in it (cwd, set as root)
        workspace = Path(".") if uid is not None else session.folder
        cmd, env = quick_start(runtime_cfg.command, build_command(runtime_cfg, workspace),
                               {**os.environ, **(read_env(settings) if settings else {}),
                                **dict(session.egress.env if session.egress else ())},
                               self._agent_bytecode())
        env[MARKER] = marker(self.data_dir, session.agent_group, session.session_id)
        env[TOKEN] = self._records.begin(session.agent_group, session.session_id)
        _run, log_fd = self.logs.begin(session.agent_group, session.session_id)
        spawn_rss = own_rss()
        try:
            with open(log_fd, "ab") as log:
                popen = subprocess.Popen(cmd, cwd=session.folder, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True, env=env,
                                         user=uid, group=uid,
                                         extra_groups=[] if uid is not None else None)
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot start agent command {cmd[0]!r} ({exc.strerror}); "
                "fix [runtime] command in the config") from None
        agent = self._watch(session, popen.pid, popen, adopted=False)
        agent.spawn_rss = spawn_rss
        self._pid_file(session, popen.pid)
        return self._handle(agent)

    async def ping(self) -> None:
        return None  # processes on this host: nothing to be unreachable

    async def reconcile(self) -> None:
        """A pidfd cannot miss its process's exit; what is left is the running agents'
        logs, which they write themselves: each is trimmed once past its cap."""
        owned = [(a.ref.agent_group, a.ref.session_id) for a in self._agents.values()]
        if owned:
            await asyncio.to_thread(self._cap_logs, owned)

    def _cap_logs(self, owned: list[tuple[str, str]]) -> None:
        for group, session_id in owned:
            try:
                self.logs.cap(group, session_id)
            except OSError as exc:  # the log is a nicety: never the agent's end
                logger.debug("session {}: its log not trimmed ({})", session_id, exc)

    def _signal(self, agent: _Agent, sig: int) -> None:
        try:
            os.killpg(agent.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(agent.pid, sig)

    async def pause(self, session_id: str) -> None:
        """SIGSTOP to the whole process group: nothing in it runs until SIGCONT."""
        agent = self._agents.get(session_id)
        if agent is not None and not agent.paused:
            self._signal(agent, signal.SIGSTOP)
            agent.paused = True

    async def resume(self, session_id: str) -> None:
        agent = self._agents.get(session_id)
        if agent is not None and agent.paused:
            self._signal(agent, signal.SIGCONT)
            agent.paused = False

    async def stop(self, session_id: str, grace: float) -> None:
        agent = self._agents.get(session_id)
        if agent is None:
            return
        agent.ending = agent.ending or "stopped"
        self._signal(agent, signal.SIGTERM)
        if agent.paused:  # a stopped process only acts on SIGTERM once continued
            await self.resume(session_id)
        try:
            await asyncio.wait_for(asyncio.shield(agent.exited), grace)
            return
        except asyncio.TimeoutError:
            logger.warning("agent of session {} ignored SIGTERM for {:g}s; killing it",
                           session_id, grace)
        await self.kill(session_id)

    async def kill(self, session_id: str) -> None:
        agent = self._agents.get(session_id)
        if agent is None:
            return
        agent.ending = "killed"
        self._signal(agent, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(agent.exited), 10)
        except asyncio.TimeoutError:
            logger.error("agent pid {} of session {} did not die after SIGKILL", agent.pid,
                         session_id)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for agent in self._agents.values():
            loop.remove_reader(agent.pidfd)
            os.close(agent.pidfd)
        self._agents.clear()
        if self._uids is not None:
            self._uids.close()
