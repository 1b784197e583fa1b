#!/usr/bin/env bash
# Install (if needed) what the matrix-js-sdk interop suite in tests/interop-js needs.
#
#   scripts/interop-js-env.sh
#   SALON_BIN=$CARGO_TARGET_DIR/debug/salon node --test tests/interop-js/
#
# - Node.js and npm: Debian's nodejs and npm packages are installed with
#   apt-get only when there is no `node` on PATH at all. The suite pins
#   matrix-js-sdk 37.5.0, the newest release that supports Node.js 20
#   (later ones require Node.js >= 22); an older node is refused.
# - node_modules: `npm ci` runs in tests/interop-js only when node_modules is
#   missing or package-lock.json changed since the last install (its sha256
#   is kept in node_modules/.salon-package-lock.sha256).
#
# Progress goes to stderr; nothing is printed on stdout, and nothing at all
# when there is nothing to do.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/tests/interop-js"
LOCK="$DIR/package-lock.json"
MODULES="$DIR/node_modules"
STAMP="$MODULES/.salon-package-lock.sha256"
MIN_NODE_MAJOR=20

log() { echo "interop-js-env: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$LOCK" ] || die "missing $LOCK"
[ -f "$DIR/package.json" ] || die "missing $DIR/package.json"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v node >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "node is not installed and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    log "installing nodejs and npm with apt-get"
    if ! as_root apt-get install -y -q --no-install-recommends nodejs npm >&2; then
        # Package lists missing or stale: update once, then retry.
        log "apt-get update"
        as_root apt-get update -q >&2
        as_root apt-get install -y -q --no-install-recommends nodejs npm >&2 \
            || die "apt-get install nodejs npm failed"
    fi
fi
command -v npm >/dev/null 2>&1 || die "node is installed but npm is not (install npm)"

node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
if [ "$node_major" -lt "$MIN_NODE_MAJOR" ]; then
    die "node $(node --version 2>/dev/null) is too old: tests/interop-js needs Node.js >= $MIN_NODE_MAJOR"
fi

# Serialise concurrent runs (e.g. two test jobs starting at once).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DIR/.interop-js-env.lock"
    flock 9
fi

want="$(sha256sum "$LOCK" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ] || [ ! -f "$MODULES/matrix-js-sdk/package.json" ]; then
    log "npm ci in $DIR"
    rm -f "$STAMP"
    (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci failed in $DIR"
    echo "$want" >"$STAMP"
fi
