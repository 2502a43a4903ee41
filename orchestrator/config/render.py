"""Rendering the commented default config (``orchestrator init``, the repo's config.toml).

Values go through tomli-w, comments come from the field metadata in ``model``
(the help text of every key, the example of every group key), so ``init``, the
committed config.toml and validation share one source.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomli_w

from orchestrator.config.model import GROUP_KEYS, KEY_HELP, SECTIONS
from orchestrator.config.sections import ConfigError


def render_example() -> list[str]:
    """Commented lines for the default config: every group key, none set."""
    lines = ["", "# Per agent group overrides: a [groups.<name>] table per group, every key",
             "# optional (unset keys inherit the values above). Read when 'run' starts: a",
             "# change reaches the group's next agent start, never a working agent. E.g.:",
             "# [groups.support]"]
    for key in GROUP_KEYS:
        example, meaning = KEY_HELP[key]
        lines += [f"# {key} = {example}", f"#   {meaning}"]
    return lines


def _default_value(f: Any) -> Any:
    value = f.default
    if f.metadata.get("shape") == "table":
        return dict(value)
    if f.metadata.get("shape") == "tolerations":
        return [dict(t) for t in value]
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def render_default(data_dir: str = "data") -> str:
    """The commented default config. Values go through tomli-w; comments are ours."""
    lines = [
        "# orchestrator configuration. Relative paths are relative to this file.",
        "# Every key is optional; these are the defaults.",
        "",
        "# sessions in <data_dir>/sessions, registry at <data_dir>/orchestrator.db",
        tomli_w.dumps({"data_dir": data_dir}).rstrip(),
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        for f in fields(cls):
            lines.append(f"# {f.metadata['help']}")
            value = _default_value(f)
            if isinstance(value, dict):  # inline, or tomli-w starts a sub-table here
                pairs = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items())
                lines.append(f"{f.name} = {{ {pairs} }}" if pairs else f"{f.name} = {{}}")
            else:
                lines.append(tomli_w.dumps({f.name: value}).rstrip())
    lines += render_example()
    return "\n".join(lines) + "\n"


def write_default(path: Path, *, force: bool = False) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; use --force to overwrite it")
    try:
        path.write_text(render_default(), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write config ({exc.strerror})") from None


if __name__ == "__main__":  # pragma: no cover - handy for regenerating config.toml
    sys.stdout.write(render_default())
