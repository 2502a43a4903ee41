"""The orchestrator process the bench measures: ``orchestrator run`` plus a readiness report.

``python -m bench.host --config C --ready-file F [--agents-file A] [--watch-budget N]``

This is ``orchestrator.cli.compose.run`` line for line (same config loading,
same logging set-up, same ``Supervisor.serve`` under ``capture_signals``) with
three additions that the bench needs and the CLI does not offer:

- when ``Supervisor.ready`` is set (every session had its start-up reconcile
  pass) it writes a JSON file with the wall-clock times of process entry,
  ``serve()``, the "orchestrator up" log line and readiness, and the watch mode;
- ``--agents-file``: a *synthetic runtime* that starts nothing and reports the
  listed sessions as running agents (adopted at start-up, as after a restart).
  The bench's writer processes play those agents. Without it the orchestrator
  would see heartbeats and replies from agents it believes dead, and every such
  pass would also re-read inbound.db, which a real running agent never causes;
  without the flag the real local runtime is used (nothing is due, so it never
  starts anything either);
- ``--watch-budget N``: pretend ``fs.inotify.max_user_watches`` is N (the
  fallback-to-polling demonstration) without touching the host's sysctl.
"""

from __future__ import annotations

import time

T_ENTRY = time.time()

import gc  # noqa: E402

gc.disable()  # as ``orchestrator run``: until start-up is done (``settle_heap``)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Callable  # noqa: E402

from loguru import logger  # noqa: E402

from orchestrator.cli.logs import setup_logging  # noqa: E402
from orchestrator.config.load import read_config  # noqa: E402
from orchestrator.config.model import Config  # noqa: E402
from orchestrator.contract.layout import sessions_root  # noqa: E402
from orchestrator.host.data_lock import AlreadyRunning  # noqa: E402
from orchestrator.runtime.base import (  # noqa: E402
    AgentExit,
    AgentHandle,
    RuntimeUnavailable,
    SessionRef,
)
from orchestrator.support.signals import capture_signals  # noqa: E402
from orchestrator.watch import watcher  # noqa: E402
from orchestrator.watch.head_start import HeadStart  # noqa: E402

if TYPE_CHECKING:
    from orchestrator.engine.supervisor import Supervisor


