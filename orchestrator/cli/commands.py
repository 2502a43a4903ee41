"""Thin argparse front end: each command parses, calls one library function, prints.

``main(argv)`` returns an exit code instead of exiting, so tests drive the CLI
in-process. The project's own errors (``errors.UserError``: bad config, bad
message, bad attachment, an unusable data dir) are one line on stderr and exit
code 2. Anything else is a bug: it crashes with a traceback and exit code 1, so
a bug never passes for bad input.
"""

from __future__ import annotations

import argparse
import base64
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
from orchestrator.cli import session_logs as cli_session_logs
from orchestrator.cli import sessions_admin as cli_sessions_admin
from orchestrator.config.load import read_config, read_config_sources
from orchestrator.config.model import Config
from orchestrator.config.render import write_default
from orchestrator.contract.layout import InvalidId, registry_path
from orchestrator.contract.schema import utcnow
from orchestrator.host.registry import Registry
from orchestrator.host.secretfile import ensure_secret
from orchestrator.host.sessions import MODES, MessagingGroup, Sessions
from orchestrator.rules.scheduling import format_due
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

MODE_HELP = ("which session the message goes to: 'shared' = one per chat (channel + "
             "platform), 'per-thread' = one per chat thread, 'agent-shared' = one per "
             "agent group (default: [sessions] default_mode)")


class UsageError(UserError):
    """Bad input from the user: printed as one line, exit code 2."""


def _load(args: argparse.Namespace) -> Config:
    return read_config(Path(args.config), sets=tuple(getattr(args, "set", None) or ()))


def _open(cfg: Config) -> tuple[Registry, Sessions]:
    registry = Registry(registry_path(cfg.data_dir))
    return registry, Sessions(cfg.data_dir, registry, cfg.sessions.max_attachment_bytes)


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


def _remote(args: argparse.Namespace) -> tuple[str, str | None, Config | None] | None:
    """(url, token, local config if any) when --url / ORCHESTRATOR_URL says to use the API."""
    url = api_client.resolve_url(args.url)
    if url is None:
        return None
    cfg = _load(args) if Path(args.config).exists() else None
    token = api_client.resolve_token(args.token_file, cfg.api.token_file if cfg else None)
    return url, token, cfg


def _attachment(path_text: str, max_bytes: int) -> dict:
    path = Path(path_text)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UsageError(f"--attach {path}: {size} bytes is over the {max_bytes}-byte limit "
                             "([sessions] max_attachment_bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--attach {path}: cannot read file ({exc.strerror})") from None
    return {"name": path.name, "data": base64.b64encode(data).decode("ascii")}


def message_text(text: str) -> str:
    """TEXT as the user meant it: ``-`` reads standard input (no argv size limit);
    bytes that are not UTF-8 are refused with one line naming TEXT."""
    if text == "-":
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"TEXT (standard input) is not UTF-8 (byte {exc.start}); "
                             "convert it first, e.g. with iconv -t UTF-8") from None
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes Python could not decode (surrogateescape)
            raise UsageError("TEXT is not valid UTF-8; convert it (e.g. iconv -t UTF-8) or "
                             "check your terminal's locale (LANG)") from None
    return text


def cmd_send(args: argparse.Namespace) -> int:
    remote = _remote(args)
    cfg = remote[2] if remote else _load(args)
    if args.wait is not None and not remote:
        remote = _local_api(args, cfg)
    text = message_text(args.text)
    if not text.strip() and not args.attach:
        raise UsageError("TEXT is empty: give the message text, or - to read it from "
                         "standard input")
    if remote and args.every:
        raise UsageError("--every writes a series into the files: run it without --url "
                         "or --wait (on the orchestrator's host)")
    schedule = cli_groups.schedule_of(args, cfg, utcnow())  # --at / --every, checked first
    max_bytes = cfg.sessions.max_attachment_bytes if cfg else 2**40  # else the server checks
    content = _content(args, text, max_bytes)
    if remote:
        return _send_remote(args, remote[0], remote[1], content, schedule)
    assert cfg is not None  # without --url, _load gave the config
    return _send_local(args, cfg, content, schedule)


