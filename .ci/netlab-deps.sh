#!/usr/bin/env bash
# Install everything natlib.testing (the NAT lab) needs on a Debian bookworm machine, as root, and
# build the lab copy of miniupnpd. Idempotent: a second run installs nothing and builds nothing.
#
#   bash .ci/netlab-deps.sh            # CI calls this from .ci/run
#
# The lab copy of miniupnpd is Debian's own source package with the three RFC 5737 TEST-NET entries
# removed from reserved[] in getifaddr.c, so that it serves NAT-PMP/PCP/UPnP on a documentation-range
# external address (see docs/netlab.md). It lands in $MESHRELAY_NETLAB_CACHE/miniupnpd
# (default /var/cache/meshrelay-netlab/miniupnpd), where natlib.testing looks for it
# (override with NATLIB_TESTING_MINIUPNPD=/path/to/binary).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
CACHE="${MESHRELAY_NETLAB_CACHE:-/var/cache/meshrelay-netlab}"
BIN="$CACHE/miniupnpd"
NFT_INIT_DIR="$CACHE/nft-scripts"

log() { printf '[netlab-deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "netlab-deps.sh must run as root" >&2
    exit 1
fi

# Runtime tools of the lab and the reference clients used by the tests.
RUNTIME_PKGS=(iproute2 nftables conntrack procps miniupnpc natpmpc)
# What "apt-get source" needs to unpack a source package.
SOURCE_PKGS=(dpkg-dev)

missing=()
for p in "${RUNTIME_PKGS[@]}" "${SOURCE_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq
        updated=1
    fi
}

if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    log "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -x "$BIN" ] && [ -x "$NFT_INIT_DIR/nft_init.sh" ]; then
    log "lab miniupnpd already built: $BIN"
    exit 0
fi

# deb-src entry for bookworm main (deb822 format, like the image's own debian.sources).
SRC_LIST=/etc/apt/sources.list.d/meshrelay-netlab-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src ' /etc/apt/sources.list; then
    log "adding deb-src entry $SRC_LIST"
    cat >"$SRC_LIST" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    updated=0
fi
apt_update

log "apt-get build-dep miniupnpd"
apt-get build-dep -y -qq miniupnpd >/dev/null

work="$(mktemp -d /tmp/meshrelay-miniupnpd.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cd "$work"
log "apt-get source miniupnpd (in $work)"
# _apt cannot write into a mktemp dir; that only produces a warning, so silence it.
apt-get source -qq miniupnpd >/dev/null 2>&1 || apt-get source miniupnpd
src="$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'miniupnpd-*' | head -n1)"
[ -n "$src" ] || { echo "apt-get source produced no miniupnpd-* directory" >&2; exit 1; }
cd "$src"

log "patching out the RFC 5737 TEST-NET entries of reserved[] in getifaddr.c"
before=$(grep -c 'RFC5737' getifaddr.c || true)
sed -i '/RFC5737 Documentation (TEST-NET-[123])/d' getifaddr.c
after=$(grep -c 'RFC5737' getifaddr.c || true)
if [ "$before" -ne 3 ] || [ "$after" -ne 0 ]; then
    echo "unexpected getifaddr.c: $before RFC5737 lines before the patch, $after after" >&2
    exit 1
fi

log "configure --firewall=nftables && make (this takes about a minute)"
./configure --firewall=nftables >/dev/null
make -j"$(nproc)" miniupnpd >/dev/null 2>&1 || make -j"$(nproc)" >/dev/null

mkdir -p "$CACHE" "$NFT_INIT_DIR"
install -m 0755 miniupnpd "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
# The nftables skeleton scripts of this source tree (the lab may use them for reference).
cp -f netfilter_nft/scripts/*.sh "$NFT_INIT_DIR"/ 2>/dev/null || true
chmod 0755 "$NFT_INIT_DIR"/*.sh 2>/dev/null || true
log "built $BIN"
