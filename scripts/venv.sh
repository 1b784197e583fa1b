# Shared by scripts that keep a Python virtual environment: sourced with $VENV (its
# path) and $PY (the interpreter to make it with) set, and log/die defined.

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 \
        && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

apt_install_venv() {
    command -v apt-get >/dev/null 2>&1 || die "'$PY -m venv' failed and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    log "installing python3-venv with apt-get"
    if ! apt-get install -y -q python3-venv >&2; then
        # Package lists missing or stale: update once, then retry.
        log "apt-get update"
        apt-get update -q >&2
        apt-get install -y -q python3-venv >&2 || die "apt-get install python3-venv failed"
    fi
}

make_venv() {
    rm -rf "$VENV"
    "$1" -m venv "$VENV" >&2 && venv_ok
}

# Create $VENV if it is missing or broken: with $PY, after installing Debian's
# python3-venv if needed, and with Debian's own python3 as a last resort (python3-venv
# serves that interpreter when the python3 on PATH is another build).
create_venv() {
    venv_ok && return 0
    command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH"
    log "creating venv at $VENV with $(command -v "$PY")"
    make_venv "$PY" && return 0
    apt_install_venv
    make_venv "$PY" && return 0
    if [ -x /usr/bin/python3 ] && make_venv /usr/bin/python3; then
        log "using /usr/bin/python3 for the venv"
        return 0
    fi
    rm -rf "$VENV"
    die "could not create a venv at $VENV"
}
