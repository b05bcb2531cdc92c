#!/usr/bin/env bash
# Install the third-party STUN servers natlib's STUN client is tested against, on Debian, as root:
# coturn (`turnserver`) and stund (package stun-server, binary `stund`); and iptables, whose NFQUEUE
# target the netcheck lab test uses to delay a relay's replies (the CI kernel has no sch_netem, and
# nftables' own queue expression is not built in either). Idempotent: a second run installs nothing. The packages' own services are never started here (the tests start their own
# servers on loopback or inside lab namespaces); on a machine with systemd they are disabled.
#
#   bash .ci/stun-deps.sh            # CI calls this from .ci/run
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
log() { printf '[stun-deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "stun-deps.sh must run as root" >&2
    exit 1
fi

PKGS=(coturn stun-server iptables)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    # policy-rc.d 101: do not start the packages' daemons from their postinst scripts.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$created_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
else
    log "${PKGS[*]} already installed"
fi

for tool in turnserver stund iptables; do
    command -v "$tool" >/dev/null || { echo "stun-deps.sh: $tool is still missing" >&2; exit 1; }
done
log "ok: $(command -v turnserver) $(command -v stund) $(command -v iptables)"
