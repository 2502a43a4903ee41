"""``orchestrator logs SESSION [-f] [--run N] [--json]``: an agent run's kept output.

Read from ``<data_dir>/logs/<group>/<session>/run-<N>.log`` (``host.agent_logs``)
with no server needed, like ``status``; ``GET /v1/sessions/{id}/logs`` is the same
through the API. (The orchestrator's own log goes to its stderr: this command is
only about agents.) The text is the agent's: control characters are escaped before
it reaches the terminal (``--json`` carries it as a JSON string instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from orchestrator.config.model import Config
from orchestrator.contract.layout import registry_path
from orchestrator.host.agent_logs import AgentLogs, RunLog, shown
from orchestrator.host.registry import Registry
from orchestrator.support.errors import UserError

FOLLOW_EVERY = 0.25  # s between looks at the file with -f


class LogsError(UserError):
    """One line, exit code 2."""


def _group_of(cfg: Config, session_id: str) -> str:
    registry = Registry.reader(registry_path(cfg.data_dir))  # never writes
    row = None
    if registry is not None:
        with registry:
            row = registry.session(session_id)
    if row is None:
        raise LogsError(f"no session {session_id!r} in {cfg.data_dir} "
                        "(orchestrator status lists them)")
    return row.agent_group_id


def _header(session_id: str, log: RunLog) -> str:
    kept = ", ".join(str(r) for r in log.runs)
    cut = f"; its last {len(log.data)} of {log.size} bytes" if len(log.data) < log.size else ""
    return f"==> session {session_id}, run {log.run} (runs kept: {kept}{cut}) <=="


def _json(session_id: str, group: str, log: RunLog) -> str:
    return json.dumps({"session_id": session_id, "agent_group": group, "run": log.run,
                       "runs": list(log.runs), "size": log.size,
                       "text": log.data.decode("utf-8", "replace")}, ensure_ascii=False)


def cmd_logs(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    cfg = load(args)
    group = _group_of(cfg, args.session)
    store = AgentLogs.of(cfg)
    log = store.read(group, args.session, args.run)
    if log is None:
        if args.run is not None:
            runs = ", ".join(str(r) for r in store.runs(group, args.session)) or "none"
            raise LogsError(f"session {args.session} has no run {args.run} kept "
                            f"(runs kept: {runs})")
        if args.json and not args.follow:
            print(json.dumps({"session_id": args.session, "agent_group": group, "run": None,
                              "runs": [], "size": 0, "text": ""}))
            return 0
        if not args.follow:
            print(f"orchestrator: session {args.session}: no agent output kept yet",
                  file=sys.stderr)
            return 0
    elif args.json:
        print(_json(args.session, group, log))
    else:
        print(_header(args.session, log), file=sys.stderr)
        sys.stdout.write(shown(log.data))
        sys.stdout.flush()
    if not args.follow:
        return 0
    try:
        follow(store, group, args.session, log, args.run is None, json_lines=args.json)
    except KeyboardInterrupt:
        pass
    return 0


def follow(store: AgentLogs, group: str, session_id: str, log: RunLog | None,
           newest: bool, *, json_lines: bool = False, sleep: Callable[[float], None] = time.sleep,
           rounds: int | None = None) -> None:
    """``-f``: print what the run writes from now on; with ``newest``, switch to each
    new run as it starts. A file trimmed to its cap meanwhile is read from its start."""
    run = log.run if log else None
    offset = log.size if log else 0
    while rounds is None or rounds > 0:
        rounds = None if rounds is None else rounds - 1
        runs = store.runs(group, session_id)
        if newest and runs and runs[-1] != run:
            run, offset = runs[-1], 0
            if not json_lines:
                print(f"==> session {session_id}, run {run} <==", file=sys.stderr)
        if run is not None:
            got = store.read(group, session_id, run, offset=offset)
            if got is not None and got.size < offset:  # trimmed: its kept end again
                offset = 0
                got = store.read(group, session_id, run, offset=0)
            if got is not None and got.data:
                offset += len(got.data)
                if json_lines:
                    print(_json(session_id, group, got), flush=True)
                else:
                    sys.stdout.write(shown(got.data))
                    sys.stdout.flush()
        sleep(FOLLOW_EVERY)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             load: Callable[[argparse.Namespace], Config]) -> None:
    p = sub.add_parser("logs", parents=[common],
                       help="an agent run's kept output (stdout and stderr) of one session")
    p.add_argument("session", metavar="SESSION", help="session id (orchestrator status)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing what it writes, switching to each new run (Ctrl-C ends)")
    p.add_argument("--run", type=int, default=None, metavar="N",
                   help="this run (default: the newest; the header lists the kept ones)")
    p.add_argument("--json", action="store_true",
                   help="print {session_id, agent_group, run, runs, size, text} as JSON")
    p.set_defaults(func=lambda args: cmd_logs(args, load))
