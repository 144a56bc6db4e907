//! Links c-toxcore (found with pkg-config) and checks, at build time, that
//! the hand-written declarations in src/ffi.rs match the installed tox.h:
//! src/abi_check.c is a list of static assertions on the same constants.
fn main() {
    let lib = pkg_config::Config::new()
        .atleast_version("0.2.18")
        .probe("toxcore")
        .unwrap_or_else(|e| panic!("c-toxcore not found (apt-get install libtoxcore-dev): {e}"));
    let mut check = cc::Build::new();
    check.file("src/abi_check.c");
    for path in &lib.include_paths {
        check.include(path);
    }
    check.compile("veilmesh_tox_abi_check");
    println!("cargo:rerun-if-changed=src/abi_check.c");
    // This crate's own test binaries export src/memlock.rs's functions,
    // as the daemon's does (its build.rs).
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=sodium_mlock");
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=sodium_munlock");
}
