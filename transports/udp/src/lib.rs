//! Plain UDP transport: one dual-stack socket carries every peer's datagrams.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use veilmesh_transport::{DatagramLimits, PeerAddr, Received, SendError, Transport, TransportKind};

/// Socket buffers large enough to absorb a burst of full-size packets while
/// the event loop is busy encrypting; the kernel default (~200 KiB) overflows
/// at a few hundred Mbit/s.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

const IPV4_UDP_HEADERS: usize = 20 + 8;
const IPV6_UDP_HEADERS: usize = 40 + 8;

#[derive(Debug, Clone, Copy)]
pub struct UdpConfig {
    /// 0 picks a free port.
    pub listen_port: u16,
    /// MTU of the underlying links, used to size unfragmented datagrams.
    pub link_mtu: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            listen_port: 51820,
            link_mtu: 1500,
        }
    }
}

pub struct UdpTransport {
    socket: UdpSocket,
    local: SocketAddr,
    dual_stack: bool,
    link_mtu: usize,
}

impl UdpTransport {
    /// Binds the socket. Must run inside a tokio runtime.
    pub fn bind(config: UdpConfig) -> io::Result<Self> {
        let (socket, dual_stack) = match bind_socket(Domain::IPV6, config.listen_port) {
            Ok(s) => (s, true),
            // A host with IPv6 disabled still gets IPv4.
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                (bind_socket(Domain::IPV4, config.listen_port)?, false)
            }
            Err(e) => return Err(e),
        };
        let socket = UdpSocket::from_std(socket.into())?;
        let local = socket.local_addr()?;
        tracing::info!(%local, dual_stack, "udp transport bound");
        Ok(UdpTransport {
            socket,
            local,
            dual_stack,
            link_mtu: config.link_mtu,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn to_socket_addr(&self, to: &PeerAddr) -> Result<SocketAddr, SendError> {
        match to {
            PeerAddr::Udp(SocketAddr::V4(v4)) if self.dual_stack => Ok(SocketAddr::V6(
                SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
            )),
            PeerAddr::Udp(sa) => Ok(*sa),
            other => Err(SendError::WrongTransport(other.clone())),
        }
    }
}

fn bind_socket(domain: Domain, port: u16) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let addr: SocketAddr = if domain == Domain::IPV6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    };
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP port {port}: {e}")))?;
    Ok(socket)
}

/// Dual-stack sockets report IPv4 senders as `::ffff:a.b.c.d`; peers are
/// configured and shown with plain IPv4 addresses.
fn canonical(sa: SocketAddr) -> SocketAddr {
    SocketAddr::new(sa.ip().to_canonical(), sa.port())
}

impl Transport for UdpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Udp
    }

    fn limits(&self, to: &PeerAddr) -> DatagramLimits {
        let (headers, absolute) = match to {
            PeerAddr::Udp(SocketAddr::V4(_)) => (IPV4_UDP_HEADERS, 65_507),
            _ => (IPV6_UDP_HEADERS, 65_487),
        };
        DatagramLimits {
            unfragmented: self.link_mtu.saturating_sub(headers),
            absolute,
        }
    }

    fn send(&mut self, to: &PeerAddr, datagram: &[u8]) -> Result<(), SendError> {
        let dest = self.to_socket_addr(to)?;
        // Straight to the non-blocking socket: tokio's try_send_to refuses
        // until its reactor has seen the socket writable once, which drops
        // the first datagrams after bind.
        match socket2::SockRef::from(&self.socket).send_to(datagram, &dest.into()) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(SendError::Backpressure),
            Err(e) => Err(SendError::Io(e)),
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        let mut read = ReadBuf::new(buf);
        match self.socket.poll_recv_from(cx, &mut read) {
            Poll::Ready(Ok(from)) => Poll::Ready(Ok(Received {
                from: PeerAddr::Udp(canonical(from)),
                len: read.filled().len(),
            })),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        // Through tokio's readiness cache: the EAGAIN that ends a batch also
        // clears it, so the next poll_recv waits instead of asking again.
        match self.socket.try_recv_from(buf) {
            Ok((len, from)) => Ok(Some(Received {
                from: PeerAddr::Udp(canonical(from)),
                len,
            })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        format!("udp listening on port {}", self.local.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn ipv4_mapped_senders_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.18.0.7]:4000".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "198.18.0.7:4000".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:4000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn datagrams_cross_loopback_both_families() {
        let mut a = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            link_mtu: 1500,
        })
        .unwrap();
        let mut b = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            link_mtu: 1500,
        })
        .unwrap();
        for ip in ["127.0.0.1", "::1"] {
            let to = PeerAddr::Udp(SocketAddr::new(ip.parse().unwrap(), b.local_addr().port()));
            a.send(&to, b"noise message").unwrap();
            let mut buf = [0u8; 64];
            let got = poll_fn(|cx| b.poll_recv(cx, &mut buf)).await.unwrap();
            assert_eq!(&buf[..got.len], b"noise message");
            match got.from {
                PeerAddr::Udp(sa) => {
                    assert_eq!(sa.port(), a.local_addr().port());
                    assert_eq!(sa.ip().to_string(), ip);
                }
                other => panic!("unexpected sender {other:?}"),
            }
        }
    }

    #[test]
    fn limits_follow_the_address_family() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let t = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            link_mtu: 1500,
        })
        .unwrap();
        let v4 = PeerAddr::Udp("198.18.0.1:1".parse().unwrap());
        let v6 = PeerAddr::Udp("[fd00::1]:1".parse().unwrap());
        assert_eq!(t.limits(&v4).unfragmented, 1472);
        assert_eq!(t.limits(&v6).unfragmented, 1452);
        let mut t = t;
        let tox = PeerAddr::Tox(veilmesh_transport::ToxPublicKey([0; 32]));
        assert!(matches!(
            t.send(&tox, b"x"),
            Err(SendError::WrongTransport(_))
        ));
    }
}
