#!/usr/bin/env bash
# Create (if missing) and update the Python venv used by tests/interop.
#
#   scripts/interop-env.sh            # prints the venv path on its last line
#   VENV=$(scripts/interop-env.sh | tail -n1)
#   "$VENV/bin/python" -m pytest tests/interop
#
# Environment:
#   SALON_VENV    venv location (default: $HOME/.cache/salon/venv)
#   SALON_PYTHON  interpreter used to create the venv (default: python3)
#
# Idempotent: the requirements are (re)installed only when the sha256 of
# tests/interop/requirements.txt differs from the stamp kept inside the venv.
# Progress goes to stderr; nothing but the venv path goes to stdout, and
# nothing else at all is printed when there is nothing to do.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/tests/interop/requirements.txt"
VENV="${SALON_VENV:-$HOME/.cache/salon/venv}"
PY="${SALON_PYTHON:-python3}"
STAMP="$VENV/.salon-requirements.sha256"

log() { echo "interop-env: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$REQ" ] || die "missing $REQ"
command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH"

# Serialise concurrent runs (e.g. two test jobs starting at once).
mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    flock 9
fi

. "$ROOT/scripts/venv.sh"

if ! venv_ok; then
    create_venv
    rm -f "$STAMP"
fi

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    log "installing $REQ"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" >&2 \
        || die "pip install -r $REQ failed"
    echo "$want" >"$STAMP"
fi

echo "$VENV"
