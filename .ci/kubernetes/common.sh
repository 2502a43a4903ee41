#!/usr/bin/env bash
# Names and paths shared by .ci/setup-kubernetes.sh and .ci/teardown-kubernetes.sh (sourced).
# Everything the test cluster owns lives under these directories, so the tear-down can
# find it all without touching Docker's containerd or anything else on the machine.

K8S_VERSION=v1.20.2
K8S_CACHE="${ORCHESTRATOR_K8S_CACHE:-/var/cache/orchestrator-k8s/$K8S_VERSION}"
K8S_BIN="$K8S_CACHE/bin"
K8S_STATE=/var/lib/orchestrator-k8s            # certs, kubeconfigs, pids, etcd, kubelet, containerd root
K8S_LOGS=/var/log/orchestrator-k8s
K8S_RUN=/run/orchestrator-k8s                  # containerd state + socket
K8S_PKI="$K8S_STATE/pki"
K8S_PIDS="$K8S_STATE/pids"
CONTAINERD_SOCK="$K8S_RUN/containerd.sock"
CONTAINERD_ROOT="$K8S_STATE/containerd"
KUBELET_DIR="$K8S_STATE/kubelet"
CNI_CONF_DIR="$K8S_STATE/cni/net.d"
CNI_DATA_DIR="$K8S_STATE/cni/networks"
CNI_BRIDGE=ok8s0                               # the pods' bridge
POD_SUBNET=10.244.0.0/24
SERVICE_RANGE=10.0.0.0/24                      # the kubernetes Service gets 10.0.0.1
PAUSE_IMAGE=localhost/orchestrator-k8s-pause:$K8S_VERSION
ADMIN_KUBECONFIG="$K8S_STATE/admin.kubeconfig"
DEB_SRC_FILE=/etc/apt/sources.list.d/orchestrator-bookworm-src.sources
SYSCTL_SAVED="$K8S_STATE/sysctl.saved"
# sysctls kubelet 1.20 sets at start (protectKernelDefaults=false); saved first, restored on tear-down
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
                 kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# start order; the tear-down stops them in reverse
K8S_PROCS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet)
IPT_COMMENT=orchestrator-k8s

K8S_LOCK=/run/orchestrator-k8s.lock             # one set-up or tear-down at a time

# k8s_lock: hold $K8S_LOCK for the rest of this script (a nested call, the set-up running the
# tear-down, already holds it through ORCHESTRATOR_K8S_LOCKED)
k8s_lock() {
    [ -n "${ORCHESTRATOR_K8S_LOCKED:-}" ] && return 0
    exec 9>"$K8S_LOCK"
    if ! flock -n 9; then
        say "another set-up or tear-down of the test cluster is running; waiting for it (up to 20 min)"
        flock -w 1200 9 || die "the test cluster lock $K8S_LOCK is still held after 20 min"
    fi
    export ORCHESTRATOR_K8S_LOCKED=1
}

ctr_k8s() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
kubectl_admin() { "$K8S_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

pid_of() {  # pid_of NAME -> the recorded pid if that process is still alive
    local f="$K8S_PIDS/$1.pid" pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# stop_pid NAME [SECONDS]: TERM, wait, then KILL, by the recorded pid only
stop_pid() {
    local name=$1 wait=${2:-10} pid i
    pid=$(pid_of "$name") || { rm -f "$K8S_PIDS/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop on TERM within ${wait}s; KILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$K8S_PIDS/$name.pid"
}