class SyntheticRuntime:
    """Agents that exist because the bench says so; it never starts a process."""

    name = "synthetic"
    listed = True

    def __init__(self, agents: list[tuple[str, str]], on_exit: Callable[[AgentExit], None]):
        self._alive = {sid: group for group, sid in agents}
        self._on_exit = on_exit
        self.start_requests = 0

    async def recover(self) -> list[AgentHandle]:
        return [AgentHandle(g, s, f"synthetic-{s}", adopted=True) for s, g in self._alive.items()]

    async def start(self, session: SessionRef) -> AgentHandle:
        self.start_requests += 1
        raise RuntimeUnavailable("bench synthetic runtime: starts nothing (a bench bug if seen)")

    def _end(self, session_id: str, reason: str) -> None:
        group = self._alive.pop(session_id, None)
        if group is not None:
            asyncio.get_running_loop().call_soon(
                self._on_exit, AgentExit(group, session_id, 0, reason))

    async def stop(self, session_id: str, grace: float) -> None:
        self._end(session_id, "stopped")

    async def kill(self, session_id: str) -> None:
        self._end(session_id, "killed")

    def is_running(self, session_id: str) -> bool:
        return session_id in self._alive

    def is_paused(self, session_id: str) -> bool:
        return False

    async def pause(self, session_id: str) -> None:
        pass

    async def resume(self, session_id: str) -> None:
        pass

    async def ping(self) -> None:
        pass

    def running(self) -> list[AgentHandle]:
        return [AgentHandle(g, s, f"synthetic-{s}", adopted=True) for s, g in self._alive.items()]

    async def close(self) -> None:
        pass


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _install_profiler(out: Path) -> None:
    """cProfile with ``time.thread_time``: CPU seconds of the event loop thread per
    function. The rest of the process (watchfiles' Rust thread, anyio's worker
    thread) shows up as process CPU minus loop-thread CPU in the .json."""
    import cProfile
    import signal

    out.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    state: dict = {"k": 0}

    def begin() -> None:
        if "prof" in state:
            return
        state["t"] = (time.thread_time(), time.process_time(), time.time())
        state["prof"] = cProfile.Profile(time.thread_time)
        state["prof"].enable()

    def end() -> None:
        prof = state.pop("prof", None)
        if prof is None:
            return
        prof.disable()
        tt, pt, wt = state["t"]
        state["k"] += 1
        base = out / f"prof-{state['k']}"
        prof.dump_stats(str(base) + ".pstats")
        _write_json(base.with_suffix(".json"), {
            "loop_thread_cpu_s": time.thread_time() - tt,
            "process_cpu_s": time.process_time() - pt, "wall_s": time.time() - wt})

    loop.add_signal_handler(signal.SIGUSR1, begin)
    loop.add_signal_handler(signal.SIGUSR2, end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host")
    p.add_argument("--config", required=True)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--agents-file", default=None,
                   help="sessions ('group/session' per line) to report as running agents")
    p.add_argument("--watch-budget", type=int, default=None)
    p.add_argument("--profile-dir", default=None,
                   help="SIGUSR1 starts cProfile (thread CPU time) on the event loop thread, "
                        "SIGUSR2 stops it and writes prof-<k>.pstats/.json here")
    args = p.parse_args(argv)

    cfg: Config = read_config(Path(args.config))
    setup_logging(cfg.log)
    times: dict[str, float] = {"entry": T_ENTRY}

    def spot_up(record) -> bool:  # the "orchestrator up" line marks the end of _startup
        if "up" not in times and record["message"].startswith("orchestrator up:"):
            times["up"] = time.time()
        return False

    spy = logger.add(lambda _m: None, filter=spot_up, level="INFO")

    if args.watch_budget is not None:
        budget = args.watch_budget
        watcher.watch_budget = lambda: budget
    # as ``orchestrator run`` (cli.commands.cmd_run): the watches are added while the
    # composition root is imported and everything is built
    head = HeadStart.begin(sessions_root(cfg.data_dir), cfg.watch, watcher.limits())
    from orchestrator.cli.compose import assembled, make_runtime

    synthetic: list[SyntheticRuntime] = []
    if args.agents_file:
        agents = [tuple(line.strip().split("/", 1))
                  for line in Path(args.agents_file).read_text().splitlines() if line.strip()]

        def factory(c: Config, on_exit: Callable[[AgentExit], None], on_available):
            rt = SyntheticRuntime(agents, on_exit)
            synthetic.append(rt)
            return rt
    else:
        factory = make_runtime

    async def run() -> int:
        async def report(sup: Supervisor) -> None:
            await sup.ready.wait()
            times["ready"] = time.time()
            for _ in range(500):  # the watch task sets the mode right after start-up
                if sup.watch_mode is not None:
                    break
                await asyncio.sleep(0.01)
            logger.remove(spy)
            _write_json(Path(args.ready_file), {
                "pid": os.getpid(), "times": times, "watch_mode": sup.watch_mode,
                "sessions": len(sup.tracked),
                "runtime": "synthetic" if synthetic else cfg.runtime.kind,
                "synthetic_agents": len(synthetic[0].running()) if synthetic else 0})
            logger.info("bench: all {} sessions reconciled {:.3f}s after serve()",
                        len(sup.tracked), times["ready"] - times["serve"])

        if args.profile_dir:
            _install_profiler(Path(args.profile_dir))
        stop = asyncio.Event()
        with capture_signals(stop):
            times["serve"] = time.time()
            try:
                async with assembled(cfg, runtime_factory=factory, stop_event=stop,
                                     head_start=head) as service:
                    reporter = asyncio.create_task(report(service.supervisor))
                    try:
                        await service.supervisor.serve()
                    finally:
                        reporter.cancel()
            except AlreadyRunning as exc:
                logger.error(str(exc))
                return 1
        if synthetic and synthetic[0].start_requests:
            logger.error("bench: synthetic runtime was asked to start {} agents",
                         synthetic[0].start_requests)
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
