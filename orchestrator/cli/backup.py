"""``orchestrator backup DEST [--json]``: a consistent copy of the registry and the event
log while ``run`` runs (``host.backup``: SQLite's online backup API, in this process).
Restoring is a documented procedure (README, "Operating it"): stop ``run``, copy the
files back, start it; an older copy is brought up to date by its schema migrations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from orchestrator import version
from orchestrator.config.model import Config
from orchestrator.host.backup import backup


def cmd_backup(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    cfg = load(args)
    dest = Path(args.dest).absolute()
    copied = backup(cfg.data_dir, dest, version=version())
    if args.json:
        print(json.dumps({"dest": str(dest), "files": [
            {"name": c.name, "path": c.path, "bytes": c.bytes, "schema_version": c.schema_version,
             "seconds": c.seconds} for c in copied]}))
        return 0
    for c in copied:
        print(f"{c.name}: {c.bytes} bytes, schema version {c.schema_version}, "
              f"{c.seconds:g} s -> {c.path}")
    print(f"backup of {cfg.data_dir} in {dest}; the session folders, delivered/ and the "
          "channel's files are copied as files (README: Operating it)")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             load: Callable[[argparse.Namespace], Config]) -> None:
    p = sub.add_parser("backup", parents=[common],
                       help="copy the registry and the event log consistently, also while "
                            "run is running")
    p.add_argument("dest", metavar="DEST", help="a new or empty folder for the copies")
    p.add_argument("--json", action="store_true",
                   help="print {dest, files: [{name, path, bytes, schema_version, seconds}]}")
    p.set_defaults(func=lambda args: cmd_backup(args, load))
