#!/usr/bin/env bash
# Install Debian's Prometheus server and promtool for the metrics tests
# (tests/api/test_metrics_prometheus.py runs the binary itself on a loopback port with
# its own config and storage in a temporary folder, and runs `promtool check metrics`;
# with CI set those tests fail, not skip, when the binaries are missing).
# The Debian service is never started: the package's own unit is masked/stopped.
# Idempotent; needs root.
set -euo pipefail

say() { echo "setup-prometheus: $*"; }
[ "$(id -u)" -eq 0 ] || { echo "setup-prometheus: ERROR: run as root" >&2; exit 1; }

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    say "prometheus and promtool already installed"
else
    say "installing prometheus (the service is not started)"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the package's postinst must not start the daemon (tests run
    # their own instance on a free port; the default :9090 may be taken)
    policy=/usr/sbin/policy-rc.d
    had_policy=0
    [ -e "$policy" ] && had_policy=1
    if [ "$had_policy" -eq 0 ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
    fi
    apt-get update
    apt-get install -y --no-install-recommends prometheus || {
        [ "$had_policy" -eq 1 ] || rm -f "$policy"; exit 1; }
    [ "$had_policy" -eq 1 ] || rm -f "$policy"
fi
prometheus --version 2>&1 | head -1
promtool --version 2>&1 | head -1
