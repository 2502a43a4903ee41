"""``orchestrator send`` and ``orchestrator answer``: a message (or a question card's
answer) written into a session, through the files on this host or through the HTTP API
(``--url`` / ``ORCHESTRATOR_URL``; ``send --wait`` also waits for the reply).

TEXT and ``--attach`` files are the user's input: bytes that are not UTF-8, JSON that
is not an object and files over ``[sessions] max_attachment_bytes`` are refused with
one line naming the argument, before anything is written.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Callable

from orchestrator.api import client as api_client
from orchestrator.cli import groups as cli_groups
from orchestrator.config.model import Config
from orchestrator.contract.layout import registry_path
from orchestrator.contract.schema import utcnow
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MODES, MessagingGroup, Sessions
from orchestrator.rules.scheduling import format_due
from orchestrator.support.errors import UserError

MODE_HELP = ("which session the message goes to: 'shared' = one per chat (channel + "
             "platform), 'per-thread' = one per chat thread, 'agent-shared' = one per "
             "agent group (default: [sessions] default_mode)")


class SendError(UserError):
    """Bad input to send / answer: printed as one line, exit code 2."""


def _open(cfg: Config) -> tuple[Registry, Sessions]:
    registry = Registry(registry_path(cfg.data_dir))
    return registry, Sessions(cfg.data_dir, registry, cfg.sessions.max_attachment_bytes)


def remote_of(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]
              ) -> tuple[str, str | None, Config | None] | None:
    """(url, token, local config if any) when --url / ORCHESTRATOR_URL says to use the API."""
    url = api_client.resolve_url(args.url)
    if url is None:
        return None
    cfg = load(args) if Path(args.config).exists() else None
    token = api_client.resolve_token(args.token_file, cfg.api.token_file if cfg else None)
    return url, token, cfg


def _attachment(path_text: str, max_bytes: int) -> dict:
    path = Path(path_text)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SendError(f"--attach {path}: {size} bytes is over the {max_bytes}-byte limit "
                            "([sessions] max_attachment_bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise SendError(f"--attach {path}: cannot read file ({exc.strerror})") from None
    return {"name": path.name, "data": base64.b64encode(data).decode("ascii")}


def message_text(text: str) -> str:
    """TEXT as the user meant it: ``-`` reads standard input (no argv size limit);
    bytes that are not UTF-8 are refused with one line naming TEXT."""
    if text == "-":
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SendError(f"TEXT (standard input) is not UTF-8 (byte {exc.start}); "
                            "convert it first, e.g. with iconv -t UTF-8") from None
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes Python could not decode (surrogateescape)
            raise SendError("TEXT is not valid UTF-8; convert it (e.g. iconv -t UTF-8) or "
                            "check your terminal's locale (LANG)") from None
    return text


def cmd_send(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    remote = remote_of(args, load)
    cfg = remote[2] if remote else load(args)
    if args.wait is not None and not remote:
        remote = _local_api(args, cfg)
    text = message_text(args.text)
    if not text.strip() and not args.attach:
        raise SendError("TEXT is empty: give the message text, or - to read it from "
                         "standard input")
    if remote and args.every:
        raise SendError("--every writes a series into the files: run it without --url "
                         "or --wait (on the orchestrator's host)")
    schedule = cli_groups.schedule_of(args, cfg, utcnow())  # --at / --every, checked first
    max_bytes = cfg.sessions.max_attachment_bytes if cfg else 2**40  # else the server checks
    content = _content(args, text, max_bytes)
    if remote:
        return _send_remote(args, remote[0], remote[1], content, schedule)
    assert cfg is not None  # without --url, load gave the config
    return _send_local(args, cfg, content, schedule)


def _content(args: argparse.Namespace, text: str, max_bytes: int) -> dict:
    """The message content from TEXT (plain or ``--content-json``), ``--sender`` and
    ``--attach``."""
    if args.content_json:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SendError(f"--content-json: TEXT is not valid JSON ({exc.msg}, "
                            f"column {exc.colno})") from None
        if not isinstance(content, dict):
            raise SendError("--content-json: TEXT must be a JSON object, e.g. "
                            "'{\"text\": \"hi\"}'")
    else:
        content = {"text": text}
    if args.sender is not None:
        content["sender"] = args.sender  # the name the agent sees (NanoClaw: sender="…")
    if args.attach:
        if not isinstance(content.setdefault("attachments", []), list):
            raise SendError("--content-json: content.attachments must be a list to add "
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
        raise SendError("--wait waits through the HTTP API: give --url (or set "
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


def cmd_answer(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    """Answer an agent's question card (``{"type": "ask_question", "questionId": …}``)."""
    cfg = load(args)
    registry, sessions = _open(cfg)
    with registry:
        session = registry.session(args.session)
        if session is None:
            raise SendError(f"no session {args.session!r}; see `orchestrator status`")
        mid, _ = sessions.write_system_response(session, args.question_id, args.option,
                                                args.user)
    print(json.dumps({"session_id": session.id, "message_id": mid}) if args.json else mid)
    return 0


def _wait_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError("must be from 0 to 60 seconds")
    return value


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             remote: argparse.ArgumentParser,
             load: Callable[[argparse.Namespace], Config]) -> None:
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
    p.set_defaults(func=lambda args: cmd_send(args, load))

    p = sub.add_parser("answer", parents=[common], help="answer an agent's question")
    p.add_argument("session", help="session id (the question card's session_id)")
    p.add_argument("question_id", metavar="QUESTION_ID", help="the card's questionId")
    p.add_argument("option", metavar="OPTION", help="the chosen option's value")
    p.add_argument("--user", default="", help="who answered (userId)")
    p.add_argument("--json", action="store_true",
                   help="print {session_id, message_id} as JSON")
    p.set_defaults(func=lambda args: cmd_answer(args, load))
