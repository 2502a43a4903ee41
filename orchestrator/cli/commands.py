"""Thin argparse front end: each command parses, calls one library function, prints.

``main(argv)`` returns an exit code instead of exiting, so tests drive the CLI
in-process. The project's own errors (``errors.UserError``: bad config, bad
message, bad attachment, an unusable data dir) are one line on stderr and exit
code 2. Anything else is a bug: it crashes with a traceback and exit code 1, so
a bug never passes for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from orchestrator import version
from orchestrator.api import client as api_client
from orchestrator.cli import backup as cli_backup
from orchestrator.cli import deliveries as cli_deliveries
from orchestrator.cli import groups as cli_groups
from orchestrator.cli import send as cli_send
from orchestrator.cli import session_logs as cli_session_logs
from orchestrator.cli import sessions_admin as cli_sessions_admin
from orchestrator.config.load import read_config, read_config_sources
from orchestrator.config.model import Config
from orchestrator.config.render import write_default
from orchestrator.contract.layout import InvalidId, registry_path
from orchestrator.host.registry import Registry
from orchestrator.host.secretfile import ensure_secret
from orchestrator.support.errors import UserError

EXIT_USAGE = 2

DESCRIPTION = """\
Run AI agent sessions as containers or local processes, each in its own session
folder, and deliver their replies. Start the supervisor with `run`; `send` and
`status` work whether or not it is running."""

EPILOG = """\
examples:
  orchestrator init                                  write ./config.toml
  orchestrator run                                   supervise until Ctrl-C
  orchestrator send --group support "hello"          prints the session id
  echo "long text" | orchestrator send --group support -
  orchestrator status                                one row per session

