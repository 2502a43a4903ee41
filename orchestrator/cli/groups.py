"""CLI commands for agent groups and schedules: ``group …``, ``series …``, and the
``--at`` / ``--every`` options of ``send``.

Kept apart from ``cli.py`` (which only wires them in) so the parser stays short.
Every refusal is one line on stderr and exit code 2 (``cli.commands.main`` catches the
ValueErrors raised here), and nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime

from orchestrator.config import groups
from orchestrator.config.model import Config
from orchestrator.contract.layout import registry_path, validate_id
from orchestrator.host import destinations, series
from orchestrator.host.registry import Registry
from orchestrator.rules import scheduling

# --- send --at / --every ------------------------------------------------------------------


def add_send_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--at", metavar="TIME", default=None,
                   help="process at TIME: ISO 8601 (no offset = [sessions] timezone) or +10m, "
                        "+1h30m, +45s, +2d")
    p.add_argument("--every", metavar="CRON", default=None,
                   help="recurring: a cron expression (5 fields, or 6 with seconds first) in "
                        "[sessions] timezone; first run at --at or the next cron time")


@dataclass(frozen=True, slots=True)
class Schedule:
    process_after: datetime | None = None
    recurrence: str | None = None
    series_id: str | None = None


def schedule_of(args: argparse.Namespace, cfg: Config | None, now: datetime) -> Schedule:
    """The --at / --every of a ``send``, checked before anything is written."""
    zone = cfg.sessions.timezone if cfg else "UTC"  # with --url: the server's files, UTC
    at = scheduling.parse_at(args.at, now, zone) if args.at else None
    if not args.every:
        return Schedule(at)
    expr = scheduling.check_cron(args.every)
    return Schedule(scheduling.first_run(expr, now, at, zone), expr, scheduling.new_series_id())


# --- group ------------------------------------------------------------------------------


def _registry(cfg: Config) -> Registry:
    return Registry(registry_path(cfg.data_dir))


def _reader(cfg: Config) -> Registry | None:
    """Read-only, like ``status``: listing writes nothing (None: no registry yet)."""
    return Registry.reader(registry_path(cfg.data_dir))


def cmd_group_list(args: argparse.Namespace, cfg: Config) -> int:
    """Configured groups and groups with sessions, with their settings digest."""
    known: set[str] = set()
    registry = _reader(cfg)
    if registry is not None:
        with registry:
            known = {s.agent_group_id for s in registry.sessions()}
    names = sorted(known | {g.name for g in cfg.groups})
    rows = [groups.resolve(cfg, n) for n in names]
    if args.json:
        print(json.dumps([s.describe() for s in rows], indent=2))
        return 0
    if not rows:
        print("no groups yet (configure [groups.<name>] or: orchestrator send --group NAME TEXT)")
        return 0
    configured = {g.name for g in cfg.groups}
    width = max(len(n) for n in names)
    for s in rows:
        where = "configured" if s.group in configured else "defaults"
        print(f"{s.group.ljust(width)}  {s.digest}  {where}"
              + (f"  image {s.image}" if s.image else ""))
    return 0


def cmd_group_show(args: argparse.Namespace, cfg: Config) -> int:
    """The effective settings (secret variables by name and file path only)."""
    validate_id(args.group, "agent group")
    print(json.dumps(groups.resolve(cfg, args.group).describe(), indent=2))
    return 0


def cmd_destinations(args: argparse.Namespace, cfg: Config) -> int:
    validate_id(args.group, "agent group")
    action = args.action or "list"
    with _registry(cfg) as registry:
        if action == "add":
            dest = destinations.parse(args.name, channel=args.channel, platform=args.platform,
                                      agent=args.agent, display_name=args.display_name)
            destinations.add(registry, args.group, dest)
            print(json.dumps({"group": args.group, "added": dest.name}) if args.json else
                  f"added destination {dest.name} to group {args.group} "
                  "(written into its sessions at their next wake)")
            return 0
        if action == "remove":
            destinations.remove(registry, args.group, args.name)
            print(json.dumps({"group": args.group, "removed": args.name}) if args.json
                  else f"removed destination {args.name} from group {args.group}")
            return 0
        rows = sorted(({"name": d.name, "type": d.type, "display_name": d.display_name,
                        "channel_type": d.channel_type, "platform_id": d.platform_id,
                        "target_agent_group_id": d.agent_group_id, "source": source}
                       for d, source in destinations.projected(registry, args.group)),
                      key=lambda row: row["name"] or "")
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"group {args.group} has no destinations (add one with: orchestrator group "
              f"destinations {args.group} add NAME --channel C --platform P)")
    else:
        for d in rows:
            target = (f"agent {d['target_agent_group_id']}" if d["type"] == "agent"
                      else f"channel {d['channel_type']} {d['platform_id']}")
            label = f"  ({d['display_name']})" if d.get("display_name") else ""
            print(f"{d['name']}  {target}  [{d['source']}]{label}")
    return 0


# --- series -----------------------------------------------------------------------------


def cmd_series_list(args: argparse.Namespace, cfg: Config) -> int:
    rows: list[series.SeriesRow] = []
    registry = _reader(cfg)
    if registry is not None:
        with registry:
            rows = series.collect(cfg.data_dir, registry, args.group)
    print(json.dumps(series.as_dicts(rows), indent=2) if args.json
          else series.render_table(rows))
    return 0


def cmd_series_cancel(args: argparse.Namespace, cfg: Config) -> int:
    with _registry(cfg) as registry:
        _, removed = series.cancel(cfg.data_dir, registry, args.series_id)
    print(json.dumps({"series_id": args.series_id, "removed": removed}) if args.json else
          f"cancelled series {args.series_id} ({removed} waiting occurrence(s) removed)")
    return 0


# --- wiring -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             load) -> None:
    """Add ``group`` and ``series`` to the CLI; ``load(args)`` reads the config."""

    def bind(p: argparse.ArgumentParser, fn) -> None:
        p.set_defaults(func=lambda args: fn(args, load(args)))

    g = sub.add_parser("group", help="agent groups: settings and destinations")
    gsub = g.add_subparsers(dest="group_command", required=True)
    p = gsub.add_parser("list", parents=[common], help="groups and their settings digest")
    p.add_argument("--json", action="store_true")
    bind(p, cmd_group_list)
    p = gsub.add_parser("show", parents=[common],
                        help="a group's effective settings (secrets by file path only)")
    p.add_argument("group", metavar="GROUP")
    bind(p, cmd_group_show)
    p = gsub.add_parser("destinations", parents=[common],
                        help="list, add or remove a group's destinations",
                        description="GROUP [list] | GROUP add NAME (--channel C --platform P | "
                                    "--agent G) [--display-name D] | GROUP remove NAME")
    p.add_argument("group", metavar="GROUP")
    p.add_argument("--json", action="store_true", help="print as JSON (list, add, remove)")
    dsub = p.add_subparsers(dest="action", required=False)
    # --config may also come after the action (SUPPRESS: not reset when it does not)
    late = argparse.ArgumentParser(add_help=False)
    late.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                      help="config file (default: ./config.toml)")
    dsub.add_parser("list", parents=[late], help="manual and automatic destinations (default)")
    a = dsub.add_parser("add", parents=[late], help="add a destination by hand")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--channel", default=None, help="channel type of the chat")
    a.add_argument("--platform", default=None, help="platform id of the chat")
    a.add_argument("--agent", default=None, metavar="GROUP", help="another agent group")
    a.add_argument("--display-name", default=None)
    r = dsub.add_parser("remove", parents=[late], help="remove a destination added by hand")
    r.add_argument("name", metavar="NAME")
    bind(p, cmd_destinations)

    s = sub.add_parser("series", help="recurring messages (send --every)")
    ssub = s.add_subparsers(dest="series_command", required=True)
    p = ssub.add_parser("list", parents=[common], help="every series, its next run and counts")
    p.add_argument("--group", default=None)
    p.add_argument("--json", action="store_true")
    bind(p, cmd_series_list)
    p = ssub.add_parser("cancel", parents=[common], help="stop a series")
    p.add_argument("series_id", metavar="SERIES")
    p.add_argument("--json", action="store_true", help="print {series_id, removed}")
    bind(p, cmd_series_cancel)

