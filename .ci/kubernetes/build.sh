#!/usr/bin/env bash
# Build Kubernetes v1.20.2 from Debian bookworm's *source* package (the only place a
# full server tree is reachable from here) into a cache directory, plus the static
# pause image. Sourced by .ci/setup-kubernetes.sh, which defines say/die/step_*.
# Every step is skipped when its output already exists, so a second run is instant.
#
# Layout of $K8S_CACHE (default /var/cache/orchestrator-k8s/v1.20.2):
#   bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kubectl}
#   pause.tar        docker-archive of the pause image (imported into containerd)
#   src/, gopath/, gocache/   the patched tree and Go's build cache (~2 GB), kept so another
#                    binary of the same tree (kube-proxy, say) builds in a minute or two

K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
GO119=/usr/lib/go-1.19/bin/go

k8s_binaries_built() {
    local b
    for b in "${K8S_BINS[@]}"; do [ -x "$K8S_CACHE/bin/$b" ] || return 1; done
}

# 1. the patched source tree, from bookworm's deb-src (a deb-src line is added if missing)
k8s_fetch_source() {
    local src="$K8S_CACHE/src" dl="$K8S_CACHE/download"
    if [ -f "$src/.patched" ]; then say "source tree already unpacked and patched"; return; fi
    if ! apt-cache showsrc kubernetes 2>/dev/null | grep '^Version: .*1\.20\.2' >/dev/null; then
        say "adding a deb-src line for bookworm ($DEB_SRC_FILE)"
        cat > "$DEB_SRC_FILE" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt-get update -q
    fi
    rm -rf "$dl" "$src"
    mkdir -p "$dl"
    say "downloading the kubernetes source package (~35 MB)"
    (cd "$dl" && apt-get source --download-only kubernetes 2>&1 | grep -v '^W: Download is performed unsandboxed' ) \
        || die "apt-get source kubernetes failed; check the deb-src line in $DEB_SRC_FILE"
    mkdir -p "$src.tmp"
    tar -xzf "$dl"/kubernetes_*.orig.tar.gz -C "$src.tmp" --strip-components=1
    tar -xJf "$dl"/kubernetes_*.debian.tar.xz -C "$src.tmp"
    local p
    while read -r p; do
        [ -n "$p" ] && [ "${p#\#}" = "$p" ] || continue
        say "applying Debian patch $p"
        patch -s -p1 -d "$src.tmp" < "$src.tmp/debian/patches/$p" || die "patch $p failed"
    done < "$src.tmp/debian/patches/series"
    mv "$src.tmp" "$src"
    rm -rf "$dl"
    touch "$src/.patched"
}

# GOPATH mode, as Debian builds it: Go 1.19 refuses -mod=vendor for this tree.
k8s_go_env() {
    export GO111MODULE=off CGO_ENABLED=0 GOFLAGS= GOPATH="$K8S_CACHE/gopath"
    export GOCACHE="$K8S_CACHE/gocache" HOME="${HOME:-/root}"
    mkdir -p "$GOPATH/src/k8s.io"
    ln -sfn "$K8S_CACHE/src" "$GOPATH/src/k8s.io/kubernetes"
}

