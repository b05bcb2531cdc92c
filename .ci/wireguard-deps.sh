#!/usr/bin/env bash
# Install what the mesh client's lab tests need on a Debian bookworm machine, as root:
# wireguard-go (the userspace engine, run inside lab namespaces), wireguard-tools (`wg`, used by the
# kernel backend and handy for debugging) and iperf3 (the tunnel benchmark). Idempotent: a second run
# installs nothing and does not even refresh the package lists.
#
#   bash .ci/wireguard-deps.sh            # CI calls this from .ci/run
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
log() { printf '[wireguard-deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "wireguard-deps.sh must run as root" >&2
    exit 1
fi

# iputils-ping: the lab tests ping across the overlay from inside a namespace.
PKGS=(wireguard-go wireguard-tools iperf3 iputils-ping iproute2)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
    log "already installed: ${PKGS[*]}"
    exit 0
fi

log "apt-get update"
apt-get update -qq
log "installing: ${missing[*]}"
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v wireguard-go >/dev/null || { echo "wireguard-go not on PATH after install" >&2; exit 1; }
log "installed: ${missing[*]}"
