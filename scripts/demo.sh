#!/usr/bin/env bash
# One command from a fresh clone: set up a virtualenv, install, run the demo on the
# embedded default config (local runtime, reference agent, ./data).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/orchestrator demo --config config.toml "$@"