# 2. the one generated file the source package does not ship
k8s_gen_openapi() {
    local tree="$GOPATH/src/k8s.io/kubernetes" out=pkg/generated/openapi/zz_generated.openapi.go
    if [ -s "$K8S_CACHE/src/$out" ]; then say "openapi already generated"; return; fi
    cd "$tree"
    say "building openapi-gen"
    "$GO119" build -o "$K8S_CACHE/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
    # the KUBE target of build/root/Makefile.generated_files: every Go dir (staging named as
    # vendor/), minus code-generator and sample-apiserver, with a +k8s:openapi-gen= tag
    local dirs
    dirs=$(find -H . \( -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) \) \
               -type f -name '*.go' \
           | sed 's|^./staging/src|vendor|; s|^\./||; s|/[^/]*$||' | LC_ALL=C sort -u \
           | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
           | while read -r d; do
                 if grep -l -s '^// *+k8s:openapi-gen=' "$d"/*.go >/dev/null 2>&1; then
                     echo "k8s.io/kubernetes/$d"
                 fi
             done | paste -sd, -)
    [ -n "$dirs" ] || die "found no +k8s:openapi-gen packages in $tree"
    say "generating $out ($(echo "$dirs" | tr ',' '\n' | wc -l) packages)"
    "$K8S_CACHE/openapi-gen" --logtostderr -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi \
        -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
        -r "$K8S_CACHE/openapi-violations.report" >"$K8S_CACHE/openapi-gen.log" 2>&1 \
        || { tail -n 20 "$K8S_CACHE/openapi-gen.log" >&2; die "openapi-gen failed (log: $K8S_CACHE/openapi-gen.log)"; }
    [ -s "$K8S_CACHE/src/$out" ] || die "openapi-gen wrote no $out"
}

# 3. the binaries, in one go build (shared packages compile once); progress every 30 s
k8s_go_build() {
    if k8s_binaries_built; then say "binaries already built in $K8S_CACHE/bin"; return; fi
    cd "$GOPATH/src/k8s.io/kubernetes"
    mkdir -p "$K8S_CACHE/bin.tmp"
    local pkgs=() b
    for b in "${K8S_BINS[@]}"; do pkgs+=("./cmd/$b"); done
    local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.20.2 \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=20 \
-X k8s.io/component-base/version.gitTreeState=archive \
-X k8s.io/client-go/pkg/version.gitVersion=v1.20.2 \
-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=v1.20.2 \
-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1 \
-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20 \
-X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitVersion=v1.20.2"
    say "go build ${K8S_BINS[*]} (~5-6 min cold on 2 cores; log: $K8S_CACHE/go-build.log)"
    "$GO119" build -trimpath -ldflags "$ldflags" -o "$K8S_CACHE/bin.tmp/" "${pkgs[@]}" \
        >"$K8S_CACHE/go-build.log" 2>&1 &
    local pid=$! t0=$SECONDS next=30
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if (( SECONDS - t0 >= next )); then
            say "  go build running, $((SECONDS - t0))s, build cache $(du -sh "$GOCACHE" 2>/dev/null | cut -f1)"
            next=$((next + 30))
        fi
    done
    wait "$pid" || { tail -n 30 "$K8S_CACHE/go-build.log" >&2; die "go build failed (log: $K8S_CACHE/go-build.log)"; }
    mkdir -p "$K8S_CACHE/bin"
    for b in "${K8S_BINS[@]}"; do mv "$K8S_CACHE/bin.tmp/$b" "$K8S_CACHE/bin/$b"; done
    rmdir "$K8S_CACHE/bin.tmp" 2>/dev/null || true
    "$K8S_CACHE/bin/kubectl" version --client --short 2>/dev/null | sed 's/^/setup-kubernetes:   /' || true
}

# 4. the pause image: Kubernetes' own pause.c, static, in a one-layer docker-archive
k8s_build_pause() {
    if [ -s "$K8S_CACHE/pause.tar" ]; then say "pause image already built"; return; fi
    local w="$K8S_CACHE/pause.build"
    rm -rf "$w"; mkdir -p "$w/rootfs"
    say "compiling build/pause/linux/pause.c statically"
    gcc -Os -static -Wall -Werror -DVERSION=v3.4.1-orchestrator -o "$w/rootfs/pause" \
        "$K8S_CACHE/src/build/pause/linux/pause.c" || die "gcc failed on pause.c (is libc6-dev installed?)"
    strip "$w/rootfs/pause"
    tar -C "$w/rootfs" --owner=0 --group=0 --numeric-owner -cf "$w/layer.tar" pause
    local layer_sha cfg cfg_sha created="1970-01-01T00:00:00Z"
    layer_sha=$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
    cfg="{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"$created\",\"config\":{\"Entrypoint\":[\"/pause\"],\"User\":\"65535:65535\"},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer_sha\"]},\"history\":[{\"created\":\"$created\",\"created_by\":\"orchestrator .ci/kubernetes/build.sh\"}]}"
    cfg_sha=$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)
    mkdir -p "$w/img/$layer_sha"
    mv "$w/layer.tar" "$w/img/$layer_sha/layer.tar"
    printf '%s' "$cfg" > "$w/img/$cfg_sha.json"
    printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
        "$cfg_sha" "$PAUSE_IMAGE" "$layer_sha" > "$w/img/manifest.json"
    tar -C "$w/img" --owner=0 --group=0 --numeric-owner -cf "$K8S_CACHE/pause.tar.tmp" .
    mv "$K8S_CACHE/pause.tar.tmp" "$K8S_CACHE/pause.tar"
    rm -rf "$w"
}
