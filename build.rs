//! Link settings for the `salon` binary.

fn main() {
    // Pack the executable's relative relocations (DT_RELR, glibc 2.36 and GNU ld 2.38 or
    // later, as on Debian 12). The loader reads all of them at every start: 57,000
    // entries of 24 bytes, 1.3 MiB of the idle server's resident memory, become a
    // bitmap of a few kilobytes. The executable stays position-independent.
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
