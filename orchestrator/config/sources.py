"""Configuration from the environment, and where each effective value came from.

Container platforms (compose, Kubernetes) configure through environment variables,
so every key of the file can be set as ``ORCHESTRATOR_<SECTION>__<KEY>`` (any case;
``ORCHESTRATOR_API__LISTEN``), a group's key as ``ORCHESTRATOR_GROUPS__<NAME>__<KEY>``
and ``data_dir`` as ``ORCHESTRATOR_DATA_DIR``. Precedence: command line >
environment > file > default.

A value is read as the file would hold it: a key whose default is a string takes
the variable's text as is (``ORCHESTRATOR_API__LISTEN=0.0.0.0:8750``, no quotes);
every other key takes a TOML value (``true``, ``5``, ``2.5``, ``["a", "b"]``,
``{ MODEL = "small" }``); an ``auto`` key takes ``auto`` or a number. The value is
then checked by the same rules as the file's (``load``), with the variable named in
the one-line error. A variable with a double underscore that names no key is an
error naming the nearest key: a typo must not silently leave the default in force.
Variables without ``__`` (``ORCHESTRATOR_URL``, ``ORCHESTRATOR_TOKEN``) are not
configuration and are left alone.

Group names: a variable's name holds only letters, digits and ``_``, so ``<NAME>``
matches a ``[groups.<name>]`` of the file case-insensitively, or else makes a new
group named ``<NAME>`` in lower case. A group whose name has ``.``, ``@``, ``+`` or
``-`` in it cannot be named in a variable: give it a table in the file (its keys
can then not be set from the environment either).
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Mapping

from orchestrator.config.model import GROUP_KEYS, GROUP_SHARED, SECTIONS
from orchestrator.config.sections import ConfigError

PREFIX = "ORCHESTRATOR_"
DATA_DIR_VAR = "ORCHESTRATOR_DATA_DIR"
ORIGINS = ("default", "file", "env", "cli")


@dataclass(frozen=True, slots=True)
class EnvValue:
    """One variable, parsed: ``path`` is ``("api", "listen")``, ``("groups", "support",
    "memory")`` or ``("data_dir",)``."""

    var: str
    path: tuple[str, ...]
    value: Any

    @property
    def where(self) -> str:
        if self.path[0] == "data_dir":
            return "data_dir"
        if self.path[0] == "groups":
            return f"[groups.{self.path[1]}] {self.path[2]}"
        return f"[{self.path[0]}] {self.path[1]}"


def _known_vars() -> dict[str, tuple[str, str]]:
    out = {f"{PREFIX}{section.upper()}__{f.name.upper()}": (section, f.name)
           for section, cls in SECTIONS.items() for f in fields(cls)}
    return out


def _plain_str(section: str, key: str) -> bool:
    """Whether the key takes the variable's text as is (a string key, not ``auto``)."""
    if section == "groups":
        if key in GROUP_SHARED:
            cls, name = GROUP_SHARED[key]
            f = next(f for f in fields(cls) if f.name == name)
            return isinstance(f.default, str) and not f.metadata.get("auto")
        return False  # command, env, env_files: lists and tables; max_agents: a number
    f = next(f for f in fields(SECTIONS[section]) if f.name == key)
    if f.metadata.get("path"):
        return True
    return isinstance(f.default, str) and not f.metadata.get("auto")


def parse_value(var: str, text: str, plain: bool) -> Any:
    """The variable's text as the file would hold the value (see the module doc)."""
    if plain:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.strip() and text.strip().replace("_", "").isalnum():
            return text.strip()  # a bare word ("auto"): checked as a string
        raise ConfigError(f"{var}: not a TOML value ({exc}); write it as in the file, "
                          'e.g. 5, 2.5, true, ["a", "b"] or { NAME = "value" }') from None


def _nearest(var: str, groups: list[str]) -> str:
    known = list(_known_vars()) + [DATA_DIR_VAR] + [
        f"{PREFIX}GROUPS__{g.upper()}__{k.upper()}" for g in groups or ["NAME"]
        for k in GROUP_KEYS]
    close = difflib.get_close_matches(var.upper(), known, n=1, cutoff=0.6)
    if not close:
        return "names are ORCHESTRATOR_<SECTION>__<KEY>, e.g. ORCHESTRATOR_API__LISTEN"
    hint = close[0]
    section_key = _known_vars().get(hint)
    label = f" ([{section_key[0]}] {section_key[1]})" if section_key else ""
    return f"did you mean {hint}{label}?"


