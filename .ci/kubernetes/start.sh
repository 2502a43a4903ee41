#!/usr/bin/env bash
# Certificates, configuration files and the start of every cluster process (sourced by
# .ci/setup-kubernetes.sh after common.sh and build.sh). Processes are started with
# `setsid nohup` so they outlive the calling shell; each one's pid goes to
# $K8S_PIDS/<name>.pid and its output to $K8S_LOGS/<name>.log.

# ---- certificates (openssl) ------------------------------------------------------------
_cert() {  # _cert NAME SUBJECT [SAN]: a key and a CA-signed client/server certificate
    local name=$1 subj=$2 san=${3:-} ext="$K8S_PKI/$1.ext"
    [ -s "$K8S_PKI/$name.crt" ] && return 0
    openssl genrsa -out "$K8S_PKI/$name.key" 2048 2>/dev/null
    openssl req -new -key "$K8S_PKI/$name.key" -subj "$subj" -out "$K8S_PKI/$name.csr"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        [ -n "$san" ] && echo "subjectAltName=$san"
    } > "$ext"
    openssl x509 -req -in "$K8S_PKI/$name.csr" -CA "$K8S_PKI/ca.crt" -CAkey "$K8S_PKI/ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$K8S_PKI/$name.crt" 2>/dev/null
    rm -f "$K8S_PKI/$name.csr" "$ext"
}

