#!/usr/bin/env bash
# Install the Prometheus server and promtool (Debian bookworm's `prometheus` package) for
# tests/test_relay_metrics.py, which scrapes a live relay with a real Prometheus and lints the
# exposition with `promtool check metrics`. Idempotent: a second run installs nothing.
#
#   bash .ci/metrics-deps.sh           # CI calls this from .ci/run
#
# The package ships an init script and a systemd unit. We never want it to start a server on
# :9090 (the tests run their own on a free port), so the install runs with a policy-rc.d that
# forbids starting services, unless the machine already has one (Docker images do).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
log() { printf '[metrics-deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "metrics-deps.sh must run as root" >&2
    exit 1
fi

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    log "prometheus already installed: $(command -v prometheus)"
    exit 0
fi

POLICY=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    own_policy=1
fi
cleanup() { if [ "$own_policy" -eq 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

log "apt-get update"
apt-get update -qq
log "installing prometheus (server + promtool), without recommends"
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null
log "installed $(prometheus --version 2>&1 | head -n1)"
