"""``orchestrator config show``: every effective key, its value and its origin.

Secrets appear by path only: the token and the webhook key are files
(``[api] token_file``, ``[delivery] secret_file``) and only their paths are keys; a
group's ``env_files`` are paths too. A group's ``env`` values are shown as
``"(set)"``: they are meant for plain settings, but someone may have put a key
there, and this output is pasted into issues.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Any

from orchestrator.config.model import SECTIONS, Config

HIDDEN = "(set)"


def plain(value: Any) -> Any:
    """A config value as JSON: paths as text, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)  # an egress credential: its secret file's path
    return value


def effective(cfg: Config, origins: dict[str, str]) -> list[dict[str, Any]]:
    """``[{key, value, origin}]`` in the file's order; origin is default, file, env or cli."""
    rows: list[dict[str, Any]] = [{"key": "data_dir", "value": str(cfg.data_dir),
             "origin": origins.get("data_dir", "default")}]
    for section in SECTIONS:
        record = getattr(cfg, section)
        for f in fields(record):
            label = f"[{section}] {f.name}"
            rows.append({"key": label, "value": plain(getattr(record, f.name)),
                         "origin": origins.get(label, "default")})
    for group in cfg.groups:
        for f in fields(group):
            value = getattr(group, f.name)
            if f.name == "name" or value is None:
                continue
            label = f"[groups.{group.name}] {f.name}"
            shown: Any = plain(value)
            if f.name in ("env", "env_files"):
                shown = {k: (HIDDEN if f.name == "env" else v) for k, v in value}
            rows.append({"key": label, "value": shown, "origin": origins.get(label, "file")})
    return rows
