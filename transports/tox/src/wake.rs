//! How the event loop learns that a packet reached toxcore.
//!
//! toxcore 0.2 has no file descriptor in its API, and reads its socket only
//! inside `tox_iterate`: a loop that iterates on a timer sees a packet only
//! at its next tick. Its UDP socket is one of this process's sockets, bound
//! to `tox_self_get_udp_port()`; found once, the event loop waits on it and
//! iterates as soon as a packet arrives.

use std::os::fd::RawFd;

use veilmesh_transport::sockets;

/// The descriptor of this process's UDP socket bound to `port` (toxcore's,
/// given its port), if exactly one is found. Only read and polled, never
/// closed: toxcore owns it until `tox_kill`.
pub(crate) fn find_udp_socket(port: u16) -> Option<RawFd> {
    let mut found = None;
    for fd in sockets::own_descriptors() {
        if sockets::is_datagram_socket(fd) && sockets::bound_port(fd) == Some(port) {
            if found.is_some() {
                return None; // two candidates: guessing could poll the wrong one
            }
            found = Some(fd);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn finds_the_one_udp_socket_on_a_port() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert_eq!(find_udp_socket(port), Some(socket.as_raw_fd()));
        // A TCP listener on the same port is not it.
        let _tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        assert_eq!(find_udp_socket(port), Some(socket.as_raw_fd()));
        drop(socket);
        assert_eq!(find_udp_socket(port), None);
    }
}
