"""Configuration records and their field metadata: the one source of the rules.

Each key is a field of a frozen record (its section's, in ``sections``) whose
metadata (help text, choices, range, path, auto) drives validation (``load``), the
commented default of ``init`` (``render``) and the docs. ``[groups.<name>]`` tables
are ``GroupConfig`` records; a group key shares the metadata of the global key it
overrides (``GROUP_SHARED``).
This module only declares: reading a file is ``load``, writing one ``render``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from orchestrator.config.sections import (
    ApiConfig,
    ClusterConfig,
    DeliveryConfig,
    DockerConfig,
    EgressCredential,
    GatewayConfig,
    KubernetesConfig,
    LifecycleConfig,
    LogConfig,
    RetentionConfig,
    RuntimeConfig,
    SessionsConfig,
    WatchConfig,
)

# group key -> (section record, field) whose metadata (type, range, choices) it shares
GROUP_SHARED: dict[str, tuple[type, str]] = {
    "image": (DockerConfig, "image"),
    "network": (DockerConfig, "network"),
    "memory": (DockerConfig, "memory"),
    "cpus": (DockerConfig, "cpus"),
    "pids_limit": (DockerConfig, "pids_limit"),
    "mounts": (DockerConfig, "mounts"),
    "group_folder": (DockerConfig, "group_folder"),
    "cpu_request": (KubernetesConfig, "cpu_request"),
    "cpu_limit": (KubernetesConfig, "cpu_limit"),
    "memory_request": (KubernetesConfig, "memory_request"),
    "memory_limit": (KubernetesConfig, "memory_limit"),
    "node_selector": (KubernetesConfig, "node_selector"),
    "tolerations": (KubernetesConfig, "tolerations"),
    "service_account": (KubernetesConfig, "service_account"),
    "runtime_class": (KubernetesConfig, "runtime_class"),
    "idle_after": (LifecycleConfig, "idle_after"),
    "stop_idle_after": (LifecycleConfig, "stop_idle_after"),
    "ceiling": (LifecycleConfig, "ceiling"),
    "claim_stuck": (LifecycleConfig, "claim_stuck"),
    "max_run": (LifecycleConfig, "max_run"),
    "max_run_grace": (LifecycleConfig, "max_run_grace"),
    "archive_after": (RetentionConfig, "archive_after"),
    "delete_after": (RetentionConfig, "delete_after"),
}
GROUP_DOCKER_KEYS = ("image", "network", "memory", "cpus", "pids_limit", "mounts", "group_folder")
# [kubernetes] keys a group may set; image, command and group_folder go to [kubernetes]
# too when [runtime] kind = "kubernetes" (groups.resolve)
GROUP_KUBERNETES_KEYS = ("cpu_request", "cpu_limit", "memory_request", "memory_limit",
                         "node_selector", "tolerations", "service_account", "runtime_class")
GROUP_LIFECYCLE_KEYS = ("idle_after", "stop_idle_after", "ceiling", "claim_stuck", "max_run",
                        "max_run_grace")
GROUP_RETENTION_KEYS = ("archive_after", "delete_after")
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
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    node_selector: tuple[tuple[str, str], ...] | None = None
    tolerations: tuple[tuple[tuple[str, Any], ...], ...] | None = None
    service_account: str | None = None
    runtime_class: str | None = None
    max_agents: int | None = None
    idle_after: float | None = None
    stop_idle_after: float | None = None
    ceiling: float | None = None
    claim_stuck: float | None = None
    egress: tuple[str, ...] | None = None
    egress_credentials: tuple[EgressCredential, ...] | None = None
    max_run: float | None = None
    max_run_grace: float | None = None
    archive_after: float | None = None
    delete_after: float | None = None


GROUP_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GroupConfig) if f.name != "name")

# (example value, meaning) of each key, for `init`'s commented example and `group show`.
KEY_HELP: dict[str, tuple[str, str]] = {
    "command": ('["python3", "-m", "support_agent"]',
                "agent command: replaces [runtime] command (local), [docker] command or "
                "[kubernetes] command (by [runtime] kind)"),
    "image": ('"support-agent:2"', "image of this group's agents ([docker] or [kubernetes], "
              "by [runtime] kind)"),
    "env": ('{ MODEL = "small" }', "environment variables of its agents"),
    "env_files": ('{ API_KEY = "/run/secrets/support_key" }',
                  "secret variables, read from these files at each start, never logged"),
    "mounts": ('["/srv/kb:/kb:ro"]', "Docker extra mounts, each under [docker] allowed_mounts"),
    "group_folder": ('"/srv/agents/support"',
                     "[docker] or [kubernetes] group_folder for this group (at /workspace/agent)"),
    "memory": ('"1g"', "Docker memory limit"),
    "cpus": ("2.0", "Docker CPU limit"),
    "pids_limit": ("512", "Docker max processes in a container"),
    "network": ('"bridge"', "Docker network"),
    "cpu_request": ('"250m"', "Kubernetes CPU request"),
    "cpu_limit": ('"2"', "Kubernetes CPU limit"),
    "memory_request": ('"256Mi"', "Kubernetes memory request"),
    "memory_limit": ('"1Gi"', "Kubernetes memory limit"),
    "node_selector": ("{ pool = \"agents\" }", "Kubernetes nodeSelector of its Pods"),
    "tolerations": ('[{ key = "agents", operator = "Exists", effect = "NoSchedule" }]',
                    "Kubernetes tolerations of its Pods"),
    "service_account": ('"support-agent"', "Kubernetes service account (token not mounted)"),
    "runtime_class": ('"gvisor"', "Kubernetes runtimeClassName of its Pods"),
    "max_agents": ("4", "most agents of this group running at once"),
    "idle_after": ("30.0", "[lifecycle] idle_after for this group"),
    "stop_idle_after": ("300.0", "[lifecycle] stop_idle_after for this group"),
    "ceiling": ("1800.0", "[lifecycle] ceiling for this group"),
    "claim_stuck": ("60.0", "[lifecycle] claim_stuck for this group"),
    "egress": ('["api.anthropic.com:443"]',
               "HOST:PORT its agents may reach through the egress gateway ([gateway]); "
               "'*.example.com:443' matches subdomains; unset = no gateway for this group"),
    "egress_credentials": (
        '[{ host = "api.anthropic.com", header = "x-api-key", secret_file = '
        '"/run/secrets/anthropic", base_url_env = "ANTHROPIC_BASE_URL", key_env = '
        '"ANTHROPIC_API_KEY" }]',
        "keys the gateway injects per upstream (the agent never sees them): header, "
        "secret_file, optional prefix (e.g. 'Bearer '), base_url_env (a variable set to "
        "the gateway's base URL for this host) and key_env (a variable set to the "
        "session's gateway token, the placeholder the SDK sends)"),
    "max_run": ("86400.0", "[lifecycle] max_run for this group (0 = no limit)"),
    "max_run_grace": ("300.0", "[lifecycle] max_run_grace for this group"),
    "archive_after": ("604800.0", "[retention] archive_after for this group (0 = never)"),
    "delete_after": ("2592000.0", "[retention] delete_after for this group (0 = never)"),
}


SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig,
    "docker": DockerConfig,
    "kubernetes": KubernetesConfig,
    "lifecycle": LifecycleConfig,
    "watch": WatchConfig,
    "delivery": DeliveryConfig,
    "sessions": SessionsConfig,
    "api": ApiConfig,
    "cluster": ClusterConfig,
    "log": LogConfig,
    "gateway": GatewayConfig,
    "retention": RetentionConfig,
}


@dataclass(frozen=True)
class Config:
    data_dir: Path
    runtime: RuntimeConfig = RuntimeConfig()
    docker: DockerConfig = DockerConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    watch: WatchConfig = WatchConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    sessions: SessionsConfig = SessionsConfig()
    api: ApiConfig = ApiConfig()
    cluster: ClusterConfig = ClusterConfig()
    log: LogConfig = LogConfig()
    gateway: GatewayConfig = GatewayConfig()
    retention: RetentionConfig = RetentionConfig()
    groups: tuple[GroupConfig, ...] = ()  # sorted by name: [groups.<name>] overrides
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
