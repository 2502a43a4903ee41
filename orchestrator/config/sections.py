"""The records of the config's sections (``[runtime]``, ``[docker]``, ``[api]`` …)
and the field metadata that drives them.

Each key is a field of a frozen record whose metadata (help text, choices, range,
path, auto), given by ``_opt``, drives validation (``load``), the commented default
of ``init`` (``render``) and the docs. The whole file (``Config``) and the
``[groups.<name>]`` tables that override these keys are in ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.support.errors import UserError


class ConfigError(UserError, ValueError):
    """One-line, user-facing: names the file/key and the fix."""


def _opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, path: bool = False, auto: bool = False,
         shape: str | None = None) -> Any:
    """``shape``: "table" (a TOML table of strings, kept as sorted (key, value) pairs) or
    "tolerations" (a list of Kubernetes toleration tables); None = as the default's type."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "path": path,
            "auto": auto, "shape": shape}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RuntimeConfig:
    kind: str = _opt("local", "where agents run: 'local' processes, 'docker' containers, or "
                     "'kubernetes' Pods (see [kubernetes])",
                     choices=("local", "docker", "kubernetes"))
    command: tuple[str, ...] = _opt(
        ["{python}", "-m", "orchestrator.agent"],
        "local runtime: agent command; {python} = this interpreter; --workspace DIR is appended",
    )
    on_shutdown: str = _opt(
        "leave", "on Ctrl-C/SIGTERM: 'leave' agents running (re-adopted on restart) or 'stop' them",
        choices=("leave", "stop"),
    )
    stop_grace: float = _opt(10.0, "seconds between SIGTERM and SIGKILL", min=0, max=600)
    uid_range: str = _opt(
        "auto", "when run as root: each session's agent runs as its own uid (gid the same) "
        "from LOW-HIGH, kept across restarts and never shared, its folder given to that uid "
        "(0700). 'auto' = 200000-299999 for [runtime] kind = docker or kubernetes, off for "
        "local (its command must be runnable by those uids: set a range to use it); '' = off, "
        "every agent runs as one uid ([docker] user). Without root there is always one uid")
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
    image: str = _opt("orchestrator-agent:latest",
                      "agent image (build it: orchestrator image build)")
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
    mounts: tuple[str, ...] = _opt(
        [], "extra mounts 'HOST:CONTAINER[:ro]', each under allowed_mounts")
    allowed_mounts: tuple[str, ...] = _opt([], "host folders extra mounts may come from")
    group_folder: str = _opt(
        "", "a group's folder, mounted rw at /workspace/agent (NanoClaw images read "
        "container.json there); {data_dir} and {group} are filled in, e.g. "
        "'{data_dir}/groups/{group}'; empty = none")
    base_url: str = _opt("", "Docker daemon URL; empty = DOCKER_HOST or the local socket")
    netns_pool: int = _opt(
        2, "network namespaces made ahead of demand (tiny 'sleep' containers of the image, "
        "loopback only), each joined by a new agent of a group with network 'none' and kept "
        "for its session's next runs: ~100 ms off a cold start; 0 = off", min=0, max=64)
    pause_with: str = _opt(
        "cgroup", "how an idle agent is frozen ([lifecycle] pause_idle_after): 'cgroup' "
        "writes its cgroup's freezer (thawed in ~1 ms; docker ps still says Up; 'docker' "
        "where the file is out of reach), 'docker' = docker pause / unpause (~10-25 ms)",
        choices=("cgroup", "docker"))
    prepared_containers: int = _opt(
        4, "sessions whose next container is created (not started) as soon as their agent "
        "stopped, most recent first, so a new message only waits for docker start; 0 = off",
        min=0, max=256)


QUANTITY_HELP = "a Kubernetes quantity, e.g. '500m', '1', '256Mi'; '' = none"


