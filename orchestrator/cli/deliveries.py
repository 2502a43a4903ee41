"""``orchestrator deliveries retry [--session ID] [--json]``: failed replies get fresh
attempts (``engine.requeue``).

Where it runs: through the HTTP API when ``--url`` / ``ORCHESTRATOR_URL`` says so, or
when a supervisor holds the data dir (then at ``[api] listen``: the running one must
forget what it remembers of those replies, which only it can do); on the files
directly when none runs (the data-dir lock is held meanwhile, so a ``run`` started at
the same moment waits for nothing half-done).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

from orchestrator.api import client as api_client
from orchestrator.config.model import Config
from orchestrator.contract.layout import registry_path
from orchestrator.engine.requeue import UnknownSession, requeue_failed
from orchestrator.host.data_lock import AlreadyRunning, lock_data_dir
from orchestrator.host.registry import Registry
from orchestrator.support.errors import UserError


class DeliveriesError(UserError):
    """One line, exit code 2."""


def listen_url(listen: str) -> str | None:
    """``[api] listen`` as a URL the client can call; None when there is none to call
    (no API, or an ephemeral port that only the running process knows)."""
    if not listen:
        return None
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _local(cfg: Config, session: str | None) -> int | None:
    """Re-queued on the files; None when a supervisor runs (it must do it)."""
    try:
        lock = lock_data_dir(cfg.data_dir)
    except AlreadyRunning:
        return None
    try:
        with Registry(registry_path(cfg.data_dir)) as registry:
            try:
                done = requeue_failed(cfg.data_dir, registry, session)
            except UnknownSession as exc:
                raise DeliveriesError(str(exc)) from None
    finally:
        lock.release()
    return sum(len(ids) for ids in done.values())


def cmd_retry(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    url = api_client.resolve_url(args.url)
    cfg = load(args) if url is None else None
    retried = None if cfg is None else _local(cfg, args.session)
    if retried is None:
        if url is None:
            assert cfg is not None
            url = listen_url(cfg.api.listen)
            if url is None:
                raise DeliveriesError(
                    "the orchestrator is running and [api] listen gives no fixed address "
                    f"({cfg.api.listen!r}); pass --url (or set ORCHESTRATOR_URL)")
        local = cfg
        if local is None:
            try:
                local = load(args)
            except UserError:
                local = None  # only the API's token may be missing then
        token = api_client.resolve_token(args.token_file,
                                         local.api.token_file if local else None)
        retried = int(api_client.retry_deliveries(url, token, args.session)["retried"])
    if args.json:
        print(json.dumps({"retried": retried}))
    else:
        print(f"{retried} failed repl{'y' if retried == 1 else 'ies'} re-queued")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             remote: argparse.ArgumentParser,
             load: Callable[[argparse.Namespace], Config]) -> None:
    p = sub.add_parser("deliveries", help="replies that failed to be delivered")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("retry", parents=[common, remote],
                           help="give failed replies fresh attempts (all sessions, or one)")
    r.add_argument("--session", default=None, metavar="ID", help="only this session")
    r.add_argument("--json", action="store_true", help='print {"retried": N}')
    r.set_defaults(func=lambda args: cmd_retry(args, load))
