"""Reading and validating the TOML into records: ``load_config`` and ``read_config``.

``load_config(data, base_dir)`` does no I/O, so every validation rule is
table-tested without files; ``read_config(path)`` is the thin I/O edge. The rules
come from the field metadata in ``model`` (a ``[groups.<name>]`` key is checked
with the metadata of the global key it overrides, so the two cannot drift apart).
Every error is one line naming the key and what is allowed (CLI exit code 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from loguru import logger

from orchestrator.config import sources
from orchestrator.config.egress import check_egress_hosts, egress_value
from orchestrator.config.model import (
    GROUP_KEYS,
    GROUP_SHARED,
    MAX_AGENTS_RANGE,
    SECTIONS,
    Config,
    GroupConfig,
)
from orchestrator.config.sections import ConfigError
from orchestrator.contract.layout import InvalidId, validate_id

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIX = "ORCHESTRATOR_"  # set by the runtimes themselves


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _check_value(where: str, f: Any, value: Any, base_dir: Path) -> Any:
    meta = f.metadata
    default = f.default
    if meta.get("shape") == "table":
        return _check_label_table(where, value)
    if meta.get("shape") == "tolerations":
        return _check_tolerations(where, value)
    if isinstance(default, tuple):
        return _check_str_list(where, value)
    if meta.get("auto"):  # "auto" or a whole number in range
        return _check_auto(where, meta, value)
    if meta.get("path"):
        return _check_path(where, value)
    value = _check_type(where, type(default), value)
    _check_allowed(where, meta, value)
    return value


def _check_str_list(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


# Kubernetes label keys (optional DNS prefix + name) and values, as the API checks them
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?"
                       r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$")
TOLERATION_KEYS = {"key": str, "operator": str, "value": str, "effect": str,
                   "tolerationSeconds": int}


def _check_label_table(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    """A table of Kubernetes labels (``node_selector``) as sorted (key, value) pairs."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table of label = \"value\", got {value!r}")
    for key, v in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise ConfigError(f"{where}: {key!r} is not a Kubernetes label key")
        if not isinstance(v, str) or not LABEL_NAME.fullmatch(v):
            raise ConfigError(f"{where} {key} must be a label value (up to 63 of A-Z a-z "
                              f"0-9 . _ -, alphanumeric at both ends), got {v!r}")
    return tuple(sorted(value.items()))


def _check_tolerations(where: str, value: Any) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """A list of toleration tables, each kept as sorted (field, value) pairs."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{where} must be a list of tables, e.g. [{{ key = \"agents\", "
                          "operator = \"Exists\", effect = \"NoSchedule\" }]")
    out = []
    for t in value:
        for k, v in t.items():
            kind = TOLERATION_KEYS.get(k)
            if kind is None:
                raise ConfigError(f"{where}: unknown toleration field {k!r}: allowed are "
                                  f"{', '.join(TOLERATION_KEYS)}")
            if isinstance(v, bool) or not isinstance(v, kind):
                raise ConfigError(f"{where} {k} must be {_TYPE_NAMES[kind]}, got {v!r}")
        if t.get("operator", "Equal") not in ("Equal", "Exists"):
            raise ConfigError(f"{where} operator must be 'Equal' or 'Exists', got "
                              f"{t['operator']!r}")
        if t.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ConfigError(f"{where} effect must be 'NoSchedule', 'PreferNoSchedule' or "
                              f"'NoExecute', got {t['effect']!r}")
        out.append(tuple(sorted(t.items())))
    return tuple(out)


def _check_kubernetes(k8s: Any) -> None:
    """The [kubernetes] values the API server would refuse, refused here in one line."""
    if not DNS_LABEL.fullmatch(k8s.namespace):
        raise ConfigError(f"[kubernetes] namespace {k8s.namespace!r} is not a DNS-1123 label "
                          "(lower-case letters, digits and '-', up to 63)")
    if not k8s.instance or not LABEL_NAME.fullmatch(k8s.instance):
        raise ConfigError(f"[kubernetes] instance {k8s.instance!r} must be a label value (up "
                          "to 63 of A-Z a-z 0-9 . _ -, alphanumeric at both ends)")
    for key in ("service_account", "runtime_class", "node_name"):
        value = getattr(k8s, key)
        if value and not DNS_NAME.fullmatch(value):
            raise ConfigError(f"[kubernetes] {key} {value!r} is not a DNS-1123 name")
    if not k8s.image:
        raise ConfigError("[kubernetes] image must not be empty")
    if not k8s.command:
        raise ConfigError("[kubernetes] command must be a non-empty list of strings")
    if k8s.user != "auto" and not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", k8s.user):
        raise ConfigError(f"[kubernetes] user {k8s.user!r}: write 'auto' or 'UID:GID' "
                          "(numbers above 0: agents never run as root)")
    check_quantities("[kubernetes]", k8s)


def check_quantities(where: str, values: Any) -> None:
    for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
        value = getattr(values, key)
        if value is not None and value != "" and not QUANTITY.fullmatch(value):
            raise ConfigError(f"{where} {key} {value!r} is not a Kubernetes quantity; "
                              "write e.g. '500m', '2', '256Mi' or '1Gi'")


def _check_auto(where: str, meta: Any, value: Any) -> Any:
    if value == "auto":
        return value
    lo, hi = meta["min"], meta["max"]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be \"auto\" or a whole number from {lo:g} to "
                          f"{hi:g} (0 = no cap), got {value!r}")
    return value


def _check_path(where: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty path string, got {value!r}")
    return value  # resolved against data_dir by the caller


def _check_type(where: str, expected: type, value: Any) -> Any:
    """``value`` as the type of the key's default (an integer where a number goes)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"{where} must be {_TYPE_NAMES[expected]}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):  # nan passes every range check
        raise ConfigError(f"{where} must be a number, got nan")
    return value