def _group_name(raw: str, file_groups: list[str]) -> str:
    for name in file_groups:
        if name.lower() == raw.lower():
            return name
    return raw.lower()


def env_values(environ: Mapping[str, str], file_groups: list[str] | None = None
               ) -> list[EnvValue]:
    """The configuration variables of ``environ``, parsed (not yet checked against the
    key's rules: ``load`` does that, naming the variable). ConfigError for a variable
    that looks like configuration and names no key."""
    groups = list(file_groups or [])
    known = _known_vars()
    out = []
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith(PREFIX):
            continue
        text = environ[var]
        if upper == DATA_DIR_VAR:
            out.append(EnvValue(var, ("data_dir",), text))
            continue
        if "__" not in upper:
            continue  # ORCHESTRATOR_URL, ORCHESTRATOR_TOKEN: not configuration
        if upper in known:
            section, key = known[upper]
            out.append(EnvValue(var, (section, key),
                                parse_value(var, text, _plain_str(section, key))))
            continue
        parts = var[len(PREFIX):].split("__")
        if (len(parts) == 3 and parts[0].upper() == "GROUPS" and parts[1]
                and parts[2].lower() in GROUP_KEYS):
            key = parts[2].lower()
            out.append(EnvValue(var, ("groups", _group_name(parts[1], groups), key),
                                parse_value(var, text, _plain_str("groups", key))))
            continue
        raise ConfigError(f"{var}: no such configuration key; {_nearest(var, groups)}")
    return out


def cli_values(sets: list[str] | tuple[str, ...], file_groups: list[str] | None = None
               ) -> list[EnvValue]:
    """``--set SECTION.KEY=VALUE`` (``--set groups.NAME.KEY=VALUE``), read as the
    variable ``ORCHESTRATOR_<SECTION>__<KEY>`` would be; errors name the option."""
    out = []
    for item in sets:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts) or len(parts) not in (2, 3):
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. "
                              "--set api.listen=127.0.0.1:9000")
        var = PREFIX + "__".join(parts).upper()
        try:
            (ev,) = env_values({var: text}, file_groups)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(var, f"--set {key.strip()}", 1)) from None
        out.append(EnvValue(f"--set {key.strip()}", ev.path, ev.value))
    return out


def overlay(data: dict[str, Any], values: list[EnvValue]) -> dict[str, Any]:
    """A copy of the file's TOML dict with the environment's values put in."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for ev in values:
        if ev.path[0] == "data_dir":
            out["data_dir"] = ev.value
            continue
        table = out.setdefault(ev.path[0], {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{ev.path[0]}] must be a table, got {table!r}")
        if ev.path[0] == "groups":
            group = dict(table.get(ev.path[1], {}))
            group[ev.path[2]] = ev.value
            table[ev.path[1]] = group
        else:
            table[ev.path[1]] = ev.value
    return out


def origins(data: dict[str, Any], values: list[EnvValue], cli: tuple[str, ...] = ()
            ) -> dict[str, str]:
    """Where each key's value comes from, by its label (``[api] listen``): ``cli``
    (``--set``, or a label in ``cli``), else ``env``, else ``file``, else ``default``."""
    out = {"data_dir": "file" if "data_dir" in data else "default"}
    for section, cls in SECTIONS.items():
        raw = data.get(section)
        for f in fields(cls):
            out[f"[{section}] {f.name}"] = ("file" if isinstance(raw, dict) and f.name in raw
                                            else "default")
    groups = data.get("groups")
    for name, table in (groups.items() if isinstance(groups, dict) else ()):
        for key in (table if isinstance(table, dict) else {}):
            out[f"[groups.{name}] {key}"] = "file"
    for ev in values:
        out[ev.where] = "cli" if ev.var.startswith("--set ") else "env"
    for label in cli:
        out[label] = "cli"
    return out


def blame(exc: ConfigError, values: list[EnvValue]) -> ConfigError:
    """A check of the whole config that failed on a value from the environment names
    the variable too (the file did not say it)."""
    text = str(exc)
    for ev in values:
        if ev.where in text:
            return ConfigError(f"{ev.var}: {text}")
    return exc
