"""Agent groups as first-class: a group's effective settings, from config records only.

``[groups.<name>]`` tables in config.toml override, for one agent group, the
command (local) or image and command (Docker, Kubernetes), resources, placement and
service account (Kubernetes), environment variables (plain, or
read from files for secrets), extra mounts, limits, network, the group's agent
cap and the lifecycle timings. A key left out inherits the global value. The
tables are ``model.GroupConfig`` records, validated by ``load.load_groups`` and
rendered for ``init`` by ``render.render_example``; this module resolves them:

- ``resolve(cfg, group)``: the effective ``AgentSettings`` of a group (pure,
  table-tested), and ``AgentSettings.digest``: a short hash of what the agent
  runs with, shown by ``status`` and set as a container label;
- ``read_env(settings)``: the I/O edge that reads the secret files at start;
- ``preflight(cfg)``: Docker mounts checked (``mounts``) before ``run`` starts.

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
from dataclasses import dataclass
from typing import Any

from orchestrator.config.model import (
    GROUP_DOCKER_KEYS,
    GROUP_KUBERNETES_KEYS,
    GROUP_LIFECYCLE_KEYS,
    GROUP_RETENTION_KEYS,
    Config,
    GroupConfig,
)
from orchestrator.config.mounts import MountNotAllowed, extra_mounts
from orchestrator.config.sections import (
    ConfigError,
    DockerConfig,
    EgressCredential,
    KubernetesConfig,
    LifecycleConfig,
    RetentionConfig,
    RuntimeConfig,
)

MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class AgentSettings:
    """What one group's agents run with, after the overrides."""

    group: str
    kind: str  # local | docker | kubernetes
    runtime: RuntimeConfig  # effective [runtime] (command)
    docker: DockerConfig  # effective [docker] (image, command, network, limits, mounts)
    lifecycle: LifecycleConfig  # effective timings (host-side rules)
    env: tuple[tuple[str, str], ...] = ()
    env_files: tuple[tuple[str, str], ...] = ()
    max_agents: int | None = None
    # effective [kubernetes] (image, command, resources, placement, service account)
    kubernetes: KubernetesConfig = KubernetesConfig()
    # the egress gateway: "host:port" its agents may reach, the keys injected per host
    egress: tuple[str, ...] = ()
    egress_credentials: tuple[EgressCredential, ...] = ()
    retention: RetentionConfig = RetentionConfig()  # effective archive_after, delete_after

    @property
    def image(self) -> str | None:
        if self.kind == "kubernetes":
            return self.kubernetes.image
        return self.docker.image if self.kind == "docker" else None

    def fingerprint(self) -> dict[str, Any]:
        """What the agent runs with, for the digest: the process or container side
        only (lifecycle timings are host rules, applied from the next ``run``).
        Secret files count by path, never by content."""
        base: dict[str, Any] = {"kind": self.kind, "env": [list(p) for p in self.env],
                                "env_files": [list(p) for p in self.env_files]}
        if self.egress or self.egress_credentials:  # by path, never the key itself
            base.update(egress=list(self.egress),
                        egress_credentials=[dataclasses.asdict(c)
                                            for c in self.egress_credentials])
        if self.kind == "docker":
            d = self.docker
            base.update(image=d.image, command=list(d.command), network=d.network,
                        memory=d.memory, cpus=d.cpus, pids_limit=d.pids_limit,
                        mounts=list(d.mounts), group_folder=d.group_folder)
        elif self.kind == "kubernetes":
            k = self.kubernetes
            base.update(image=k.image, command=list(k.command),
                        image_pull_policy=k.image_pull_policy, user=k.user,
                        service_account=k.service_account, runtime_class=k.runtime_class,
                        node_selector=[list(p) for p in k.node_selector],
                        tolerations=[[list(p) for p in t] for t in k.tolerations],
                        cpu_request=k.cpu_request, cpu_limit=k.cpu_limit,
                        memory_request=k.memory_request, memory_limit=k.memory_limit,
                        group_folder=k.group_folder)
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
                "lifecycle": {k: getattr(self.lifecycle, k) for k in GROUP_LIFECYCLE_KEYS}}


def group_config(cfg: Config, group: str) -> GroupConfig | None:
    return next((g for g in cfg.groups if g.name == group), None)


def resolve(cfg: Config, group: str) -> AgentSettings:
    """The effective settings of ``group``: its overrides over the global values. Pure."""
    g = group_config(cfg, group) or GroupConfig(name=group)

    def given(keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: getattr(g, k) for k in keys if getattr(g, k) is not None}

    docker = dataclasses.replace(cfg.docker, **given(GROUP_DOCKER_KEYS))
    k8s = dataclasses.replace(cfg.kubernetes, **given(GROUP_KUBERNETES_KEYS))
    runtime = cfg.runtime
    if cfg.runtime.kind == "kubernetes":  # the keys [docker] and [kubernetes] both have
        k8s = dataclasses.replace(k8s, **given(("image", "command", "group_folder")))
    elif g.command is not None:
        if cfg.runtime.kind == "docker":
            docker = dataclasses.replace(docker, command=g.command)
        else:
            runtime = dataclasses.replace(runtime, command=g.command)
    return AgentSettings(
        group=group, kind=cfg.runtime.kind, runtime=runtime, docker=docker, kubernetes=k8s,
        lifecycle=dataclasses.replace(cfg.lifecycle, **given(GROUP_LIFECYCLE_KEYS)),
        env=g.env or (), env_files=g.env_files or (), max_agents=g.max_agents,
        egress=g.egress or (), egress_credentials=g.egress_credentials or (),
        retention=dataclasses.replace(cfg.retention, **given(GROUP_RETENTION_KEYS)))


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


def preflight(cfg: Config) -> None:
    """Refuse, before ``run`` starts, Docker mounts (global or a group's) that are
    malformed or outside ``[docker] allowed_mounts``: one line (exit code 2), instead
    of every start of that group failing later."""
    if cfg.runtime.kind != "docker":
        return
    for name in [None, *(g.name for g in cfg.groups)]:
        docker = cfg.docker if name is None else resolve(cfg, name).docker
        try:
            extra_mounts(docker)
        except MountNotAllowed as exc:
            where = "" if name is None else f"[groups.{name}] mounts: "
            raise ConfigError(f"{where}{exc}") from None
