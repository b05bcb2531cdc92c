#!/usr/bin/env bash
# Install the system tools tests/test_deploy.py needs to check deploy/ offline:
#   - systemd-analyze (Debian `systemd`): `systemd-analyze verify` / `security --offline` of the unit;
#   - promtool (Debian `prometheus`, via .ci/metrics-deps.sh): rule checks and rule unit tests.
# The Python side (kubernetes-validate, pyyaml) comes with `pip install -e '.[test]'`.
# Idempotent: a second run installs nothing. No container engine, cluster or network beyond apt.
#
#   bash .ci/deploy-deps.sh           # CI calls this from .ci/run
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
log() { printf '[deploy-deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "deploy-deps.sh must run as root" >&2
    exit 1
fi

if command -v systemd-analyze >/dev/null; then
    log "systemd-analyze already installed: $(systemd-analyze --version | head -n1)"
else
    log "installing systemd (for systemd-analyze), without recommends"
    apt-get update -qq
    # Installing the package in a container does not start anything: there is no systemd PID 1.
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
    command -v systemd-analyze >/dev/null
    log "installed $(systemd-analyze --version | head -n1)"
fi

if command -v promtool >/dev/null; then
    log "promtool already installed: $(command -v promtool)"
else
    bash .ci/metrics-deps.sh
fi