def _content(args: argparse.Namespace, text: str, max_bytes: int) -> dict:
    """The message content from TEXT (plain or ``--content-json``), ``--sender`` and
    ``--attach``."""
    if args.content_json:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--content-json: TEXT is not valid JSON ({exc.msg}, "
                             f"column {exc.colno})") from None
        if not isinstance(content, dict):
            raise UsageError("--content-json: TEXT must be a JSON object, e.g. "
                             "'{\"text\": \"hi\"}'")
    else:
        content = {"text": text}
    if args.sender is not None:
        content["sender"] = args.sender  # the name the agent sees (NanoClaw: sender="…")
    if args.attach:
        if not isinstance(content.setdefault("attachments", []), list):
            raise UsageError("--content-json: content.attachments must be a list to add "
                             "--attach files")
        content["attachments"].extend(_attachment(a, max_bytes) for a in args.attach)
    return content


def _send_remote(args: argparse.Namespace, url: str, token: str | None, content: dict,
                 schedule: cli_groups.Schedule) -> int:
    body = {"agent_group": args.group, "channel": args.channel, "platform_id": args.platform,
            "thread_id": args.thread, "content": content}
    if args.mode:
        body["mode"] = args.mode
    if schedule.process_after:
        body["process_after"] = schedule.process_after.isoformat()
    if args.wait is not None:
        body["wait"] = args.wait
    result = api_client.send(url, token, body, wait=args.wait)
    reply = result.get("reply")
    if args.json:
        print(json.dumps({"session_id": result["session_id"],
                          "message_id": result["message_id"], "series_id": None,
                          **({"reply": reply} if args.wait is not None else {})}))
        return 0
    print(result["session_id"])
    if args.wait is not None:
        if reply is None:
            print(f"no reply within {args.wait:g}s (message {result['message_id']}); see "
                  f"GET /v1/sessions/{result['session_id']}/messages", file=sys.stderr)
        else:
            print(reply_text(reply))
    return 0


def reply_text(reply: dict) -> str:
    """What ``send --wait`` prints of a reply: its ``content.text``, else its content
    as JSON (a truncated one: where to read it)."""
    if reply.get("truncated"):
        return f"(reply over [api] event_content_bytes: GET {reply.get('url')})"
    content = reply.get("content")
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    return json.dumps(content, ensure_ascii=False)


def _local_api(args: argparse.Namespace, cfg: Config | None
               ) -> tuple[str, str | None, Config | None]:
    """``send --wait`` without --url: the API of the config's own ``[api] listen``."""
    from orchestrator.api.auth import parse_listen

    listen = parse_listen(cfg.api.listen) if cfg else None
    if listen is None or (listen.port == 0 and not listen.path):
        raise UsageError("--wait waits through the HTTP API: give --url (or set "
                         "ORCHESTRATOR_URL), or set [api] listen to a fixed address")
    if listen.host in ("0.0.0.0", "::"):
        listen = type(listen)(host="127.0.0.1" if listen.host == "0.0.0.0" else "::1",
                              port=listen.port)
    token = api_client.resolve_token(args.token_file, cfg.api.token_file if cfg else None)
    return listen.url(), token, cfg


