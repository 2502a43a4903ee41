#!/usr/bin/env bash
# Stop the test cluster started by .ci/setup-kubernetes.sh and undo what it did to the host:
# every process stopped by its recorded pid, the CRI containers and sandboxes removed, kubelet
# and containerd mounts unmounted, the Pods' network namespaces and the bridge deleted, the
# kubepods cgroups removed, the sysctls the kubelet changed restored and the firewall rules
# removed. Keeps the build cache, the certificates and containerd's image store (imported
# images stay); the etcd data and the kubelet's directory go, so the next start is clean.
#
#   sudo bash .ci/teardown-kubernetes.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "teardown-kubernetes: $*"; }
die() { echo "teardown-kubernetes: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo bash $0)"
# shellcheck source=kubernetes/common.sh
source "$REPO/.ci/kubernetes/common.sh"
k8s_lock

# 1. the kubelet first, so it does not restart what is being removed
stop_pid kubelet 15

# 2. CRI containers and sandboxes, through our own containerd (started again for this if a
#    half-started cluster lost it while its containers live on)
netns=()
if ! pid_of containerd >/dev/null && [ -s "$K8S_STATE/containerd.toml" ] \
        && [ -d "$CONTAINERD_ROOT/root" ]; then
    say "containerd is not running: starting it to remove what it left"
    mkdir -p "$K8S_PIDS" "$K8S_LOGS"
    setsid nohup containerd --config "$K8S_STATE/containerd.toml" \
        >>"$K8S_LOGS/containerd.log" 2>&1 </dev/null 9>&- &
    echo $! > "$K8S_PIDS/containerd.pid"
    for _ in $(seq 1 100); do ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
fi
if pid_of containerd >/dev/null; then
    for c in $(ctr_k8s containers ls -q 2>/dev/null); do
        ns=$(ctr_k8s containers info "$c" 2>/dev/null | python3 -c '
import json, sys
spec = json.load(sys.stdin).get("Spec") or {}
for n in (spec.get("linux") or {}).get("namespaces") or []:
    if n.get("type") == "network" and n.get("path"):
        print(n["path"])' 2>/dev/null)
        [ -n "$ns" ] && netns+=("$ns")
        ctr_k8s tasks kill -a -s SIGKILL "$c" >/dev/null 2>&1
    done
    for c in $(ctr_k8s containers ls -q 2>/dev/null); do
        for _ in $(seq 1 50); do
            ctr_k8s tasks ls -q 2>/dev/null | grep -xF "$c" >/dev/null || break
            ctr_k8s tasks delete -f "$c" >/dev/null 2>&1 && break
            sleep 0.1
        done
        ctr_k8s containers delete "$c" >/dev/null 2>&1 || say "could not delete container $c"
    done
    say "removed CRI containers and sandboxes"
fi

# 3. containerd; then any shim still serving our socket (found by our socket path, killed by pid)
stop_pid containerd 15
for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -- "containerd-shim.* -address $CONTAINERD_SOCK " >/dev/null; then
        say "killing leftover shim ${p#/proc/}"; kill -KILL "${p#/proc/}" 2>/dev/null
    fi
done

# 4. control plane, in reverse start order
for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$p" 15; done

# 5. mounts: the kubelet dir itself (the kubelet bind-mounts it onto itself, shared) and
#    everything under it and containerd's root/state, deepest first, stacked ones too
for prefix in "$KUBELET_DIR" "$CONTAINERD_ROOT" "$K8S_RUN"; do
    for _ in 1 2 3 4 5; do
        mounts=$(findmnt -rn -o TARGET | awk -v p="$prefix" '$0 == p || index($0, p "/") == 1' | sort -r)
        [ -n "$mounts" ] || break
        while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
        done <<< "$mounts"
    done
done

# 6. network: the sandboxes' namespaces (the ones our containers named), the bridge, IPAM state
for ns in "${netns[@]}"; do
    [ -e "$ns" ] || continue
    name=$(basename "$ns")
    if [ "$(dirname "$ns")" = /var/run/netns ] || [ "$(dirname "$ns")" = /run/netns ]; then
        ip netns delete "$name" 2>/dev/null || { umount "$ns" 2>/dev/null; rm -f "$ns"; }
    fi
done
ip link show "$CNI_BRIDGE" >/dev/null 2>&1 && ip link delete "$CNI_BRIDGE" && say "deleted bridge $CNI_BRIDGE"
rm -rf "$CNI_DATA_DIR"
while iptables -S FORWARD 2>/dev/null | grep -- "--comment $IPT_COMMENT" >/dev/null; do
    rule=$(iptables -S FORWARD | grep -- "--comment $IPT_COMMENT" | head -n1 | sed 's/^-A /-D /')
    # shellcheck disable=SC2086
    eval iptables $rule || break
done

# 7. kubepods cgroups: any process still in one (a container whose shim died) is killed by
#    its pid, then the cgroups go (all hierarchies, deepest first)
for procs in $(find /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/kubepods.slice -name cgroup.procs 2>/dev/null); do
    while read -r pid; do
        [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null && say "killed leftover container process $pid"
    done < "$procs"
done
for root in /sys/fs/cgroup/*; do
    [ -d "$root/kubepods" ] || [ -d "$root/kubepods.slice" ] || continue
    for _ in $(seq 1 50); do   # a killed process leaves its cgroup a moment later
        find "$root/kubepods" "$root/kubepods.slice" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$root/kubepods" ] || [ -d "$root/kubepods.slice" ] || break
        sleep 0.1
    done
    [ -d "$root/kubepods" ] && say "could not remove $root/kubepods (processes left?)"
done

# 8. the sysctls the kubelet changed
if [ -s "$SYSCTL_SAVED" ]; then
    while IFS='=' read -r k v; do sysctl -q -w "$k=$v" >/dev/null || say "could not restore $k=$v"; done < "$SYSCTL_SAVED"
    rm -f "$SYSCTL_SAVED"
    say "restored sysctls"
fi

# 9. state that must not leak into the next start (certs and the image store stay)
# --one-file-system: never through a mount that failed to go (a volume of a Pod)
rm -rf --one-file-system "$K8S_STATE/etcd" "$KUBELET_DIR" "$K8S_RUN" "$K8S_PIDS"
say "done"
