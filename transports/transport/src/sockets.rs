//! This process's own sockets: finding them among its descriptors (for
//! sockets a C library opened, such as toxcore's) and giving them the
//! firewall mark that keeps them out of an exit node's tunnel.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

/// The mark of this process's sockets (0: none). One per process: the
/// daemon sets it once, before any transport opens a socket.
static OWN_MARK: AtomicU32 = AtomicU32::new(0);

/// Every socket a transport opens from now on gets `mark`.
pub fn use_mark(mark: u32) {
    OWN_MARK.store(mark, Ordering::Relaxed);
}

/// Gives a socket we just opened (before it binds or connects) the
/// process's mark, if it has one. Failing (no CAP_NET_ADMIN: a test, or a
/// daemon without exits) is for the caller to log, not to stop on.
pub fn mark_new_socket(fd: RawFd) -> io::Result<()> {
    match OWN_MARK.load(Ordering::Relaxed) {
        0 => Ok(()),
        mark => set_mark(fd, mark),
    }
}

/// Every descriptor this process has open right now (a snapshot: one may
/// close while the caller looks at it, and is then simply not a socket).
pub fn own_descriptors() -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

fn int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`; a
    // descriptor that is not a socket (or closed meanwhile) fails cleanly.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ok != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Is `fd` a datagram (UDP) socket?
pub fn is_datagram_socket(fd: RawFd) -> bool {
    int_option(fd, libc::SOL_SOCKET, libc::SO_TYPE).is_ok_and(|t| t == libc::SOCK_DGRAM)
}

/// The local port `fd` is bound to, if it is an IPv4 or IPv6 socket.
pub fn bound_port(fd: RawFd) -> Option<u16> {
    let mut addr = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into the storage.
    if unsafe { libc::getsockname(fd, addr.as_mut_ptr().cast(), &mut len) } != 0 {
        return None;
    }
    // SAFETY: zero-initialised, then filled by the kernel.
    let addr = unsafe { addr.assume_init() };
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let v4 =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(u16::from_be(v4.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let v6 =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(u16::from_be(v6.sin6_port))
        }
        _ => None,
    }
}

/// Gives `fd` the firewall mark `mark` (SO_MARK: needs CAP_NET_ADMIN).
/// Routing rules that skip marked packets keep them out of the tunnel.
pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    let value = mark as libc::c_int;
    // SAFETY: setsockopt reads an int from a live variable.
    let ok = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ok != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The firewall mark of `fd` (0: none).
pub fn mark(fd: RawFd) -> io::Result<u32> {
    int_option(fd, libc::SOL_SOCKET, libc::SO_MARK).map(|m| m as u32)
}

/// Marks every UDP socket of this process that does not carry `mark` yet,
/// such as those a library opened (toxcore's, the DHT's); returns how many
/// it marked. UDP only: marking a connected TCP socket would change its
/// route, and its source address no longer would, mid-connection.
pub fn mark_datagram_sockets(mark_value: u32) -> io::Result<usize> {
    let mut marked = 0;
    for fd in own_descriptors() {
        if !is_datagram_socket(fd) || bound_port(fd).is_none() {
            continue;
        }
        if mark(fd)? != mark_value {
            set_mark(fd, mark_value)?;
            marked += 1;
        }
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};
    use std::os::fd::AsRawFd;

    #[test]
    fn tells_a_bound_udp_socket_from_a_tcp_one() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(is_datagram_socket(udp.as_raw_fd()));
        assert!(!is_datagram_socket(tcp.as_raw_fd()));
        assert_eq!(
            bound_port(udp.as_raw_fd()),
            Some(udp.local_addr().unwrap().port())
        );
        assert!(own_descriptors().contains(&udp.as_raw_fd()));
        assert!(!is_datagram_socket(-1));
        assert_eq!(bound_port(-1), None);
    }

    /// Needs CAP_NET_ADMIN; without it, says so and only checks the error.
    #[test]
    fn marks_udp_sockets_and_leaves_tcp_alone() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        match mark_datagram_sockets(0x766d) {
            Ok(_) => {
                assert_eq!(mark(udp.as_raw_fd()).unwrap(), 0x766d);
                assert_eq!(mark(tcp.as_raw_fd()).unwrap(), 0);
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                eprintln!("not root: marking not tried");
            }
        }
    }
}
