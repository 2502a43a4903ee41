"""Configuration: frozen records loaded by a pure function from the TOML dict.

``load_config(data, base_dir)`` does no I/O, so every validation rule is
table-tested without files. ``read_config(path)`` is the thin I/O edge, and
``render_default()`` writes the commented default (values serialised by tomli-w).
Every error is one line naming the key and what is allowed (CLI exit code 2).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from orchestrator.support.errors import UserError


class ConfigError(UserError, ValueError):
    """One-line, user-facing: names the file/key and the fix."""


def _opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, path: bool = False, auto: bool = False) -> Any:
    meta = {"help": help, "choices": choices, "min": min, "max": max, "path": path,
            "auto": auto}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RuntimeConfig:
    kind: str = _opt("local", "where agents run", choices=("local", "docker"))
    command: tuple[str, ...] = _opt(
        ["{python}", "-m", "orchestrator.agent"],
        "local runtime: agent command; {python} = this interpreter; --workspace DIR is appended",
    )
    on_shutdown: str = _opt(
        "leave", "on Ctrl-C/SIGTERM: 'leave' agents running (re-adopted on restart) or 'stop' them",
        choices=("leave", "stop"),
    )
    stop_grace: float = _opt(10.0, "seconds between SIGTERM and SIGKILL", min=0, max=600)
    start_retry_max: float = _opt(
        15.0, "cap (s) of the backoff when an agent cannot be started (e.g. Docker down)",
        min=1, max=3600)
    # "auto" is resolved when the supervisor starts (admission.resolve_max_agents), so
    # this file stays the same on every host; the reason is rendered as its comment.
    max_agents: int | str = _opt(
        "auto", "most agents running at once; 0 = no cap. 'auto' = min(4 x CPU count, "
        "3/4 of RAM / [docker] memory), at least 1: agents mostly wait on a model API, so "
        "a few share a core, but each may use its whole memory limit and the host must "
        "not swap", min=0, max=1_000_000, auto=True)
    make_room_after: float = _opt(
        2.0, "when work is queued at the cap, an agent with no claim and no due work that "
             "has done nothing for this long (s) is stopped to make room", min=0, max=86400)


@dataclass(frozen=True)
class DockerConfig:
    image: str = _opt("orchestrator-agent:latest", "agent image (build it: orchestrator image build)")
    command: tuple[str, ...] = _opt(
        ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace"], "container command")
    instance: str = _opt("default", "label value that marks this orchestrator's containers")
    network: str = _opt("none", "container network; agents calling remote APIs need e.g. 'bridge'")
    user: str = _opt("auto", "'auto' = owner of data_dir, or 'UID:GID'")
    memory: str = _opt("512m", "memory limit")
    cpus: float = _opt(1.0, "CPU limit", min=0.01, max=1024)
    pids_limit: int = _opt(256, "max processes in a container", min=1, max=1_000_000)
    read_only_rootfs: bool = _opt(True, "read-only root filesystem (with a tmpfs /tmp)")
    cap_drop: tuple[str, ...] = _opt(["ALL"], "capabilities dropped")
    no_new_privileges: bool = _opt(True, "set no-new-privileges")
    mounts: tuple[str, ...] = _opt([], "extra mounts 'HOST:CONTAINER[:ro]', each under allowed_mounts")
    allowed_mounts: tuple[str, ...] = _opt([], "host folders extra mounts may come from")
    group_folder: str = _opt(
        "", "a group's folder, mounted rw at /workspace/agent (NanoClaw images read "
        "container.json there); {data_dir} and {group} are filled in, e.g. "
        "'{data_dir}/groups/{group}'; empty = none")
    base_url: str = _opt("", "Docker daemon URL; empty = DOCKER_HOST or the local socket")
    precreate: int = _opt(
        0, "containers created ahead for the sessions stopped most recently, so their next "
        "start skips docker create (each shows in docker ps -a); 0 = off", min=0, max=1000)


@dataclass(frozen=True)
class LifecycleConfig:
    idle_after: float = _opt(30.0, "seconds without heartbeat, reply or claim before 'idle'",
                             min=0.01, max=86400)
    stop_idle_after: float = _opt(300.0, "seconds idle before the agent is stopped",
                                  min=0, max=7 * 86400)
    pause_idle_after: float = _opt(
        0.0, "seconds idle before the agent is frozen (docker pause / SIGSTOP; resumed in ms "
        "when work arrives, still stopped after stop_idle_after); 0 = never",
        min=0, max=7 * 86400)
    ceiling: float = _opt(1800.0, "kill when the heartbeat is older than this (s)",
                          min=0.1, max=7 * 86400)
    claim_stuck: float = _opt(60.0, "kill when a claim is older than this with no heartbeat (s)",
                              min=0.1, max=86400)
    max_tries: int = _opt(5, "tries before a message is marked failed", min=1, max=100)
    backoff_base: float = _opt(5.0, "retry backoff: base * 2^tries seconds", min=0, max=3600)
    answer_wait: float = _opt(
        600.0, "seconds an acked message may wait for its reply, keeping the agent busy; "
        "if the agent stops or dies first, the message is retried", min=0, max=7 * 86400)


@dataclass(frozen=True)
class WatchConfig:
    mode: str = _opt("events", "'events' (inotify) or 'poll' (network / shared file systems)",
                     choices=("events", "poll"))
    poll_interval: float = _opt(1.0, "poll mode: seconds between scans", min=0.05, max=3600)
    sweep_interval: float = _opt(30.0, "seconds between full reconcile sweeps", min=0.05, max=86400)
    debounce_ms: int = _opt(50, "watchfiles debounce (max batch length, ms)", min=1, max=10000)
    step_ms: int = _opt(3, "watchfiles step (quiet time that ends a batch, ms)", min=1, max=1000)
    quiet_step_ms: int = _opt(20, "watchfiles step once quiet_after s pass with no change (ms)",
                              min=1, max=1000)
    quiet_after: float = _opt(2.0, "seconds without any change before quiet_step_ms applies",
                              min=0, max=3600)


@dataclass(frozen=True)
class DeliveryConfig:
    channel: str = _opt("jsonl", "'log', 'jsonl' or 'webhook'", choices=("log", "jsonl", "webhook"))
    path: Path = _opt("delivered.jsonl", "jsonl channel output, relative to data_dir", path=True)
    url: str = _opt("", "webhook channel: the URL each reply is POSTed to")
    secret_file: Path = _opt("webhook-secret", "webhook channel: HMAC-SHA256 key, relative to "
                             "data_dir (created with mode 0600 if missing)", path=True)
    timeout: float = _opt(10.0, "webhook channel: seconds before a POST counts as failed",
                          min=0.1, max=600)
    max_file_bytes: int = _opt(1024 * 1024, "webhook channel: reply files up to this size are "
                               "sent inline (base64); larger ones as name and size only",
                               min=0, max=2**31)
    max_attempts: int = _opt(5, "attempts before a reply is recorded failed", min=1, max=1000)
    retry_base: float = _opt(2.0, "delivery retry backoff: base * 2^attempts seconds",
                             min=0, max=3600)
    files_wait: float = _opt(60.0, "seconds a reply waits for its outbox/ files before "
                             "that counts as a failed attempt", min=0, max=86400)
    max_content_bytes: int = _opt(1024 * 1024, "largest reply content in bytes; a bigger "
                                  "reply is failed with its reason, never loaded whole",
                                  min=1, max=2**31)


@dataclass(frozen=True)
class SessionsConfig:
    default_mode: str = _opt("shared", "session resolution mode",
                             choices=("shared", "per-thread", "agent-shared"))
    max_attachment_bytes: int = _opt(25 * 1024 * 1024, "largest decoded attachment",
                                     min=1, max=2**40)
    timezone: str = _opt("UTC", "IANA time zone of 'send --at' times without an offset and "
                         "of 'send --every' cron expressions, e.g. 'Europe/Berlin'")


@dataclass(frozen=True)
class ApiConfig:
    listen: str = _opt("127.0.0.1:8750", "HTTP API: 'HOST:PORT', 'unix:/path', or '' for no API")
    token_file: str = _opt("api-token", "bearer token of /v1, relative to data_dir (created "
                           "with mode 0600 if missing); '' = no token (loopback only)")
    metrics_auth: bool = _opt(False, "require the token for /metrics too")


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt("INFO", "log level",
                      choices=("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"))
    json: bool = _opt(False, "one JSON object per log line")


SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig,
    "docker": DockerConfig,
    "lifecycle": LifecycleConfig,
    "watch": WatchConfig,
    "delivery": DeliveryConfig,
    "sessions": SessionsConfig,
    "api": ApiConfig,
    "log": LogConfig,
}


@dataclass(frozen=True)
class Config:
    data_dir: Path
    runtime: RuntimeConfig = RuntimeConfig()
    docker: DockerConfig = DockerConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    watch: WatchConfig = WatchConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    sessions: SessionsConfig = SessionsConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    groups: tuple = ()  # of groups.GroupConfig, sorted by name: [groups.<name>] overrides
    source: Path | None = None

    def replace(self, **sections: Any) -> "Config":
        """A copy with some keys changed, e.g. ``cfg.replace(lifecycle={"idle_after": 1})``."""
        changes = {}
        for name, values in sections.items():
            if name in SECTIONS:
                changes[name] = dataclasses.replace(getattr(self, name), **values)
            else:
                changes[name] = values
        return dataclasses.replace(self, **changes)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _check_value(where: str, f: Any, value: Any, base_dir: Path) -> Any:
    meta = f.metadata
    default = f.default
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if meta.get("auto"):  # "auto" or a whole number in range
        if value == "auto":
            return value
        lo, hi = meta["min"], meta["max"]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{where} must be \"auto\" or a whole number from {lo:g} to "
                              f"{hi:g} (0 = no cap), got {value!r}")
        return value
    if meta.get("path"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty path string, got {value!r}")
        return value  # resolved against data_dir by the caller
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"{where} must be {_TYPE_NAMES[expected]}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):  # nan passes every range check
        raise ConfigError(f"{where} must be a number, got nan")
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{where} must be one of {allowed}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{where} must be between {lo:g} and {hi:g}, got {value!r}")
    return value


def _load_section(name: str, cls: type, raw: Any, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key [{name}] {unknown[0]}: allowed keys are {', '.join(known)}"
        )
    values = {k: _check_value(f"[{name}] {k}", known[k], v, base_dir) for k, v in raw.items()}
    return cls(**values)


def load_config(data: dict[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML dict into a Config. Pure: no files are touched.

    Relative paths are relative to ``base_dir`` (the config file's folder);
    ``[delivery] path`` is relative to ``data_dir``.
    """
    from orchestrator.config.groups import load_groups  # groups builds on this module

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
        secret_file=(data_dir / Path(str(delivery.secret_file)).expanduser()))
    if delivery.channel == "webhook" and not delivery.url.startswith(("http://", "https://")):
        raise ConfigError(f"[delivery] url must be an http:// or https:// URL for the webhook "
                          f"channel, got {delivery.url!r}")
    api = sections["api"]
    if api.token_file:
        sections["api"] = dataclasses.replace(
            api, token_file=str(data_dir / Path(api.token_file).expanduser()))
    _check_timezone(sections["sessions"].timezone)
    groups = load_groups(data.get("groups", {}), base_dir)
    return Config(data_dir=data_dir, source=source, groups=groups, **sections)


def _check_timezone(name: str) -> None:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"[sessions] timezone {name!r} is not a known IANA time zone; "
                          "use e.g. 'UTC' or 'Europe/Berlin'") from None


def read_config(path: Path) -> Config:
    """Read and validate a config file; every failure is a one-line ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; create one with 'orchestrator init'")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text: {exc.reason} at byte "
                          f"{exc.start})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})")
    try:
        return load_config(data, path.resolve().parent, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _default_value(f: Any) -> Any:
    value = f.default
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
            lines.append(tomli_w.dumps({f.name: _default_value(f)}).rstrip())
    from orchestrator.config.groups import render_example

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
