//! toxcore 0.2 allocates two scratch buffers for every packet it encrypts
//! or decrypts and passes each to libsodium's `sodium_mlock` and
//! `sodium_munlock` (`crypto_malloc` in crypto_core.c): madvise and mlock,
//! madvise and munlock, eight system calls per packet, a fifth of the
//! Tox path's CPU at full speed (perf), whether the lock succeeds or not.
//! What those buffers hold are veilmesh datagrams, already Noise-encrypted
//! end to end: locking them protects nothing.
//!
//! So this crate defines the two functions itself, and binaries that link
//! it export them (`-Wl,--export-dynamic-symbol`, see build.rs): the
//! dynamic linker then binds toxcore's calls to these, which lock nothing
//! and zero on unlock as libsodium's contract says. Where a binary does not
//! export them, libsodium's run, and the Tox transport makes their mlock
//! fail at once instead (`forgo_memory_locking`).

use std::os::raw::{c_int, c_void};

/// Stands in for libsodium's: locks nothing, says so (-1, ENOSYS).
///
/// # Safety
/// Called by C with any address; touches none of it.
#[no_mangle]
pub unsafe extern "C" fn sodium_mlock(_addr: *mut c_void, _len: usize) -> c_int {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = libc::ENOSYS };
    -1
}

/// Stands in for libsodium's: zeroes the `len` bytes at `addr` (as
/// libsodium promises its callers) and unlocks nothing.
///
/// # Safety
/// `addr` must point to `len` writable bytes, as for libsodium's.
#[no_mangle]
pub unsafe extern "C" fn sodium_munlock(addr: *mut c_void, len: usize) -> c_int {
    if !addr.is_null() {
        // SAFETY: the caller's promise; C cannot see this write elided.
        unsafe { std::ptr::write_bytes(addr.cast::<u8>(), 0, len) };
    }
    0
}

/// Whether toxcore's calls reach these functions: the dynamic linker's
/// first `sodium_mlock` is ours.
pub(crate) fn in_effect() -> bool {
    let ours = sodium_mlock as unsafe extern "C" fn(*mut c_void, usize) -> c_int;
    let unlock = sodium_munlock as unsafe extern "C" fn(*mut c_void, usize) -> c_int;
    // SAFETY: dlsym with NUL-terminated names; only the addresses are compared.
    unsafe {
        libc::dlsym(libc::RTLD_DEFAULT, c"sodium_mlock".as_ptr()) == ours as *mut c_void
            && libc::dlsym(libc::RTLD_DEFAULT, c"sodium_munlock".as_ptr()) == unlock as *mut c_void
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn toxcore_reaches_our_functions() {
        assert!(
            super::in_effect(),
            "build.rs must export sodium_mlock and sodium_munlock"
        );
    }

    #[test]
    fn unlock_zeroes() {
        let mut bytes = [0xa5u8; 64];
        // SAFETY: 64 writable bytes.
        assert_eq!(
            unsafe { super::sodium_munlock(bytes.as_mut_ptr().cast(), 64) },
            0
        );
        assert_eq!(bytes, [0u8; 64]);
    }
}
