"""Agent groups as first-class: per-group overrides of how their agents run.

``[groups.<name>]`` tables in config.toml override, for one agent group, the
command (local) or image and command (Docker), environment variables (plain, or
read from files for secrets), extra mounts, limits, network, the group's agent
cap and the lifecycle timings. A key left out inherits the global value.

- ``load_groups(raw, base_dir)``: validate the ``[groups]`` tables (pure; the
  same one-line errors as the rest of the config; values are checked with the
  metadata of the global key they override, so the rules cannot drift apart);
- ``resolve(cfg, group)``: the effective ``AgentSettings`` of a group (pure,
  table-tested), and ``AgentSettings.digest``: a short hash of what the agent
  runs with, shown by ``status`` and set as a container label;
- ``read_env(settings)``: the I/O edge that reads the secret files at start.

Secret values live only in the agent's environment: they are never in the
config, the digest, the registry, a log line or ``status`` (the digest covers
the *path* of a secret file, not its content).

Settings are resolved when ``run`` starts. A changed setting reaches a group's
agents at their next start after an orchestrator restart; with
``on_shutdown = "leave"`` (the default) the restart never touches a working
agent, which keeps running with what it was started with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config.model import (
    ConfigError,
    DockerConfig,
    LifecycleConfig,
    RuntimeConfig,
    _check_value,
)
from orchestrator.contract.layout import InvalidId, validate_id

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.model import Config

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIX = "ORCHESTRATOR_"  # set by the runtimes themselves
MAX_SECRET_BYTES = 64 * 1024

# group key -> (section record, field) whose metadata (type, range, choices) it shares
_SHARED: dict[str, tuple[type, str]] = {
    "image": (DockerConfig, "image"),
    "network": (DockerConfig, "network"),
    "memory": (DockerConfig, "memory"),
    "cpus": (DockerConfig, "cpus"),
    "pids_limit": (DockerConfig, "pids_limit"),
    "mounts": (DockerConfig, "mounts"),
    "group_folder": (DockerConfig, "group_folder"),
    "idle_after": (LifecycleConfig, "idle_after"),
    "stop_idle_after": (LifecycleConfig, "stop_idle_after"),
    "ceiling": (LifecycleConfig, "ceiling"),
    "claim_stuck": (LifecycleConfig, "claim_stuck"),
}
_DOCKER_KEYS = ("image", "network", "memory", "cpus", "pids_limit", "mounts", "group_folder")
_LIFECYCLE_KEYS = ("idle_after", "stop_idle_after", "ceiling", "claim_stuck")
MAX_AGENTS_RANGE = (1, 100_000)


@dataclass(frozen=True)
class GroupConfig:
    """One ``[groups.<name>]`` table; ``None`` = inherit the global value."""

    name: str
    command: tuple[str, ...] | None = None
    image: str | None = None
    env: tuple[tuple[str, str], ...] | None = None
    env_files: tuple[tuple[str, str], ...] | None = None
    mounts: tuple[str, ...] | None = None
    group_folder: str | None = None
    memory: str | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    network: str | None = None
    max_agents: int | None = None
    idle_after: float | None = None
    stop_idle_after: float | None = None
    ceiling: float | None = None
    claim_stuck: float | None = None


GROUP_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GroupConfig) if f.name != "name")

# (example value, meaning) of each key, for `init`'s commented example and `group show`.
KEY_HELP: dict[str, tuple[str, str]] = {
    "command": ('["python3", "-m", "support_agent"]',
                "agent command: replaces [runtime] command (local) or [docker] command"),
    "image": ('"support-agent:2"', "Docker image of this group's agents"),
    "env": ('{ MODEL = "small" }', "environment variables of its agents"),
    "env_files": ('{ API_KEY = "/run/secrets/support_key" }',
                  "secret variables, read from these files at each start, never logged"),
    "mounts": ('["/srv/kb:/kb:ro"]', "Docker extra mounts, each under [docker] allowed_mounts"),
    "group_folder": ('"/srv/agents/support"',
                     "[docker] group_folder for this group (mounted at /workspace/agent)"),
    "memory": ('"1g"', "Docker memory limit"),
    "cpus": ("2.0", "Docker CPU limit"),
    "pids_limit": ("512", "Docker max processes in a container"),
    "network": ('"bridge"', "Docker network"),
    "max_agents": ("4", "most agents of this group running at once"),
    "idle_after": ("30.0", "[lifecycle] idle_after for this group"),
    "stop_idle_after": ("300.0", "[lifecycle] stop_idle_after for this group"),
    "ceiling": ("1800.0", "[lifecycle] ceiling for this group"),
    "claim_stuck": ("60.0", "[lifecycle] claim_stuck for this group"),
}


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
        if key in _SHARED:
            cls, fname = _SHARED[key]
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
        else:  # env / env_files
            values[key] = _env_table(f"{where} {key}", value, paths=key == "env_files",
                                     base_dir=base_dir)
    both = {k for k, _ in values.get("env", ())} & {k for k, _ in values.get("env_files", ())}
    if both:
        raise ConfigError(f"{where}: {sorted(both)[0]} is in both env and env_files; keep one")
    return GroupConfig(name=name, **values)


def load_groups(raw: Any, base_dir: Path) -> tuple[GroupConfig, ...]:
    """Validate the ``[groups]`` table into records, sorted by name. Pure."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[groups] must be a table of [groups.<name>] tables, got {raw!r}")
    return tuple(_load_group(name, raw[name], base_dir) for name in sorted(raw))


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


