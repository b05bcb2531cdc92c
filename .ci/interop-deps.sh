#!/usr/bin/env bash
# Build the Go interop peers for tests/interop: Tailscale's derper, our derpcheck probe and our
# discovector (disco wire-format cross-check), all
# from the tailscale.com version pinned in tests/interop/go.mod (checksums in go.sum).
#
#   bash .ci/interop-deps.sh            # builds into $MESHRELAY_INTEROP_BIN or the default below
#
# Idempotent: does nothing when the binaries are newer than go.mod, go.sum and their *.go.
# Needs Go (>= the go line in go.mod) and the Go module proxy; about a minute on 2 cores with a
# cold module and build cache. The binaries live outside the repository; the tests look for them
# in the same directory (tests/interop/_interop.py: MESHRELAY_INTEROP_BIN or the default).
set -euo pipefail
cd "$(dirname "$0")/.."
mod=tests/interop
bin=${MESHRELAY_INTEROP_BIN:-/var/cache/meshrelay-interop/bin}

go=$(command -v go || true)
if [ -z "$go" ] && [ -x /usr/local/go/bin/go ]; then
    go=/usr/local/go/bin/go
fi
if [ -z "$go" ]; then
    echo "interop-deps: no go toolchain found (PATH or /usr/local/go/bin)" >&2
    exit 1
fi

up_to_date() {
    local b src
    for b in "$bin/derper" "$bin/derpcheck" "$bin/discovector"; do
        [ -x "$b" ] || return 1
        for src in "$mod/go.mod" "$mod/go.sum" "$mod"/derpcheck/*.go "$mod"/discovector/*.go "$0"; do
            [ "$b" -nt "$src" ] || return 1
        done
    done
}

if up_to_date; then
    echo "interop-deps: $bin/derper, derpcheck and discovector are up to date"
    exit 0
fi

mkdir -p "$bin"
start=$(date +%s)
# Never let go.mod's go line fetch another toolchain behind our back; go.sum is authoritative.
export GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -mod=readonly"
version=$(cd "$mod" && "$go" list -m -f '{{.Version}}' tailscale.com)
echo "interop-deps: building tailscale.com@$version with $("$go" version) into $bin"
(
    cd "$mod"
    "$go" mod download tailscale.com
    # derper: built inside this module, so it is exactly the pinned version (tools.go keeps the
    # dependency in go.mod/go.sum). Build to a temporary name and rename, so a failed or
    # interrupted build never leaves a half-written binary that looks fresh.
    "$go" build -trimpath -o "$bin/derper.tmp" tailscale.com/cmd/derper
    # derpcheck: ts_debug_websockets compiles in derphttp's WebSocket dialer (enabled at run time
    # by TS_DEBUG_DERP_WS_CLIENT=1), so the tests can drive DERP over WebSocket from Go too.
    "$go" build -trimpath -tags ts_debug_websockets -o "$bin/derpcheck.tmp" ./derpcheck
    "$go" build -trimpath -o "$bin/discovector.tmp" ./discovector
)
mv -f "$bin/derper.tmp" "$bin/derper"
mv -f "$bin/derpcheck.tmp" "$bin/derpcheck"
mv -f "$bin/discovector.tmp" "$bin/discovector"
echo "$version" > "$bin/VERSION"
echo "interop-deps: done in $(( $(date +%s) - start ))s"
