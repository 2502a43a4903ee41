#!/usr/bin/env bash
# Build (once, cached) and start a real single-node Kubernetes v1.20.2 test cluster on this
# machine from Debian registry packages only: etcd, kube-apiserver, controller-manager,
# scheduler, a separate containerd and a kubelet whose node is "localhost". Idempotent: every
# step is skipped when done; a healthy running cluster is left as it is, a half-started or
# broken one is torn down (.ci/teardown-kubernetes.sh) and started again.
#
#   sudo bash .ci/setup-kubernetes.sh
#
# Afterwards: admin kubeconfig /var/lib/orchestrator-k8s/admin.kubeconfig (root, 0600),
# kubectl $K8S_CACHE/bin/kubectl, containerd socket /run/orchestrator-k8s/containerd.sock,
# logs /var/log/orchestrator-k8s/, build cache /var/cache/orchestrator-k8s/v1.20.2/.
# No kube-proxy: ClusterIP Services do not work; a Pod that needs the API server runs with
# hostNetwork and KUBERNETES_SERVICE_HOST=127.0.0.1.
#
# Env: ORCHESTRATOR_K8S_CACHE (build cache dir), ORCHESTRATOR_K8S_IMAGES (Docker images to
# import, default "orchestrator-agent:latest"; empty for none).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "setup-kubernetes: $*"; }
die() { echo "setup-kubernetes: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo bash $0)"

# shellcheck source=kubernetes/common.sh
source "$REPO/.ci/kubernetes/common.sh"
# shellcheck source=kubernetes/build.sh
source "$REPO/.ci/kubernetes/build.sh"
# shellcheck source=kubernetes/start.sh
source "$REPO/.ci/kubernetes/start.sh"
k8s_lock

T_ALL=$SECONDS
T_STEP=$SECONDS
step() { T_STEP=$SECONDS; say "== $*"; }
done_step() { say "   ($(( SECONDS - T_STEP ))s)"; }

step "1/6 Debian packages"
PKGS=(etcd-server golang-1.19-go containerd runc containernetworking-plugins busybox-static
      openssl dpkg-dev gcc libc6-dev iptables curl)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "all packages installed"
fi
# the etcd-server package may start a system etcd on 2379; the cluster runs its own
if pid=$(pidof etcd 2>/dev/null) && ! pid_of etcd >/dev/null; then
    die "another etcd (pid $pid) is running; stop it (e.g. 'systemctl disable --now etcd') so 127.0.0.1:2379 is free"
fi
done_step

step "2/6 Kubernetes $K8S_VERSION source (bookworm deb-src) and generated openapi"
mkdir -p "$K8S_CACHE"
if k8s_binaries_built && [ -s "$K8S_CACHE/pause.tar" ]; then
    say "build cache complete in $K8S_CACHE; skipping source and build"
else
    k8s_fetch_source
    k8s_go_env
    k8s_gen_openapi
fi
done_step

step "3/6 go build and pause image"
if ! k8s_binaries_built || [ ! -s "$K8S_CACHE/pause.tar" ]; then
    k8s_go_env
    k8s_go_build
    k8s_build_pause
else
    say "binaries and pause image cached"
fi
done_step

step "4/6 health of a running cluster"
all_running() {
    local p
    for p in "${K8S_PROCS[@]}"; do pid_of "$p" >/dev/null || return 1; done
}
answering() {
    [ -s "$ADMIN_KUBECONFIG" ] && _apiserver_ready >/dev/null 2>&1 && _node_ready && _default_sa_ready
}
# healthy: every process alive and the cluster answering; a live cluster gets 60 s to answer
# (a loaded machine may report the node NotReady for a moment) before it is started again
cluster_healthy() {
    local t0=$SECONDS
    while all_running; do
        answering && return 0
        (( SECONDS - t0 >= 60 )) && { say "the running cluster did not answer within 60s"; return 1; }
        sleep 1
    done
    return 1
}
if cluster_healthy; then
    say "cluster already running and healthy; leaving it as it is"
    STARTED=0
else
    if ls "$K8S_PIDS"/*.pid >/dev/null 2>&1 || [ -d "$KUBELET_DIR/pods" ]; then
        say "a previous cluster is not healthy: tearing it down first"
        bash "$REPO/.ci/teardown-kubernetes.sh"
    fi
    STARTED=1
fi
done_step

if [ "$STARTED" = 1 ]; then
    step "5/6 certificates, configuration, start (etcd, apiserver, controllers, containerd, kubelet)"
    mkdir -p "$K8S_STATE" "$K8S_LOGS" "$K8S_PIDS"
    chmod 0711 "$K8S_STATE"
    k8s_certs
    k8s_kubeconfigs
    k8s_configs
    k8s_save_sysctls
    k8s_firewall
    T_START=$SECONDS
    k8s_start
    say "cluster up: node localhost Ready $((SECONDS - T_START))s after the first process started"
    done_step
fi

step "6/6 local images into the cluster's containerd"
for img in ${ORCHESTRATOR_K8S_IMAGES-orchestrator-agent:latest}; do
    if docker image inspect "$img" >/dev/null 2>&1; then
        k8s_import_docker "$img"
    else
        die "Docker image $img not found; run .ci/setup-docker.sh first (it builds orchestrator-agent:latest)"
    fi
done
done_step

kubectl_admin get nodes -o wide | sed 's/^/setup-kubernetes:   /'
say "done in $((SECONDS - T_ALL))s; kubeconfig $ADMIN_KUBECONFIG; kubectl $K8S_BIN/kubectl"
