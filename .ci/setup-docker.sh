#!/usr/bin/env bash
# Prepare a fresh CI machine for the Docker tests: install Docker and debootstrap,
# make sure a Docker daemon answers, and build the agent image with the project's
# own builder. Idempotent: every step is skipped when already done.
#
#   sudo .ci/setup-docker.sh [PYTHON]        # PYTHON: the venv interpreter
#   sudo PYTHON=.venv/bin/python .ci/setup-docker.sh
#
# Needs root (apt-get, dockerd, debootstrap). Env: DOCKERD_LOG (daemon log file),
# DOCKERD_WAIT (seconds to wait for the daemon, default 60),
# ORCHESTRATOR_DEBIAN_MIRROR (debootstrap mirror).
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="${DOCKERD_LOG:-/var/log/orchestrator-ci-dockerd.log}"
WAIT="${DOCKERD_WAIT:-60}"

say() { echo "setup-docker: $*"; }
die() { echo "setup-docker: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"

# 1. packages
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1 \
   || ! command -v debootstrap >/dev/null 2>&1; then
    say "installing docker.io and debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y docker.io debootstrap
else
    say "docker and debootstrap already installed"
fi

# 2. daemon
if docker info >/dev/null 2>&1; then
    say "Docker daemon already answering"
else
    if pidof dockerd >/dev/null 2>&1; then
        say "dockerd is running but not answering yet; waiting"
    else
        say "starting dockerd in the background (log: $LOG)"
        mkdir -p "$(dirname "$LOG")"
        setsid nohup dockerd >>"$LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 "$WAIT"); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "---- last lines of $LOG ----" >&2
        tail -n 40 "$LOG" >&2 || true
        die "Docker daemon did not answer within ${WAIT}s"
    fi
    say "Docker daemon is up"
fi
docker version --format 'setup-docker: client {{.Client.Version}}, server {{.Server.Version}}'

# 3. agent image (debootstrap base once, then the code layer; skipped when up to date)
cd "$REPO"
"$PY" -m orchestrator.runtime.docker.image build
say "done"
