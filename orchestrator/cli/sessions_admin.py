"""``orchestrator sessions archive|delete|restore ID… [--force] [--json]`` (issue 26.1).

Where archive and delete run (as ``deliveries retry``): on the files when no supervisor
holds the data dir (the data-dir lock is held meanwhile, and removals a crash cut short
are finished or undone first); through the HTTP API when ``--url`` says so or ``run``
is running — only the running engine may take a session it tracks, and it stops a
running agent first. Offline, a session whose registry status is not ``stopped`` is
refused (an agent left running by ``on_shutdown = "leave"`` may still use it): start
``run``, which stops it first.

``restore`` works on the files whether or not ``run`` runs: the registry rows are
written before the folder appears, so a running supervisor finds a session it knows.

Each id gets one line (or one JSON object per id with ``--json``); a session that was
refused (pending work without ``--force``, unknown) makes the exit code 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from orchestrator.api import client as api_client
from orchestrator.cli.deliveries import listen_url
from orchestrator.config.model import Config
from orchestrator.contract.layout import registry_path
from orchestrator.contract.session_status import Status
from orchestrator.host.data_lock import AlreadyRunning, lock_data_dir
from orchestrator.host.registry import Registry
from orchestrator.host.retention import Outcome, Retention, RetentionError
from orchestrator.rules.retention import Action
from orchestrator.support.errors import UserError

EXIT_REFUSED = 2


class SessionsError(UserError):
    """One line, exit code 2."""


def _offline(cfg: Config, ids: list[str], action: Action, force: bool) -> list[Outcome] | None:
    """Removed on the files; None when a supervisor runs (it must do it)."""
    try:
        lock = lock_data_dir(cfg.data_dir)
    except AlreadyRunning:
        return None
    out = []
    try:
        with Registry(registry_path(cfg.data_dir)) as registry:
            retention = Retention(cfg.data_dir, registry, cfg.retention)
            retention.recover()
            for sid in ids:
                row = registry.session(sid)
                if row is not None and row.container_status != Status.STOPPED:
                    out.append(Outcome(sid, "kept", f"its status is {row.container_status}: "
                                       "start `orchestrator run` (it stops the agent first) "
                                       "and run this again"))
                    continue
                out.append(retention.remove(sid, action, force=force))
    finally:
        lock.release()
    return out


def _through_api(args: argparse.Namespace, cfg: Config | None, ids: list[str], action: Action,
                 url: str | None) -> list[Outcome]:
    if url is None:
        assert cfg is not None
        url = listen_url(cfg.api.listen)
        if url is None:
            raise SessionsError("the orchestrator is running and [api] listen gives no fixed "
                                f"address ({cfg.api.listen!r}); pass --url (or set "
                                "ORCHESTRATOR_URL)")
    token = api_client.resolve_token(args.token_file, cfg.api.token_file if cfg else None)
    out = []
    for sid in ids:
        try:
            r = api_client.remove_session(url, token, sid, archive=action is Action.ARCHIVE,
                                          force=args.force)
        except api_client.ApiClientError as exc:
            if exc.exit_code != 2:
                raise
            out.append(Outcome(sid, "kept", str(exc)))
            continue
        out.append(Outcome(sid, r["action"], archive=r.get("archive")))
    return out


def _print(outcomes: list[Outcome], as_json: bool, refused_as: str = "not removed") -> int:
    refused = False
    for o in outcomes:
        ok = o.action in ("archived", "deleted", "restored")
        refused |= not ok
        if as_json:
            print(json.dumps({"session_id": o.session_id, "action": o.action,
                              "archive": o.archive, "reason": o.reason}))
        elif ok:
            print(f"{o.session_id}: {o.action}" + (f" ({o.archive})" if o.archive else ""))
        else:
            print(f"{o.session_id}: {refused_as}: {o.reason}")
    return EXIT_REFUSED if refused else 0


def cmd_remove(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config],
               action: Action) -> int:
    url = api_client.resolve_url(args.url)
    cfg = load(args) if url is None else _maybe(load, args)
    outcomes = None if url is not None or cfg is None else _offline(cfg, args.ids, action,
                                                                     args.force)
    if outcomes is None:
        outcomes = _through_api(args, cfg, args.ids, action, url)
    return _print(outcomes, args.json)


def cmd_restore(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    cfg = load(args)
    outcomes = []
    with Registry(registry_path(cfg.data_dir)) as registry:
        retention = Retention(cfg.data_dir, registry, cfg.retention)
        for sid in args.ids:
            try:
                outcomes.append(retention.restore(sid))
            except RetentionError as exc:
                outcomes.append(Outcome(sid, "kept", str(exc)))
    return _print(outcomes, args.json, "not restored")


def _maybe(load: Callable[[argparse.Namespace], Config], args: argparse.Namespace
           ) -> Config | None:
    try:
        return load(args)
    except UserError:
        return None  # only the API's token may be missing then


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             remote: argparse.ArgumentParser,
             load: Callable[[argparse.Namespace], Config]) -> None:
    p = sub.add_parser("sessions", help="archive, delete or restore sessions (retention)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps: dict[str, Any] = {
        "archive": (Action.ARCHIVE, "one compressed file per session under [retention] "
                    "archive_dir; folder and registry rows removed"),
        "delete": (Action.DELETE, "folder and registry rows removed, no archive"),
    }
    for name, (action, text) in helps.items():
        a = actions.add_parser(name, parents=[common, remote], help=text)
        a.add_argument("ids", nargs="+", metavar="ID", help="session id")
        a.add_argument("--force", action="store_true",
                       help="also when it has pending messages or undelivered replies "
                            "(they are lost)")
        a.add_argument("--json", action="store_true", help="one JSON object per session")
        a.set_defaults(func=lambda args, action=action: cmd_remove(args, load, action))
    r = actions.add_parser("restore", parents=[common],
                           help="put archived sessions back (folder and registry rows)")
    r.add_argument("ids", nargs="+", metavar="ID", help="session id")
    r.add_argument("--json", action="store_true", help="one JSON object per session")
    r.set_defaults(func=lambda args: cmd_restore(args, load))