def _send_local(args: argparse.Namespace, cfg: Config, content: dict,
                schedule: cli_groups.Schedule) -> int:
    registry, sessions = _open(cfg)
    with registry:
        mode = args.mode or cfg.sessions.default_mode
        mg = MessagingGroup(args.channel, args.platform)
        message = sessions.prepare(content)  # refused here: no session is created for it
        session = sessions.resolve(args.group, mg, args.thread, mode)
        if schedule.series_id and schedule.recurrence:  # indexed first: always cancellable
            registry.add_series(schedule.series_id, session.id, args.group,
                                schedule.recurrence, cfg.sessions.timezone)
        try:
            # the message keeps its own chat, whatever the session's mode (replies go back)
            mid, _ = sessions.write_message(session, message,
                                            routing=(args.channel, args.platform,
                                                     args.thread),
                                            process_after=schedule.process_after,
                                            recurrence=schedule.recurrence,
                                            series_id=schedule.series_id)
        except BaseException:
            if schedule.series_id:
                registry.cancel_series(schedule.series_id)
            raise
    if args.json:
        print(json.dumps({"session_id": session.id, "message_id": mid,
                          "series_id": schedule.series_id}))
    else:
        print(session.id)
        if schedule.series_id:
            print(schedule.series_id)
    if schedule.process_after:
        print(f"due at {format_due(schedule.process_after)} UTC", file=sys.stderr)
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    """Answer an agent's question card (``{"type": "ask_question", "questionId": …}``)."""
    cfg = _load(args)
    registry, sessions = _open(cfg)
    with registry:
        session = registry.session(args.session)
        if session is None:
            raise UsageError(f"no session {args.session!r}; see `orchestrator status`")
        mid, _ = sessions.write_system_response(session, args.question_id, args.option,
                                                args.user)
    print(json.dumps({"session_id": session.id, "message_id": mid}) if args.json else mid)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.host import status
    from orchestrator.watch import budget as watch_budget

    remote = _remote(args)
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
    from orchestrator.cli.compose import run
    from orchestrator.cli.logs import setup_logging
    from orchestrator.config.groups import preflight

    cfg = _load(args)
    preflight(cfg)
    setup_logging(cfg.log, json=True if args.json_logs else None)
    return run(cfg, reread=lambda: _load(args))  # SIGHUP: [cluster] members again


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.cli.demo import demo

    return demo(Path(args.config), json_logs=args.json_logs)


def cmd_image(args: argparse.Namespace) -> int:
    from orchestrator.runtime.docker import image

    cfg = _load(args)
    argv = ["build", "--tag", args.tag or cfg.docker.image] + (["--force"] if args.force else [])
    return image.main(argv)


def _wait_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError("must be from 0 to 60 seconds")
    return value


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

    p = sub.add_parser("send", parents=[common, remote], help="write a message to a session")
    p.add_argument("--group", required=True, help="agent group")
    p.add_argument("--channel", default="cli", help="channel type (default: cli)")
    p.add_argument("--platform", default="local", help="platform id of the chat (default: local)")
    p.add_argument("--thread", default=None, help="thread id")
    p.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    p.add_argument("--attach", action="append", default=[], metavar="FILE",
                   help="attach a file (repeat for several); the agent finds it in "
                        "inbox/<message id>/")
    p.add_argument("--content-json", action="store_true",
                   help='TEXT is the whole message content as a JSON object, e.g. '
                        '\'{"text": "hi", "priority": 2}\' (formerly --json)')
    p.add_argument("--json", action="store_true",
                   help="print {session_id, message_id, series_id} (and reply) as JSON")
    p.add_argument("--wait", type=_wait_arg, default=None, metavar="SECONDS",
                   help="wait up to SECONDS (at most 60) for the first reply and print it; "
                        "goes through the HTTP API (--url, else [api] listen)")
    cli_groups.add_send_options(p)
    p.add_argument("--sender", default=None, metavar="NAME",
                   help="who wrote the message (content.sender; the agent shows it)")
    p.add_argument("text", metavar="TEXT",
                   help="the message text (UTF-8); - reads it from standard input")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("answer", parents=[common], help="answer an agent's question")
    p.add_argument("session", help="session id (the question card's session_id)")
    p.add_argument("question_id", metavar="QUESTION_ID", help="the card's questionId")
    p.add_argument("option", metavar="OPTION", help="the chosen option's value")
    p.add_argument("--user", default="", help="who answered (userId)")
    p.add_argument("--json", action="store_true",
                   help="print {session_id, message_id} as JSON")
    p.set_defaults(func=cmd_answer)

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
