//! The daemon binary exports the Tox crate's stand-ins for libsodium's
//! memory locking, so toxcore's per-packet calls reach them instead of
//! eight system calls (transports/tox/src/memlock.rs says why).
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=sodium_mlock");
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=sodium_munlock");
    println!("cargo:rerun-if-changed=build.rs");
}
