# Shared by scripts/serve and scripts/test: what a fresh Debian machine lacks.

# Build artefacts live outside the clone so that a new checkout reuses them
# (RocksDB's C++ takes long to build).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/salon/target}"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y -q --no-install-recommends "$@" >&2; then
        as_root apt-get update -q >&2
        as_root apt-get install -y -q --no-install-recommends "$@" >&2
    fi
}

# libclang itself: LLVM's libclang-cpp, which some machines have without it, will not
# do for bindgen.
have_libclang() {
    local f
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
        /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}

# The RocksDB binding generates its bindings with bindgen, which loads libclang;
# it also needs a C++ compiler.
ensure_build_deps() {
    local missing=()
    have_libclang || missing+=(libclang-dev)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v make >/dev/null 2>&1 || missing+=(make)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing build dependencies: ${missing[*]}" >&2
        apt_install "${missing[@]}"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed: install Rust 1.95 with rustup (https://rustup.rs)" >&2
        exit 1
    fi
}

# The LDAP tests start their own OpenLDAP slapd (private configuration, loopback port).
# Debian's slapd package would also configure and start a system-wide server: keep the
# package's scripts from starting any service while it installs (policy-rc.d), and stop
# one that runs anyway.
ensure_slapd() {
    if [ -x /usr/sbin/slapd ] && command -v slapadd >/dev/null 2>&1; then
        return
    fi
    echo "installing OpenLDAP (slapd, ldap-utils) for the LDAP tests" >&2
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod +x "$policy"
        created=1
    fi
    echo "slapd slapd/no_configuration boolean true" | as_root debconf-set-selections 2>/dev/null || true
    apt_install slapd ldap-utils
    if [ "$created" = 1 ]; then as_root rm -f "$policy"; fi
    as_root systemctl disable --now slapd >/dev/null 2>&1 || true
    as_root pkill -x slapd >/dev/null 2>&1 || true
}

# dnsmasq (the binary only, no system service) serves the DNS records of the email
# bridge's SPF/DKIM/DMARC tests on a loopback port; openssl makes their keys.
ensure_dnsmasq() {
    if [ -x /usr/sbin/dnsmasq ] && command -v openssl >/dev/null 2>&1; then
        return
    fi
    echo "installing dnsmasq-base and openssl for the email bridge tests" >&2
    apt_install dnsmasq-base openssl
}
