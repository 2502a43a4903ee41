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

# 1. the kubelet first, so it does not restart what is being removed
stop_pid kubelet 15

# 2. CRI containers and sandboxes, through our own containerd while it still runs
netns=()
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
            ctr_k8s tasks ls -q 2>/dev/null | grep -qxF "$c" || break
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
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "containerd-shim.* -address $CONTAINERD_SOCK "; then
        say "killing leftover shim ${p#/proc/}"; kill -KILL "${p#/proc/}" 2>/dev/null
    fi
done

# 4. control plane, in reverse start order
for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$p" 15; done

# 5. mounts under the kubelet dir, containerd's root/state (deepest first)
for prefix in "$KUBELET_DIR" "$CONTAINERD_ROOT" "$K8S_RUN"; do
    findmnt -rn -o TARGET | grep -F "$prefix/" | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
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
while iptables -S FORWARD 2>/dev/null | grep -q -- "--comment $IPT_COMMENT"; do
    rule=$(iptables -S FORWARD | grep -- "--comment $IPT_COMMENT" | head -n1 | sed 's/^-A /-D /')
    # shellcheck disable=SC2086
    eval iptables $rule || break
done

# 7. kubepods cgroups (all hierarchies; empty ones only, deepest first)
for root in /sys/fs/cgroup /sys/fs/cgroup/*; do
    [ -d "$root/kubepods" ] || [ -d "$root/kubepods.slice" ] || continue
    find "$root/kubepods" "$root/kubepods.slice" -depth -type d -exec rmdir {} + 2>/dev/null
    [ -d "$root/kubepods" ] && say "could not remove $root/kubepods (processes left?)"
done

# 8. the sysctls the kubelet changed
if [ -s "$SYSCTL_SAVED" ]; then
    while IFS='=' read -r k v; do sysctl -q -w "$k=$v" >/dev/null || say "could not restore $k=$v"; done < "$SYSCTL_SAVED"
    rm -f "$SYSCTL_SAVED"
    say "restored sysctls"
fi

# 9. state that must not leak into the next start (certs and the image store stay)
rm -rf "$K8S_STATE/etcd" "$KUBELET_DIR" "$K8S_RUN" "$K8S_PIDS"
say "done"