@dataclass(frozen=True)
class KubernetesConfig:
    """``[kubernetes]``: agents as Pods (``[runtime] kind = "kubernetes"``)."""

    namespace: str = _opt("orchestrator-agents", "namespace the agent Pods are created in")
    kubeconfig: str = _opt("", "path of a kubeconfig file; '' = the in-cluster service account")
    node_name: str = _opt("", "node the agent Pods are pinned to (it must hold data_dir); '' = "
                          "the NODE_NAME environment variable, else this host's name")
    instance: str = _opt("default", "label value that marks this orchestrator's Pods")
    image: str = _opt("orchestrator-agent:latest", "agent image (on the node: nothing is "
                      "pulled with IfNotPresent or Never once it is there)")
    image_pull_policy: str = _opt("IfNotPresent", "imagePullPolicy of the agent container",
                                  choices=("IfNotPresent", "Never", "Always"))
    command: tuple[str, ...] = _opt(
        ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace"], "container command")
    user: str = _opt("auto", "'auto' = owner of data_dir (or the session's own uid, see "
                     "[runtime] uid_range), or 'UID:GID'; never root")
    service_account: str = _opt("", "service account of the agent Pods; '' = none (its token "
                                "is never mounted either way)")
    runtime_class: str = _opt("", "runtimeClassName of the agent Pods (e.g. 'gvisor'); '' = none")
    node_selector: tuple[tuple[str, str], ...] = _opt(
        [], "nodeSelector labels, e.g. { pool = \"agents\" }", shape="table")
    tolerations: tuple[tuple[tuple[str, Any], ...], ...] = _opt(
        [], "tolerations: a list of tables with key, operator, value, effect, "
        "tolerationSeconds", shape="tolerations")
    cpu_request: str = _opt("100m", f"CPU request: {QUANTITY_HELP}")
    cpu_limit: str = _opt("1", f"CPU limit: {QUANTITY_HELP}")
    memory_request: str = _opt("128Mi", f"memory request: {QUANTITY_HELP}")
    memory_limit: str = _opt("512Mi", f"memory limit: {QUANTITY_HELP}")
    group_folder: str = _opt(
        "", "a group's folder under data_dir, mounted rw at /workspace/agent as in [docker] "
        "group_folder; {data_dir} and {group} are filled in; empty = none")
    start_timeout: float = _opt(
        120.0, "seconds a Pod may stay Pending (unschedulable, image not there) before its "
        "start counts as failed and the Pod is deleted", min=1, max=86400)


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
    max_tool_timeout: float = _opt(
        86400.0, "most seconds an agent's declared tool timeout may widen the stuck windows "
        "(ceiling, claim_stuck); a bigger, infinite or NaN declaration is clamped or ignored",
        min=0, max=30 * 86400)
    max_tries: int = _opt(5, "tries before a message is marked failed", min=1, max=100)
    backoff_base: float = _opt(5.0, "retry backoff: base * 2^tries seconds", min=0, max=3600)
    answer_wait: float = _opt(
        600.0, "seconds an acked message may wait for its reply, keeping the agent busy; "
        "if the agent stops or dies first, the message is retried", min=0, max=7 * 86400)
    max_run: float = _opt(
        0.0, "lifetime of one agent run (s, from its start or adoption): past it the agent is "
        "stopped at its next idle moment (no claim, no answer owed, nothing due) and killed "
        "max_run_grace s later if it never has one (its work is then retried, tries + 1); "
        "0 = no limit", min=0, max=365 * 86400)
    max_run_grace: float = _opt(
        300.0, "seconds past max_run an agent that never becomes idle may go on before it is "
        "killed", min=0, max=7 * 86400)


@dataclass(frozen=True)
class WatchConfig:
    mode: str = _opt("events", "'events' (inotify) or 'poll' (network / shared file systems)",
                     choices=("events", "poll"))
    poll_interval: float = _opt(1.0, "poll mode: seconds between scans", min=0.05, max=3600)
    sweep_interval: float = _opt(30.0, "seconds between full reconcile sweeps", min=0.05, max=86400)
    dormant_sweep_interval: float = _opt(
        600.0, "events mode, while inotify reports no loss: seconds between two sweeps of "
        "a dormant session (stopped, settled, nothing due); the others are swept every "
        "sweep_interval", min=0.05, max=86400)
    debounce_ms: int = _opt(50, "events mode: longest batch of changes (ms)", min=1, max=10000)
    step_ms: int = _opt(3, "events mode: quiet time that ends a batch (ms)", min=1, max=1000)
    quiet_step_ms: int = _opt(20, "events mode: the step once quiet_after s pass with no "
                              "change (ms)", min=1, max=1000)
    quiet_after: float = _opt(2.0, "seconds without any change before quiet_step_ms applies",
                              min=0, max=3600)


@dataclass(frozen=True)
class DeliveryConfig:
    channel: str = _opt("jsonl", "'log', 'jsonl' or 'webhook'", choices=("log", "jsonl", "webhook"))
    path: Path = _opt("delivered.jsonl", "jsonl channel output, relative to data_dir", path=True)
    url: str = _opt("", "webhook channel: the URL each reply is POSTed to")
    secret_files: tuple[str, ...] = _opt(
        ["webhook-secret"], "webhook channel: files each holding one signing key in the "
        "Standard Webhooks form 'whsec_<base64>', relative to data_dir; every key signs "
        "each request (one signature each in webhook-signature), so a key is rotated by "
        "adding the new file first and removing the old one later. The first is created "
        "(mode 0600) if missing")
    timeout: float = _opt(10.0, "webhook channel: seconds before a POST counts as failed",
                          min=0.1, max=600)
    max_file_bytes: int = _opt(1024 * 1024, "webhook channel: reply files up to this size are "
                               "sent inline (base64); larger ones as name and size only",
                               min=0, max=2**31)
    max_payload_bytes: int = _opt(8 * 1024 * 1024, "webhook channel: largest POST body in "
                                  "bytes; files that do not fit inline are sent as name and "
                                  "size only (data null, omitted says why); at most 4 such "
                                  "bodies are held in memory at once", min=65536, max=2**31)
    max_attempts: int = _opt(100, "most attempts before a reply is recorded failed (the "
                             "retry_horizon usually ends it first)", min=1, max=100_000)
    retry_base: float = _opt(2.0, "delivery retry backoff: the n-th retry waits a random time "
                             "(full jitter) up to base * 2^(n-1) seconds, at least base, at "
                             "most retry_max_delay", min=0, max=3600)
    retry_max_delay: float = _opt(3600.0, "longest wait between two attempts (s); a "
                                  "Retry-After is honoured up to this too", min=0.1,
                                  max=86400)
    retry_horizon: float = _opt(86400.0, "seconds after a reply was written (or became due) "
                                "during which failed deliveries are retried; then it is "
                                "recorded failed", min=0, max=30 * 86400)
    files_wait: float = _opt(60.0, "seconds a reply waits for its outbox/ files before "
                             "that counts as a failed attempt", min=0, max=86400)
    max_content_bytes: int = _opt(1024 * 1024, "largest reply content in bytes; a bigger "
                                  "reply is failed with its reason, never loaded whole",
                                  min=1, max=2**31)
    events: tuple[str, ...] = _opt(
        [], "webhook channel: event kinds also POSTed to the url, signed like replies, with "
        "the ids of GET /v1/events: 'status' (status changes), 'failure' (reply_failed and "
        "message_failed)")


@dataclass(frozen=True)
class SessionsConfig:
    default_mode: str = _opt("shared", "session resolution mode",
                             choices=("shared", "per-thread", "agent-shared"))
    max_attachment_bytes: int = _opt(25 * 1024 * 1024, "largest decoded attachment",
                                     min=1, max=2**40)
    timezone: str = _opt("UTC", "IANA time zone of 'send --at' times without an offset and "
                         "of 'send --every' cron expressions, e.g. 'Europe/Berlin'")
    max_session_bytes: int = _opt(
        2**30, "space quota of one session folder (bytes allocated under it, counted by the "
        "host); over it the agent is killed, its starts are refused (each counts towards "
        "max_tries) until it is back under; 0 = no quota", min=0, max=2**50)
    min_free_bytes: int = _opt(
        64 * 1024 * 1024, "space the host keeps for its own records on data_dir's file "
        "system (held as the file data_dir/space-reserve and given up when the disk is "
        "full); below it the session using the most space is stopped; 0 = no reserve",
        min=0, max=2**50)
    max_agent_log_bytes: int = _opt(
        1024 * 1024, "each agent run's output (stdout and stderr) is kept on the host under "
        "data_dir/logs/<group>/<session>/run-<N>.log, cut to its last this many bytes",
        min=4096, max=2**40)
    agent_log_runs: int = _opt(
        10, "runs whose output is kept per session; the oldest goes when a new one starts",
        min=1, max=100_000)


@dataclass(frozen=True)
class ApiConfig:
    listen: str = _opt("127.0.0.1:8750", "HTTP API: 'HOST:PORT', 'unix:/path', or '' for no API")
    token_file: str = _opt("api-token", "bearer token of /v1, relative to data_dir (created "
                           "with mode 0600 if missing); '' = no token (loopback only)")
    metrics_auth: bool = _opt(False, "require the token for /metrics too")
    allowed_hosts: tuple[str, ...] = _opt(
        [], "Host names the API answers to (the Host header, and the Origin of a browser's "
        "request), e.g. ['orch.example.com']; '*' = any. Empty = loopback names plus the "
        "listen address (any name when listening on 0.0.0.0 or :: with a token). Without a "
        "token only loopback names are ever served")
    header_timeout: float = _opt(
        10.0, "seconds from a connection's opening (or the first byte of its next request) "
        "to the end of the request's headers; slower connections are closed", min=0.1, max=3600)
    body_timeout: float = _opt(
        60.0, "seconds from the end of a request's headers to the end of its body",
        min=0.1, max=86400)
    keepalive_timeout: float = _opt(
        15.0, "seconds an idle kept-alive connection stays open", min=0.1, max=3600)
    max_connections: int = _opt(
        200, "most open API connections (at most half the open-file limit); beyond it the "
        "connection idle longest is closed, or the new one answered 503", min=1,
        max=1_000_000)
    max_wait: float = _opt(
        60.0, "most seconds a POST /v1/messages may wait for its reply (its wait field or "
        "Prefer: wait=N is cut to this)", min=0, max=60)
    event_content_bytes: int = _opt(
        64 * 1024, "largest reply content (bytes of its JSON) carried in a /v1/events reply "
        "event and a waited POST /v1/messages; a bigger one comes as truncated: true and "
        "the message's URL", min=0, max=2**31)


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several orchestrators (shards) serving one API (issue 23). Off
    unless ``shard`` is set: a single orchestrator, as before."""

    shard: str = _opt("", "this shard's id among the members ('' = no cluster: a single "
                      "orchestrator); with discovery = 'kubernetes', '' = the node name")
    members: tuple[str, ...] = _opt(
        [], "static membership: every shard as 'ID=http://HOST:PORT', this one included, "
        "in the order they joined (append a new one: placement relies on it), e.g. "
        "['a=http://10.0.0.1:8750', 'b=http://10.0.0.2:8750']")
    discovery: str = _opt("static", "'static' ([cluster] members) or 'kubernetes' (the "
                          "orchestrator Pods carrying pod_label, watched)",
                          choices=("static", "kubernetes"))
    shard_ids: str = _opt("node", "discovery = 'kubernetes': a shard's id is its 'node' name (one "
                          "orchestrator per node) or its 'pod' name (several per node, each "
                          "with its own data dir and [kubernetes] instance; shard = the Pod's "
                          "name, e.g. ORCHESTRATOR_CLUSTER__SHARD from the Downward API)",
                          choices=("node", "pod"))
    pod_label: str = _opt("app.kubernetes.io/name=orchestrator,"
                          "app.kubernetes.io/component=supervisor",
                          "label selector of the orchestrator Pods (discovery = 'kubernetes')")
    pod_namespace: str = _opt("", "namespace of the orchestrator Pods; '' = POD_NAMESPACE, "
                              "else [kubernetes] namespace")
    api_port: int = _opt(8750, "API port of the other shards' Pods (discovery = "
                         "'kubernetes')", min=1, max=65535)
    peer_token_file: str = _opt("", "shared secret of shard-to-shard calls, relative to "
                            "data_dir; '' = the API token ([api] token_file)")
    peer_timeout: float = _opt(3.0, "seconds a shard waits for another (connect, and "
                               "every question but a forwarded request's answer)",
                               min=0.05, max=60)
    probe_interval: float = _opt(2.0, "seconds between GET /readyz probes of the other "
                                 "shards (a failed one marks the shard down)",
                                 min=0.05, max=600)
    retry_after: int = _opt(5, "Retry-After seconds of a 503 for a down shard's "
                            "conversation", min=1, max=3600)
    drain: tuple[str, ...] = _opt([], "ids of shards that take no new conversation (their "
                                  "own keep being served); the same list on every shard")


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]`` (issue 26.1): what is archived, deleted or pruned, and when.

    "Inactive" is measured on a *stopped* session only (no agent, nothing pending,
    every reply settled: ``rules.retention``), from its last activity (the newer of
    its last reply, heartbeat and creation). ``archive_after`` and ``delete_after``
    may be set per group (``[groups.<name>]``)."""

    archive_after: float = _opt(0.0, "seconds a stopped session may stay inactive before it "
                                "is archived (one compressed file under archive_dir, "
                                "restorable); 0 = never", min=0, max=10 * 365 * 86400)
    delete_after: float = _opt(0.0, "seconds a stopped session may stay inactive before it "
                               "is deleted (its folder and registry rows, no archive); 0 = "
                               "never; when both are set the shorter one applies",
                               min=0, max=10 * 365 * 86400)
    delivered_max_age: float = _opt(0.0, "seconds a delivered reply file (delivered/<id>/) "
                                    "is kept; 0 = forever", min=0, max=10 * 365 * 86400)
    archive_dir: str = _opt("", "where archives go, relative to data_dir; '' = "
                            "<data_dir>/archive")
    sweep_interval: float = _opt(600.0, "seconds between two retention sweeps of `run`",
                                 min=1, max=86400)
    batch: int = _opt(10, "sessions removed per step of a sweep before the loop yields "
                      "(other sessions' work goes first)", min=1, max=10_000)
    duty: float = _opt(0.25, "share of the time a sweep works: after a step that took t "
                       "seconds it rests t * (1/duty - 1), so live sessions keep the disk "
                       "and CPU it would take; 1 = no rest", min=0.01, max=1)


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt("INFO", "log level",
                      choices=("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"))
    json: bool = _opt(False, "one JSON object per log line")


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: the egress gateway of groups with ``egress`` (README, Egress gateway)."""

    enabled: bool = _opt(True, "run the egress gateway when some group sets egress; false = "
                         "such groups are refused at start")
    host: str = _opt("", "address the gateway listens on; '' = 127.0.0.1 (local runtime) or "
                     "the gateway address of the internal network (docker)")
    port: int = _opt(8760, "first port: each group with egress has its own listener, at port "
                     "+ its index among those groups in name order", min=1, max=65535)
    network: str = _opt("", "docker: the internal network (no route out) agents with egress "
                        "join instead of [docker] network; '' = orch-<[docker] instance>-egress")
    max_requests_per_minute: int = _opt(600, "requests one session may make per minute "
                                        "(more: 429)", min=1, max=1_000_000)
    max_body_bytes: int = _opt(32 * 1024 * 1024, "largest request body an agent may send "
                               "(more: 413)", min=1024, max=2**31)
    max_connections: int = _opt(32, "connections one session may hold open at once (more: "
                                "429)", min=1, max=100_000)
    upstream_ca_file: str = _opt("", "PEM file of CA certificates trusted for upstreams "
                                 "besides the system's (an internal model gateway); '' = "
                                 "the system's only")


@dataclass(frozen=True)
class EgressCredential:
    """One ``[[groups.<name>.egress_credentials]]`` entry: a key the gateway injects."""

    host: str
    header: str
    secret_file: str
    prefix: str = ""
    base_url_env: str = ""
    key_env: str = ""
