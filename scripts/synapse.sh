#!/usr/bin/env bash
# Install and run Synapse (the reference Matrix homeserver) on loopback, so the
# load benchmark can measure Salon and Synapse side by side on one machine.
# Synapse's code never enters this repository: it is installed from PyPI into a
# venv under the user's cache, and its config is written into a work directory.
#
#   scripts/synapse.sh install             # venv + pip install matrix-synapse (idempotent)
#   scripts/synapse.sh config  DIR PORT    # write DIR/homeserver.yaml (+ log config, signing key)
#   scripts/synapse.sh command DIR PORT    # config, then print ONE shell line that execs
#                                          # Synapse in the foreground (for `sh -c`)
#   scripts/synapse.sh start   DIR PORT    # config, start in the background, wait for
#                                          # /_matrix/client/versions; stdout: pid=… url=…
#   scripts/synapse.sh stop    DIR         # SIGTERM DIR/synapse.pid, SIGKILL after 20 s
#
# The server is "localhost", listens on 127.0.0.1:PORT (client API only, no
# federation), uses SQLite at DIR/homeserver.db, allows open registration with
# m.login.dummy, and has every rate limit lifted. The registration shared secret
# (for /_synapse/admin/v1/register) is kept in DIR/registration_shared_secret and
# printed on stderr; set SYNAPSE_REGISTRATION_SECRET to choose it.
#
# Environment:
#   SYNAPSE_VENV    venv location (default: $HOME/.cache/salon/synapse-venv)
#   SYNAPSE_PYTHON  interpreter used to create the venv (default: python3)
#   SYNAPSE_START_TIMEOUT  seconds `start` waits for the server (default: 120)
#
# Progress goes to stderr; stdout carries only what each subcommand promises.
set -euo pipefail

SYNAPSE_VERSION=1.163.2
VENV="${SYNAPSE_VENV:-$HOME/.cache/salon/synapse-venv}"
PY="${SYNAPSE_PYTHON:-python3}"
STAMP="$VENV/.salon-synapse-version"
START_TIMEOUT="${SYNAPSE_START_TIMEOUT:-120}"

log() { echo "synapse: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '7,13p' "${BASH_SOURCE[0]}" | sed 's/^#   //' >&2
    exit 2
}

# --- install ---------------------------------------------------------------

. "$(dirname "${BASH_SOURCE[0]}")/venv.sh"

installed() {
    venv_ok && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$SYNAPSE_VERSION" ]
}

cmd_install() {
    mkdir -p "$(dirname "$VENV")"
    # Serialise concurrent installs; the lock is released (fd closed) before
    # returning, so a Synapse started afterwards does not inherit it.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$VENV.lock"
        flock 9
    fi
    installed || do_install
    exec 9>&-
}

do_install() {
    create_venv
    rm -f "$STAMP"
    log "pip install matrix-synapse==$SYNAPSE_VERSION into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "matrix-synapse==$SYNAPSE_VERSION" >&2 \
        || die "pip install matrix-synapse==$SYNAPSE_VERSION failed"
    "$VENV/bin/python" -c 'import synapse, synapse.synapse_rust' >&2 \
        || die "synapse does not import after install"
    echo "$SYNAPSE_VERSION" >"$STAMP"
    log "installed matrix-synapse $SYNAPSE_VERSION"
}

# --- config ----------------------------------------------------------------