def _check_allowed(where: str, meta: Any, value: Any) -> None:
    """The key's ``choices`` and ``min``/``max`` from its metadata."""
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{where} must be one of {allowed}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{where} must be between {lo:g} and {hi:g}, got {value!r}")


def _load_section(name: str, cls: type, raw: Any, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        for key in [k for k in unknown if (name, k) in REMOVED]:
            logger.warning("[{}] {} is no longer read and has no effect ({}): delete the "
                           "line", name, key, REMOVED[(name, key)])
            raw = {k: v for k, v in raw.items() if k != key}
            unknown.remove(key)
    if unknown:
        if (name, unknown[0]) in RENAMED:
            raise ConfigError(f"[{name}] {unknown[0]} is no longer read: write "
                              f"{RENAMED[(name, unknown[0])]}")
        raise ConfigError(
            f"unknown key [{name}] {unknown[0]}: allowed keys are {', '.join(known)}"
        )
    values = {k: _check_value(f"[{name}] {k}", known[k], v, base_dir) for k, v in raw.items()}
    return cls(**values)


EVENT_KINDS = ("status", "failure")
# keys that once were read and now do nothing: a warning, never a refusal to start
REMOVED = {("docker", "precreate"): "a session's next container is created ahead by "
           "[docker] prepared_containers now (after its agent stopped, with a network "
           "namespace made ahead)"}
RENAMED = {("delivery", "secret_file"): 'secret_files = ["<file>"] (a list: several keys '
           'sign at once, for rotation)'}


def _secret_files(names: tuple[str, ...], data_dir: Path) -> tuple[str, ...]:
    if not names or not all(names):
        raise ConfigError("[delivery] secret_files must list at least one file, e.g. "
                          '["webhook-secret"]')
    return tuple(str(data_dir / Path(n).expanduser()) for n in names)


def _check_events(kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        if kind not in EVENT_KINDS:
            allowed = ", ".join(repr(k) for k in EVENT_KINDS)
            raise ConfigError(f"[delivery] events: each must be one of {allowed}, got {kind!r}")


def load_config(data: dict[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML dict into a Config. Pure: no files are touched.

    Relative paths are relative to ``base_dir`` (the config file's folder);
    ``[delivery] path`` is relative to ``data_dir``.
    """
    top = {"data_dir", "groups"} | set(SECTIONS)
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}: allowed top-level keys are "
                          f"{', '.join(sorted(top))}")
    raw_dir = data.get("data_dir", "data")
    if not isinstance(raw_dir, str) or not raw_dir:
        raise ConfigError(f"data_dir must be a non-empty path string, got {raw_dir!r}")
    data_dir = (base_dir / Path(raw_dir).expanduser()).resolve()
    sections = {name: _load_section(name, cls, data.get(name, {}), base_dir)
                for name, cls in SECTIONS.items()}
    delivery = sections["delivery"]
    sections["delivery"] = dataclasses.replace(
        delivery, path=(data_dir / Path(str(delivery.path)).expanduser()),
        secret_files=_secret_files(delivery.secret_files, data_dir))
    _check_events(delivery.events)
    if delivery.events and delivery.channel != "webhook":
        raise ConfigError(f"[delivery] events is for the webhook channel (channel = "
                          f"{delivery.channel!r}); remove it, or read GET /v1/events")
    if delivery.channel == "webhook" and not delivery.url.startswith(("http://", "https://")):
        raise ConfigError(f"[delivery] url must be an http:// or https:// URL for the webhook "
                          f"channel, got {delivery.url!r}")
    api = sections["api"]
    if api.token_file:
        sections["api"] = dataclasses.replace(
            api, token_file=str(data_dir / Path(api.token_file).expanduser()))
    sections["cluster"] = _check_cluster(sections["cluster"], data_dir)
    _check_timezone(sections["sessions"].timezone)
    _check_kubernetes(sections["kubernetes"])
    parse_range(sections["runtime"].uid_range)  # refused here, before anything is opened
    groups = load_groups(data.get("groups", {}), base_dir)
    return Config(data_dir=data_dir, source=source, groups=groups, **sections)


def _check_cluster(cluster: Any, data_dir: Path) -> Any:
    """[cluster]: members parse, the shard is one of them (static), peer_token_file
    resolved against data_dir."""
    from orchestrator.config.cluster import MEMBER_ID, parse_member

    if cluster.shard and not MEMBER_ID.fullmatch(cluster.shard):
        raise ConfigError(f"[cluster] shard {cluster.shard!r}: letters, digits, '.', '_', '-'")
    if cluster.shard and cluster.discovery == "static":
        try:
            ids = [parse_member(m).id for m in cluster.members]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len(set(ids)) != len(ids):
            raise ConfigError(f"[cluster] members: an id is listed twice ({', '.join(ids)})")
        if cluster.shard not in ids:
            raise ConfigError(f"[cluster] shard {cluster.shard!r} is not in [cluster] members "
                              f"({', '.join(ids) or 'none'}): list every shard, this one too")
    if cluster.discovery == "kubernetes" and not all(
            k.strip() and sep for k, sep, _ in (p.partition("=")
                                                for p in cluster.pod_label.split(","))):
        raise ConfigError(f"[cluster] pod_label {cluster.pod_label!r}: write "
                          "'KEY=VALUE[,KEY=VALUE]'")
    if cluster.peer_token_file:
        cluster = dataclasses.replace(
            cluster, peer_token_file=str(data_dir / Path(cluster.peer_token_file).expanduser()))
    return cluster


DEFAULT_RANGE = (200000, 299999)


def parse_range(text: str, *, default: tuple[int, int] | None = DEFAULT_RANGE
                ) -> tuple[int, int] | None:
    """``"LO-HI"`` (inclusive, both above 0, LO <= HI) -> (LO, HI); ``""`` -> None;
    ``"auto"`` -> ``default``."""
    text = text.strip()
    if text == "auto":
        return default
    if not text:
        return None
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if not match or not 0 < int(match.group(1)) <= int(match.group(2)) < 2**31 - 1:
        raise ConfigError(f"[runtime] uid_range {text!r}: write LOW-HIGH, e.g. "
                          "\"200000-299999\" (uids above 0), \"auto\" or \"\" (one uid for all)")
    return int(match.group(1)), int(match.group(2))


def _check_timezone(name: str) -> None:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"[sessions] timezone {name!r} is not a known IANA time zone; "
                          "use e.g. 'UTC' or 'Europe/Berlin'") from None


def read_config(path: Path, environ: Mapping[str, str] | None = None,
                sets: tuple[str, ...] = ()) -> Config:
    """Read and validate a config file with the environment's overrides
    (``ORCHESTRATOR_<SECTION>__<KEY>``, see ``sources``; ``environ`` defaults to
    ``os.environ``) and the command line's (``--set``: ``sets``), which win; every
    failure is a one-line ConfigError."""
    return read_config_sources(path, environ, sets)[0]


def read_config_sources(path: Path, environ: Mapping[str, str] | None = None,
                        sets: tuple[str, ...] = ()) -> tuple[Config, dict[str, str]]:
    """``read_config`` and where each value came from (``sources.origins``)."""
    data = _read_toml(path)
    groups = data.get("groups")
    names = list(groups) if isinstance(groups, dict) else []
    values = sources.env_values(os.environ if environ is None else environ, names)
    values += sources.cli_values(sets, names)  # last: the command line wins
    try:
        cfg = load_config(sources.overlay(data, values), path.resolve().parent, source=path)
    except ConfigError as exc:
        blamed = sources.blame(exc, values)
        raise (blamed if blamed is not exc else ConfigError(f"{path}: {exc}")) from None
    return cfg, sources.origins(data, values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; create one with "
                          "'orchestrator init'") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text: {exc.reason} at byte "
                          f"{exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


# --- [groups.<name>] tables ------------------------------------------------------------


def _env_table(where: str, raw: Any, *, paths: bool, base_dir: Path
               ) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table of NAME = \"value\", got {raw!r}"
                          if not paths else f"{where} must be a table of NAME = \"/path\"")
    out = []
    for key, value in raw.items():
        if not ENV_NAME.fullmatch(key):
            raise ConfigError(f"{where}: {key!r} is not a valid variable name "
                              "(letters, digits and _, not starting with a digit)")
        if key.upper().startswith(RESERVED_ENV_PREFIX):
            raise ConfigError(f"{where}: {key} is reserved (the runtime sets "
                              f"{RESERVED_ENV_PREFIX}* itself); use another name")
        if paths:
            if not isinstance(value, str) or not value or "\x00" in value:
                raise ConfigError(f"{where} {key} must be a non-empty path string")
            value = str((base_dir / Path(value).expanduser()).resolve())
        elif not isinstance(value, str) or "\x00" in value:
            # never echo the value: it may be a secret someone put in the wrong table
            raise ConfigError(f"{where} {key} must be a string without NUL characters")
        out.append((key, value))
    return tuple(sorted(out))


def _load_group(name: str, raw: Any, base_dir: Path) -> GroupConfig:
    try:
        validate_id(name, "agent group")
    except InvalidId as exc:
        raise ConfigError(f"[groups.{name}]: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"[groups.{name}] must be a table, got {raw!r}")
    unknown = sorted(set(raw) - set(GROUP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key [groups.{name}] {unknown[0]}: allowed keys are "
                          f"{', '.join(GROUP_KEYS)}")
    where = f"[groups.{name}]"
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in GROUP_SHARED:
            cls, fname = GROUP_SHARED[key]
            f = next(f for f in fields(cls) if f.name == fname)
            values[key] = _check_value(f"{where} {key}", f, value, base_dir)
        elif key == "command":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{where} command must be a non-empty list of strings, "
                                  f"got {value!r}")
            values[key] = tuple(value)
        elif key == "max_agents":
            lo, hi = MAX_AGENTS_RANGE
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{where} max_agents must be an integer between {lo} and "
                                  f"{hi}, got {value!r}")
            values[key] = value
        elif key in ("egress", "egress_credentials"):
            values[key] = egress_value(f"{where} {key}", key, value, base_dir)
        else:  # env / env_files
            values[key] = _env_table(f"{where} {key}", value, paths=key == "env_files",
                                     base_dir=base_dir)
    both = {k for k, _ in values.get("env", ())} & {k for k, _ in values.get("env_files", ())}
    if both:
        raise ConfigError(f"{where}: {sorted(both)[0]} is in both env and env_files; keep one")
    check_egress_hosts(where, values.get("egress") or (), values.get("egress_credentials") or ())
    return _check_group_kubernetes(where, GroupConfig(name=name, **values))


def _check_group_kubernetes(where: str, group: GroupConfig) -> GroupConfig:
    check_quantities(where, group)
    for key in ("service_account", "runtime_class"):
        value = getattr(group, key)
        if value and not DNS_NAME.fullmatch(value):
            raise ConfigError(f"{where} {key} {value!r} is not a DNS-1123 name")
    return group


def load_groups(raw: Any, base_dir: Path) -> tuple[GroupConfig, ...]:
    """Validate the ``[groups]`` table into records, sorted by name. Pure."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[groups] must be a table of [groups.<name>] tables, got {raw!r}")
    return tuple(_load_group(name, raw[name], base_dir) for name in sorted(raw))