Bad input is one line on stderr and exit code 2. Docs: README.md, docs/contract.md."""


def _load(args: argparse.Namespace) -> Config:
    return read_config(Path(args.config), sets=tuple(getattr(args, "set", None) or ()))


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.config)
    write_default(path, force=args.force)
    token_file = read_config(path).api.token_file
    if token_file:  # the API token, mode 0600 (kept if it exists)
        ensure_secret(Path(token_file))
    print(json.dumps({"config": str(path), "token_file": token_file or None}) if args.json
          else f"wrote {path}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """The effective configuration and where each value came from."""
    from orchestrator.config.show import effective

    rows = effective(*read_config_sources(Path(args.config), sets=tuple(args.set or ())))
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        value = json.dumps(r["value"], ensure_ascii=False)
        print(f"{r['key'].ljust(width)}  {r['origin']:<7}  {value}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.host import status
    from orchestrator.watch import budget as watch_budget

    remote = cli_send.remote_of(args, _load)
    if remote:
        names = {f.name for f in dataclasses.fields(status.StatusRow)}
        rows = [status.StatusRow(**{k: v for k, v in r.items() if k in names})
                for r in api_client.sessions(remote[0], remote[1])]
        print(status.render_json(rows) if args.json else status.render_table(rows))
        return 0
    cfg = _load(args)
    registry = Registry.reader(registry_path(cfg.data_dir))  # never writes
    if registry is None:
        rows = []
    else:
        with registry:
            rows = status.collect(cfg.data_dir, registry, cfg)
    print(status.render_json(rows) if args.json else status.render_table(rows))
    if not args.json:
        _archived_line(cfg)
    warning = status.environment_warning(cfg.data_dir)
    if warning:  # status itself only reads, so it works; say what will not
        print(f"orchestrator: warning: {warning}", file=sys.stderr)
    polled = watch_budget.status_line(watch_budget.read_state(cfg.data_dir))
    if polled:  # (stderr in both forms: the --json list stays what it was)
        print(f"orchestrator: warning: {polled}", file=sys.stderr)
    return 0


def _archived_line(cfg: Config) -> None:
    """One line under the table: how many sessions are archived (retention), if any."""
    from orchestrator.host.retention import archive_dir

    root = archive_dir(cfg.data_dir, cfg.retention)
    try:
        count = sum(1 for _ in root.glob("*/*.tar.gz"))
    except OSError:
        return
    if count:
        print(f"{count} archived session{'' if count == 1 else 's'} in {root} "
              "(orchestrator sessions restore ID)")


def cmd_run(args: argparse.Namespace) -> int:
    import gc

    gc.disable()  # until start-up is done (``engine.discovery.settle_heap`` turns it on)
    try:
        return _run(args)
    finally:
        gc.enable()  # (a start-up that failed first: on again all the same)


def _run(args: argparse.Namespace) -> int:
    from orchestrator.cli.logs import setup_logging
    from orchestrator.config.groups import preflight
    from orchestrator.contract.layout import sessions_root
    from orchestrator.host.data_lock import lock_data_dir
    from orchestrator.watch import watcher
    from orchestrator.watch.head_start import HeadStart

    cfg = _load(args)
    preflight(cfg)
    setup_logging(cfg.log, json=True if args.json_logs else None)
    # before the walk: a second ``run`` on this data dir is refused at once, not after
    # adding a watch per session (~1 s and 100 000 of the user's watches at 100 000)
    lock = lock_data_dir(cfg.data_dir)
    try:
        # the watches are added while the rest is imported and built (issue 28's restart)
        head = HeadStart.begin(sessions_root(cfg.data_dir), cfg.watch, watcher.limits())
        from orchestrator.cli.compose import run
    except BaseException:
        lock.release()
        raise
    return run(cfg, reread=lambda: _load(args), head_start=head,  # SIGHUP: [cluster] again
               data_lock=lock)


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.cli.demo import demo

    return demo(Path(args.config), json_logs=args.json_logs)


def cmd_image(args: argparse.Namespace) -> int:
    from orchestrator.runtime.docker import image

    cfg = _load(args)
    argv = ["build", "--tag", args.tag or cfg.docker.image] + (["--force"] if args.force else [])
    return image.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.toml", metavar="PATH",
                        help="config file (default: ./config.toml)")
    common.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="override a config key (wins over ORCHESTRATOR_<SECTION>__<KEY> "
                             "and the file), e.g. --set api.listen=127.0.0.1:9000; repeatable")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default=None, help="go through the HTTP API at this URL "
                        "(default: $ORCHESTRATOR_URL; unset = the files, no server needed)")
    remote.add_argument("--token-file", default=None, metavar="PATH",
                        help="API token (default: $ORCHESTRATOR_TOKEN, else [api] token_file)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="write a commented default config")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--json", action="store_true", help="print {config, token_file} as JSON")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="the effective configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("show", parents=[common],
                        help="every key, its value and where it came from (default, file, "
                             "env: ORCHESTRATOR_<SECTION>__<KEY>, cli)")
    c.add_argument("--json", action="store_true", help="print a JSON list of objects")
    c.set_defaults(func=cmd_config_show)

    p = sub.add_parser("status", parents=[common, remote],
                       help="one row per session (reads only)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("run", parents=[common], help="run the supervisor until Ctrl-C")
    p.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", parents=[common],
                       help="run the orchestrator, send a message, show the reply and statuses")
    p.add_argument("--json-logs", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("image", parents=[common], help="build the agent image (Docker runtime)")
    p.add_argument("action", choices=["build"])
    p.add_argument("--tag", default=None, help="default: [docker] image")
    p.add_argument("--force", action="store_true", help="rebuild even if the tag is current")
    p.set_defaults(func=cmd_image)

    cli_send.register(sub, common, remote, _load)
    cli_groups.register(sub, common, _load)
    cli_deliveries.register(sub, common, remote, _load)
    cli_session_logs.register(sub, common, _load)
    cli_backup.register(sub, common, _load)
    cli_sessions_admin.register(sub, common, remote, _load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except api_client.ApiClientError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (UserError, InvalidId) as exc:  # InvalidId: layout is stdlib-only (agent image)
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