# A YAML single-quoted scalar.
yq() { local s=${1//\'/\'\'}; printf "'%s'" "$s"; }
# A POSIX-shell single-quoted word.
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

random_secret() {
    "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))'
}

# Sets DIR (absolute) and PORT from the arguments.
parse_dir_port() {
    [ $# -eq 2 ] || usage
    mkdir -p "$1"
    DIR="$(cd "$1" && pwd)"
    PORT="$2"
    [[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] \
        || die "bad port '$PORT'"
}

# Every rate limit Synapse 1.163 reads (synapse/config/ratelimiting.py), lifted.
rate_limits() {
    local lim='{per_second: 1000000, burst_count: 1000000}'
    cat <<EOF
rc_message: $lim
rc_registration: $lim
rc_registration_token_validity: $lim
rc_login:
  address: $lim
  account: $lim
  failed_attempts: $lim
rc_joins:
  local: $lim
  remote: $lim
rc_joins_per_room: $lim
rc_invites:
  per_room: $lim
  per_user: $lim
  per_issuer: $lim
rc_third_party_invite: $lim
rc_3pid_validation: $lim
rc_admin_redaction: $lim
rc_room_creation: $lim
rc_presence:
  per_user: $lim
rc_delayed_event_mgmt: $lim
rc_key_requests: $lim
rc_media_create: $lim
rc_reports: $lim
rc_user_directory: $lim
rc_profile: $lim
EOF
}

# Writes DIR/homeserver.yaml and DIR/log.config (always, so PORT may change),
# keeps an existing signing key, database and secret, and generates the
# signing key when missing.
write_config() {
    installed || cmd_install

    local secret_file="$DIR/registration_shared_secret"
    if [ -n "${SYNAPSE_REGISTRATION_SECRET:-}" ]; then
        printf '%s\n' "$SYNAPSE_REGISTRATION_SECRET" >"$secret_file"
    elif [ ! -s "$secret_file" ]; then
        random_secret >"$secret_file"
    fi
    [ -s "$DIR/macaroon_secret_key" ] || random_secret >"$DIR/macaroon_secret_key"
    [ -s "$DIR/form_secret" ] || random_secret >"$DIR/form_secret"
    chmod 600 "$secret_file" "$DIR/macaroon_secret_key" "$DIR/form_secret"
    SECRET="$(cat "$secret_file")"

    mkdir -p "$DIR/media"

    cat >"$DIR/log.config" <<EOF
# Written by scripts/synapse.sh: WARNING and above to homeserver.log.
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $(yq "$DIR/homeserver.log")
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: WARNING
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
EOF

    cat >"$DIR/homeserver.yaml" <<EOF
# Written by scripts/synapse.sh for Salon's side-by-side benchmark.
# Synapse $SYNAPSE_VERSION on loopback: client API only, no federation, SQLite,
# open registration, no rate limits.
server_name: localhost
public_baseurl: http://127.0.0.1:$PORT/
report_stats: false

listeners:
  - port: $PORT
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false

database:
  name: sqlite3
  args:
    database: $(yq "$DIR/homeserver.db")

log_config: $(yq "$DIR/log.config")
media_store_path: $(yq "$DIR/media")
signing_key_path: $(yq "$DIR/localhost.signing.key")

# Federation off: no federation listener, no remote server allowed, no key servers.
federation_domain_whitelist: []
trusted_key_servers: []
suppress_key_server_warning: true

enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: $(yq "$SECRET")
macaroon_secret_key: $(yq "$(cat "$DIR/macaroon_secret_key")")
form_secret: $(yq "$(cat "$DIR/form_secret")")

presence:
  enabled: true

# Rate limits, all lifted.
$(rate_limits)
EOF

    if [ ! -s "$DIR/localhost.signing.key" ]; then
        "$VENV/bin/python" -m synapse.app.homeserver -c "$DIR/homeserver.yaml" \
            --generate-keys >&2 || die "could not generate the signing key"
    fi
    log "config: $DIR/homeserver.yaml"
    log "registration_shared_secret=$SECRET (also in $secret_file)"
}

# The shell line that execs Synapse in the foreground.
launch_line() {
    printf 'exec %s -m synapse.app.homeserver -c %s\n' \
        "$(shq "$VENV/bin/python")" "$(shq "$DIR/homeserver.yaml")"
}

# --- subcommands ------------------------------------------------------------

cmd_config() {
    parse_dir_port "$@"
    write_config
}

cmd_command() {
    parse_dir_port "$@"
    write_config
    launch_line
}

# Alive and not a zombie (PID 1 in a container may not reap).
alive() {
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

is_synapse_pid() {
    local pid="$1"
    alive "$pid" \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'synapse\.app\.homeserver'
}

cmd_start() {
    parse_dir_port "$@"
    local pidfile="$DIR/synapse.pid"
    if [ -s "$pidfile" ] && is_synapse_pid "$(cat "$pidfile")"; then
        die "Synapse already running in $DIR (pid $(cat "$pidfile"))"
    fi
    # Otherwise another server's answer on the port would pass for ours.
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "127.0.0.1:$PORT is already in use"
    fi
    write_config
    local line url pid t0 code
    line="$(launch_line)"
    url="http://127.0.0.1:$PORT"
    t0=$(date +%s.%N)
    # Output goes to a file so a caller's $(...) does not wait on Synapse.
    sh -c "$line" </dev/null >>"$DIR/synapse.out" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    while :; do
        if ! alive "$pid"; then
            log "Synapse (pid $pid) exited during startup"
            tail -n 40 "$DIR/synapse.out" "$DIR/homeserver.log" >&2 2>/dev/null || true
            rm -f "$pidfile"
            exit 1
        fi
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$url/_matrix/client/versions" || true)
        [ "$code" = 200 ] && break
        if awk -v t0="$t0" -v now="$(date +%s.%N)" -v lim="$START_TIMEOUT" \
            'BEGIN { exit !(now - t0 > lim) }'; then
            log "Synapse did not answer $url/_matrix/client/versions within ${START_TIMEOUT}s"
            tail -n 40 "$DIR/synapse.out" "$DIR/homeserver.log" >&2 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
            rm -f "$pidfile"
            exit 1
        fi
        sleep 0.1
    done
    log "up after $(awk -v t0="$t0" -v now="$(date +%s.%N)" 'BEGIN { printf "%.2f", now - t0 }') s"
    echo "pid=$pid"
    echo "url=$url"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local pidfile="$1/synapse.pid" pid i
    [ -s "$pidfile" ] || { log "no pid file at $pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    if ! is_synapse_pid "$pid"; then
        log "pid $pid is not a running Synapse"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 200); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "pid $pid still running after 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    log "stopped pid $pid"
}

[ $# -ge 1 ] || usage
sub="$1"; shift
case "$sub" in
    install) [ $# -eq 0 ] || usage; cmd_install ;;
    config|command|start|stop) "cmd_$sub" "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