k8s_certs() {
    mkdir -p "$K8S_PKI"; chmod 0700 "$K8S_PKI"
    if [ ! -s "$K8S_PKI/ca.crt" ]; then
        openssl genrsa -out "$K8S_PKI/ca.key" 2048 2>/dev/null
        openssl req -x509 -new -nodes -key "$K8S_PKI/ca.key" -subj "/CN=orchestrator-k8s-ca" \
            -days 3650 -sha256 -out "$K8S_PKI/ca.crt"
    fi
    _cert apiserver "/CN=kube-apiserver" \
        "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    _cert admin "/O=system:masters/CN=orchestrator-admin"
    _cert kubelet "/O=system:nodes/CN=system:node:localhost"
    _cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    _cert controller-manager "/CN=system:kube-controller-manager"
    _cert scheduler "/CN=system:kube-scheduler"
    if [ ! -s "$K8S_PKI/sa.key" ]; then
        openssl genrsa -out "$K8S_PKI/sa.key" 2048 2>/dev/null
        openssl rsa -in "$K8S_PKI/sa.key" -pubout -out "$K8S_PKI/sa.pub" 2>/dev/null
    fi
    chmod 0600 "$K8S_PKI"/*.key
}

_kubeconfig() {  # _kubeconfig FILE CERTNAME USER
    local file=$1 cert=$2 user=$3
    umask 077
    cat > "$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: orchestrator-test
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: $(base64 -w0 "$K8S_PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$K8S_PKI/$cert.crt")
    client-key-data: $(base64 -w0 "$K8S_PKI/$cert.key")
contexts:
- name: orchestrator-test
  context: {cluster: orchestrator-test, user: $user, namespace: default}
current-context: orchestrator-test
KC
    chmod 0600 "$file"
    umask 022
}

k8s_kubeconfigs() {
    _kubeconfig "$ADMIN_KUBECONFIG" admin orchestrator-admin
    _kubeconfig "$K8S_STATE/kubelet.kubeconfig" kubelet system:node:localhost
    _kubeconfig "$K8S_STATE/controller-manager.kubeconfig" controller-manager system:kube-controller-manager
    _kubeconfig "$K8S_STATE/scheduler.kubeconfig" scheduler system:kube-scheduler
}

# ---- configuration files ----------------------------------------------------------------
k8s_configs() {
    local tpl="$REPO/.ci/kubernetes"
    mkdir -p "$CNI_CONF_DIR" "$CNI_DATA_DIR" "$CONTAINERD_ROOT" "$K8S_RUN" "$KUBELET_DIR"
    sed -e "s|@CONTAINERD_ROOT@|$CONTAINERD_ROOT|g; s|@K8S_RUN@|$K8S_RUN|g" \
        -e "s|@CONTAINERD_SOCK@|$CONTAINERD_SOCK|g; s|@PAUSE_IMAGE@|$PAUSE_IMAGE|g" \
        -e "s|@CNI_CONF_DIR@|$CNI_CONF_DIR|g" \
        "$tpl/containerd.toml" > "$K8S_STATE/containerd.toml"
    sed -e "s|@CNI_BRIDGE@|$CNI_BRIDGE|g; s|@POD_SUBNET@|$POD_SUBNET|g; s|@CNI_DATA_DIR@|$CNI_DATA_DIR|g" \
        "$tpl/10-bridge.conflist" > "$CNI_CONF_DIR/10-orchestrator-bridge.conflist"
    sed -e "s|@K8S_PKI@|$K8S_PKI|g" "$tpl/kubelet.yaml" > "$K8S_STATE/kubelet.yaml"
}

# ---- host state the cluster changes -----------------------------------------------------
k8s_save_sysctls() {
    [ -s "$SYSCTL_SAVED" ] && return 0      # saved by an earlier start, not restored yet
    local k
    for k in "${KUBELET_SYSCTLS[@]}"; do echo "$k=$(sysctl -n "$k")"; done > "$SYSCTL_SAVED.tmp"
    mv "$SYSCTL_SAVED.tmp" "$SYSCTL_SAVED"
}

# Pods get a bridge with a gateway (so the host reaches them: probes, tests) but no NAT, and
# nothing from the bridge is forwarded to any other interface: no Pod talks to any address
# but this machine's own. Pod-to-Pod on the bridge is accepted (Docker's FORWARD policy is DROP).
k8s_firewall() {
    local r
    for r in "-i $CNI_BRIDGE -o $CNI_BRIDGE -j ACCEPT" "-i $CNI_BRIDGE ! -o $CNI_BRIDGE -j DROP"; do
        # shellcheck disable=SC2086
        iptables -C FORWARD $r -m comment --comment "$IPT_COMMENT" 2>/dev/null \
            || iptables -I FORWARD 1 $r -m comment --comment "$IPT_COMMENT"
    done
}

# ---- processes --------------------------------------------------------------------------
_start() {  # _start NAME CMD...: setsid nohup, pid and log recorded
    local name=$1; shift
    say "starting $name (log: $K8S_LOGS/$name.log)"
    echo "==== $(date -u +%FT%TZ) start" >> "$K8S_LOGS/$name.log"
    # 9>&-: the daemon must not inherit (and so hold for ever) the set-up lock
    setsid nohup "$@" >>"$K8S_LOGS/$name.log" 2>&1 </dev/null 9>&- &
    echo $! > "$K8S_PIDS/$name.pid"
}

_wait() {  # _wait NAME SECONDS CHECK...: poll CHECK until it succeeds; on timeout show the log and die
    local name=$1 secs=$2 t0=$SECONDS; shift 2
    until "$@" >/dev/null 2>&1; do
        if ! pid_of "$name" >/dev/null; then
            echo "---- last lines of $K8S_LOGS/$name.log ----" >&2; tail -n 30 "$K8S_LOGS/$name.log" >&2
            die "$name exited during start-up (log: $K8S_LOGS/$name.log)"
        fi
        if (( SECONDS - t0 >= secs )); then
            echo "---- last lines of $K8S_LOGS/$name.log ----" >&2; tail -n 30 "$K8S_LOGS/$name.log" >&2
            die "$name not ready within ${secs}s (log: $K8S_LOGS/$name.log)"
        fi
        sleep 0.5
    done
    say "$name ready after $((SECONDS - t0))s"
}

_apiserver_ready() {
    curl -fsS --max-time 2 --cacert "$K8S_PKI/ca.crt" --cert "$K8S_PKI/admin.crt" \
        --key "$K8S_PKI/admin.key" https://127.0.0.1:6443/readyz
}
_node_ready() {
    [ "$(kubectl_admin get node localhost \
        -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}
_default_sa_ready() {  # the account and (1.20) its token secret, which Pod admission needs
    [ -n "$(kubectl_admin -n default get serviceaccount default -o 'jsonpath={.secrets[0].name}' 2>/dev/null)" ]
}

k8s_start() {
    mkdir -p "$K8S_PIDS" "$K8S_LOGS" "$K8S_STATE/etcd"
    chmod 0700 "$K8S_STATE/etcd"
    _start etcd etcd --name orchestrator-k8s --data-dir "$K8S_STATE/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster orchestrator-k8s=http://127.0.0.1:2380 --listen-metrics-urls "" \
        --logger zap --log-outputs stderr
    _wait etcd 30 curl -fsS --max-time 2 http://127.0.0.1:2379/health

    _start kube-apiserver "$K8S_BIN/kube-apiserver" \
        --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=127.0.0.1 --secure-port=6443 --insecure-port=0 \
        --tls-cert-file="$K8S_PKI/apiserver.crt" --tls-private-key-file="$K8S_PKI/apiserver.key" \
        --client-ca-file="$K8S_PKI/ca.crt" \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --allow-privileged=true \
        --service-cluster-ip-range="$SERVICE_RANGE" \
        --service-account-key-file="$K8S_PKI/sa.pub" \
        --service-account-signing-key-file="$K8S_PKI/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --kubelet-client-certificate="$K8S_PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$K8S_PKI/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=Hostname \
        --profiling=false --event-ttl=1h
    _wait kube-apiserver 60 _apiserver_ready

    _start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
        --kubeconfig="$K8S_STATE/controller-manager.kubeconfig" \
        --leader-elect=false --port=0 --secure-port=0 --bind-address=127.0.0.1 \
        --use-service-account-credentials=true \
        --service-account-private-key-file="$K8S_PKI/sa.key" --root-ca-file="$K8S_PKI/ca.crt" \
        --allocate-node-cidrs=false --profiling=false
    _start kube-scheduler "$K8S_BIN/kube-scheduler" \
        --kubeconfig="$K8S_STATE/scheduler.kubeconfig" \
        --leader-elect=false --port=0 --secure-port=0 --bind-address=127.0.0.1 --profiling=false

    _start containerd containerd --config "$K8S_STATE/containerd.toml"
    _wait containerd 30 ctr --address "$CONTAINERD_SOCK" version
    k8s_import_tar pause "$K8S_CACHE/pause.tar" "$PAUSE_IMAGE"

    # AWS_EC2_METADATA_DISABLED: kubelet 1.20's built-in AWS credential helper otherwise asks
    # 169.254.169.254 at start-up -- an address that is not this machine's own.
    _start kubelet env AWS_EC2_METADATA_DISABLED=true "$K8S_BIN/kubelet" \
        --config="$K8S_STATE/kubelet.yaml" \
        --kubeconfig="$K8S_STATE/kubelet.kubeconfig" \
        --hostname-override=localhost \
        --root-dir="$KUBELET_DIR" --cert-dir="$KUBELET_DIR/pki" \
        --container-runtime=remote \
        --container-runtime-endpoint="unix://$CONTAINERD_SOCK" \
        --image-service-endpoint="unix://$CONTAINERD_SOCK" \
        --pod-infra-container-image="$PAUSE_IMAGE" \
        --network-plugin=cni --cni-conf-dir="$CNI_CONF_DIR" --cni-bin-dir=/usr/lib/cni
    _wait kubelet 90 _node_ready
    _wait kube-controller-manager 60 _default_sa_ready
}

# k8s_import_tar WHAT TARBALL REF: import a docker-archive into the cluster's containerd
k8s_import_tar() {
    local what=$1 tar=$2 ref=$3
    if ctr_k8s images ls -q | grep -xF "$ref" >/dev/null; then say "$what image already in containerd"; return; fi
    ctr_k8s images import "$tar" >/dev/null || die "importing $tar into containerd failed"
    say "imported $what image $ref"
}

# k8s_import_docker TAG: the Docker image TAG into the cluster's containerd, skipped when
# containerd already holds that image id (docker save | ctr import).
k8s_import_docker() {
    local tag=$1 id have ref
    id=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null) \
        || die "Docker image $tag not found; build it first (.ci/setup-docker.sh builds orchestrator-agent:latest)"
    case "$tag" in */*) ref="docker.io/$tag" ;; *) ref="docker.io/library/$tag" ;; esac
    [[ "$tag" == *:* ]] || ref="$ref:latest"
    have=$(ctr_k8s images ls 2>/dev/null | awk -v r="$ref" '$1 == r {print $3}')
    if [ -n "$have" ] && ctr_k8s content get "$have" 2>/dev/null | grep -F "${id#sha256:}" >/dev/null; then
        say "$tag already in containerd ($id)"; return
    fi
    say "importing Docker image $tag into containerd"
    docker save "$tag" | ctr_k8s images import - >/dev/null || die "docker save $tag | ctr import failed"
}
