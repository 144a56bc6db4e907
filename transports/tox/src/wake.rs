//! How the Tox thread sleeps: until a UDP packet reaches toxcore's socket,
//! the event loop queues a datagram, or the next iteration is due.
//!
//! toxcore 0.2 has no file descriptor in its API, and reads its socket only
//! inside `tox_iterate`: a thread that iterates on a timer sees a packet
//! only at its next tick. Its UDP socket is one of this process's sockets,
//! bound to `tox_self_get_udp_port()`; found once, the thread waits on it
//! and iterates as soon as a packet arrives.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::time::Duration;

use veilmesh_transport::sockets;

/// The event loop's side: tells a sleeping Tox thread that datagrams wait.
/// One `eventfd` write per sleep, not per datagram.
pub(crate) struct Bell {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
}

/// What ended a sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// toxcore's UDP socket has a packet: iterate now.
    Packet,
    /// The event loop rang, or the time was up.
    Other,
}

impl Bell {
    pub(crate) fn new() -> std::io::Result<Bell> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Bell {
            // SAFETY: a fresh descriptor nobody else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// After queueing: wakes the thread if it sleeps (or is about to).
    pub(crate) fn ring(&self) {
        // Pairs with the fence in `sleep`: either the thread sees the
        // queued datagram before it sleeps, or this sees it sleeping.
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd. A
            // full counter (EAGAIN) means it is readable already.
            unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    /// Sleeps until a packet on `udp`, a ring, or `timeout`, unless
    /// `queued()` (checked after announcing the sleep) says there is work.
    pub(crate) fn sleep(
        &self,
        udp: Option<RawFd>,
        timeout: Duration,
        queued: impl FnOnce() -> bool,
    ) -> Woken {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if queued() {
            self.sleeping.store(false, Ordering::SeqCst);
            return Woken::Other;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: udp.unwrap_or(-1), // poll ignores negative descriptors
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Rounded up: a 0.4 ms wait must not become a busy loop.
        let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: two valid pollfd entries in a live array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        self.sleeping.store(false, Ordering::SeqCst);
        if fds[0].revents & libc::POLLIN != 0 {
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer; resets the counter.
            unsafe { libc::read(self.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        }
        if fds[1].revents & libc::POLLIN != 0 {
            Woken::Packet
        } else {
            Woken::Other
        }
    }
}

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
    use std::time::Instant;

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

    #[test]
    fn a_packet_or_a_ring_ends_the_sleep() {
        let bell = Bell::new().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = Some(socket.as_raw_fd());
        // Nothing: the time runs out.
        let start = Instant::now();
        assert_eq!(
            bell.sleep(fd, Duration::from_millis(20), || false),
            Woken::Other
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Work queued before the sleep: no sleep at all.
        let start = Instant::now();
        assert_eq!(
            bell.sleep(fd, Duration::from_secs(5), || true),
            Woken::Other
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        // A ring from another thread.
        let bell = std::sync::Arc::new(bell);
        let ringer = bell.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            ringer.ring();
        });
        let start = Instant::now();
        assert_eq!(
            bell.sleep(fd, Duration::from_secs(5), || false),
            Woken::Other
        );
        assert!(start.elapsed() < Duration::from_secs(4));
        thread.join().unwrap();
        // A packet.
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"x", socket.local_addr().unwrap()).unwrap();
        assert_eq!(
            bell.sleep(fd, Duration::from_secs(5), || false),
            Woken::Packet
        );
        // A ring with nobody asleep costs no write, and is not remembered.
        bell.ring();
        let mut buf = [0u8; 8];
        socket.recv(&mut buf).unwrap();
        let start = Instant::now();
        assert_eq!(
            bell.sleep(fd, Duration::from_millis(20), || false),
            Woken::Other
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
