#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the status-page test
# (tests/api/test_status_page.py drives the page in a real headless browser; with CI set
# that test fails, not skips, when they are missing). Idempotent; needs root.
set -euo pipefail

say() { echo "setup-browser: $*"; }
[ "$(id -u)" -eq 0 ] || { echo "setup-browser: ERROR: run as root" >&2; exit 1; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    say "chromium and chromedriver already installed"
else
    say "installing chromium and chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y chromium chromium-driver
fi
chromium --version