# --- effective settings -----------------------------------------------------------------


@dataclass(frozen=True)
class AgentSettings:
    """What one group's agents run with, after the overrides."""

    group: str
    kind: str  # local | docker
    runtime: RuntimeConfig  # effective [runtime] (command)
    docker: DockerConfig  # effective [docker] (image, command, network, limits, mounts)
    lifecycle: LifecycleConfig  # effective timings (host-side rules)
    env: tuple[tuple[str, str], ...] = ()
    env_files: tuple[tuple[str, str], ...] = ()
    max_agents: int | None = None

    @property
    def image(self) -> str | None:
        return self.docker.image if self.kind == "docker" else None

    def fingerprint(self) -> dict[str, Any]:
        """What the agent runs with, for the digest: the process or container side
        only (lifecycle timings are host rules, applied from the next ``run``).
        Secret files count by path, never by content."""
        base: dict[str, Any] = {"kind": self.kind, "env": [list(p) for p in self.env],
                                "env_files": [list(p) for p in self.env_files]}
        if self.kind == "docker":
            d = self.docker
            base.update(image=d.image, command=list(d.command), network=d.network,
                        memory=d.memory, cpus=d.cpus, pids_limit=d.pids_limit,
                        mounts=list(d.mounts), group_folder=d.group_folder)
        else:
            base.update(command=list(self.runtime.command))
        return base

    @property
    def digest(self) -> str:
        text = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        """For ``orchestrator group show``: values, secret names and paths, no secrets."""
        return {"group": self.group, "digest": self.digest, **self.fingerprint(),
                "env": dict(self.env), "env_files": dict(self.env_files),
                "max_agents": self.max_agents,
                "lifecycle": {k: getattr(self.lifecycle, k) for k in _LIFECYCLE_KEYS}}


def group_config(cfg: "Config", group: str) -> GroupConfig | None:
    return next((g for g in cfg.groups if g.name == group), None)


def resolve(cfg: "Config", group: str) -> AgentSettings:
    """The effective settings of ``group``: its overrides over the global values. Pure."""
    g = group_config(cfg, group) or GroupConfig(name=group)

    def given(keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: getattr(g, k) for k in keys if getattr(g, k) is not None}

    docker = dataclasses.replace(cfg.docker, **given(_DOCKER_KEYS))
    runtime = cfg.runtime
    if g.command is not None:
        if cfg.runtime.kind == "docker":
            docker = dataclasses.replace(docker, command=g.command)
        else:
            runtime = dataclasses.replace(runtime, command=g.command)
    return AgentSettings(
        group=group, kind=cfg.runtime.kind, runtime=runtime, docker=docker,
        lifecycle=dataclasses.replace(cfg.lifecycle, **given(_LIFECYCLE_KEYS)),
        env=g.env or (), env_files=g.env_files or (), max_agents=g.max_agents)


class SecretUnreadable(OSError):
    """An ``env_files`` file cannot be read. The message names the group, variable
    and path — never the content. An OSError, so a start fails like any other I/O
    failure: logged once, work kept pending, retried with backoff."""


def read_env(settings: AgentSettings) -> dict[str, str]:
    """The group's environment, secret files read now (at each agent start, so a
    rotated secret reaches the next agent). One trailing newline is dropped."""
    env = dict(settings.env)
    for key, path in settings.env_files:
        where = f"[groups.{settings.group}] env_files {key} ({path})"
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise SecretUnreadable(f"{where}: cannot read ({exc.strerror})") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretUnreadable(f"{where}: larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretUnreadable(f"{where}: not UTF-8 text") from None
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        if "\x00" in text:
            raise SecretUnreadable(f"{where}: contains a NUL byte")
        env[key] = text
    return env


def preflight(cfg: "Config") -> None:
    """Refuse, before ``run`` starts, Docker mounts (global or a group's) that are
    malformed or outside ``[docker] allowed_mounts``: one line (exit code 2), instead
    of every start of that group failing later."""
    if cfg.runtime.kind != "docker":
        return
    from orchestrator.runtime.docker.spec import MountNotAllowed, parse_extra_mounts

    for name in [None, *(g.name for g in cfg.groups)]:
        docker = cfg.docker if name is None else resolve(cfg, name).docker
        try:
            parse_extra_mounts(docker)
        except MountNotAllowed as exc:
            where = "" if name is None else f"[groups.{name}] mounts: "
            raise ConfigError(f"{where}{exc}") from None
