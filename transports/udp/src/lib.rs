//! Plain UDP transport: one dual-stack socket carries every peer's
//! datagrams. The same socket asks STUN servers for its public mapping and
//! answers peers' STUN requests, and sends the short-TTL probes that open a
//! NAT mapping for hole punching.

pub mod nat;
pub mod offload;
pub mod stun;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use veilmesh_transport::{
    sockets, DatagramLimits, Health, PeerAddr, Received, SendError, Transport, TransportKind,
};

/// Socket buffers large enough to absorb a burst of full-size packets while
/// the event loop is busy encrypting; the kernel default (~200 KiB) overflows
/// at a few hundred Mbit/s.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

const IPV4_UDP_HEADERS: usize = 20 + 8;
const IPV6_UDP_HEADERS: usize = 40 + 8;
/// How often the interface addresses are read again.
const INTERFACE_REFRESH: Duration = Duration::from_secs(10);
/// STUN requests answered per second at most: a reflector, not an amplifier.
const STUN_ANSWERS_PER_SECOND: u32 = 200;
/// Segmented sends refused with EINVAL in a row (each one then went one
/// datagram at a time) before GSO is given up: a kernel without
/// UDP_SEGMENT says EINVAL to all of them, a route with a small MTU only
/// to those.
const GSO_REFUSALS_TO_GIVE_UP: u32 = 64;
/// STUN messages one receive call handles at most before it lets the
/// event loop run its timers: a STUN flood must not starve them.
const MAX_STUN_PER_CALL: usize = 64;

#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// 0 picks a free port.
    pub listen_port: u16,
    /// MTU of the underlying links, used to size unfragmented datagrams.
    pub link_mtu: usize,
    /// STUN servers asked for our public mapping.
    pub stun_servers: Vec<SocketAddr>,
    /// Interfaces whose addresses are never announced (our own TUN).
    pub skip_interfaces: Vec<String>,
    /// Segmentation offload (GSO on send, GRO on receive) where the kernel
    /// has it.
    pub offload: bool,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            listen_port: 51820,
            link_mtu: 1500,
            stun_servers: Vec::new(),
            skip_interfaces: Vec::new(),
            offload: true,
        }
    }
}

/// What the STUN task and the receive path share.
struct NatState {
    client: nat::StunClient,
    /// Our interface addresses with the bound port.
    interface_endpoints: Vec<SocketAddr>,
    next_interface_refresh: Instant,
    skip_interfaces: Vec<String>,
    answers_this_second: (Instant, u32),
}

pub struct UdpTransport {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    dual_stack: bool,
    link_mtu: usize,
    nat: Arc<Mutex<NatState>>,
    stun_task: tokio::task::JoinHandle<()>,
    /// Batches go to the kernel in one `sendmsg` (until it refuses).
    gso: bool,
    /// Segmented sends refused in a row (EINVAL).
    gso_refused: u32,
    /// Reads may hold several datagrams of one sender.
    gro: bool,
    /// Which of our addresses each sender reached: answers leave from it.
    sources: Sources,
}

/// Senders reach us at one of our addresses; a multi-homed host must
/// answer from that one, or a NAT in front of the sender drops the answer
/// (the kernel would pick its default source address). Bounded: a flood
/// of spoofed senders stops new entries, never old ones.
#[derive(Default)]
struct Sources(HashMap<SocketAddr, IpAddr>);

const MAX_SOURCES: usize = 4096;

impl Sources {
    fn learn(&mut self, from: SocketAddr, local: Option<IpAddr>) {
        let Some(local) = local else { return };
        if self.0.len() < MAX_SOURCES || self.0.contains_key(&from) {
            self.0.insert(from, local);
        }
    }

    fn get(&self, to: &SocketAddr) -> Option<IpAddr> {
        self.0.get(to).copied()
    }
}

impl Drop for UdpTransport {
    fn drop(&mut self) {
        self.stun_task.abort();
    }
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
        let socket = Arc::new(UdpSocket::from_std(socket.into())?);
        let local = socket.local_addr()?;
        let gro = config.offload && offload::enable_gro(socket.as_raw_fd());
        if !offload::enable_packet_info(socket.as_raw_fd(), dual_stack) {
            tracing::info!(
                "no packet info from the kernel: answers leave from its default source address"
            );
        }
        let gso = config.offload;
        tracing::info!(%local, dual_stack, gso, gro, stun_servers = config.stun_servers.len(), "udp transport bound");
        let now = Instant::now();
        let nat = Arc::new(Mutex::new(NatState {
            client: nat::StunClient::new(&config.stun_servers, now),
            interface_endpoints: Vec::new(),
            next_interface_refresh: now,
            skip_interfaces: config.skip_interfaces.clone(),
            answers_this_second: (now, 0),
        }));
        let stun_task = tokio::spawn(run_stun(socket.clone(), nat.clone(), dual_stack));
        Ok(UdpTransport {
            socket,
            local,
            dual_stack,
            link_mtu: config.link_mtu,
            nat,
            stun_task,
            gso,
            gso_refused: 0,
            gro,
            sources: Sources::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Takes STUN out of the receive path: answers requests, feeds
    /// responses to the client. True when the datagram was STUN.
    fn handle_stun(&self, datagram: &[u8], from: SocketAddr) -> bool {
        if !stun::is_stun(datagram) {
            return false;
        }
        let now = Instant::now();
        let Ok(mut state) = self.nat.lock() else {
            return true;
        };
        match stun::parse(datagram) {
            Ok(stun::Message::BindingRequest(id)) => {
                if state.client.hairpin_arrived(from, id) {
                    return true;
                }
                let (since, count) = &mut state.answers_this_second;
                if now.duration_since(*since) >= Duration::from_secs(1) {
                    *since = now;
                    *count = 0;
                }
                if *count < STUN_ANSWERS_PER_SECOND {
                    *count += 1;
                    let response = stun::binding_success(&id, from);
                    let source = self.sources.get(&from);
                    let _ = send_now(&self.socket, from, self.dual_stack, &response, source);
                }
            }
            Ok(stun::Message::BindingSuccess(id, mapped)) => {
                if !state.client.handle_response(from, id, mapped, now) {
                    tracing::debug!(%from, "unexpected STUN response");
                }
            }
            Ok(stun::Message::BindingError(_)) => {
                tracing::debug!(%from, "STUN error response");
            }
            Err(error) => tracing::debug!(%from, %error, "malformed STUN message"),
        }
        true
    }

    /// What the core gets of one read (`from` canonical, as `read` gives
    /// it): STUN taken out (of every segment of a coalesced read, closing
    /// the gaps), None if nothing is left.
    fn received(
        &self,
        buf: &mut [u8],
        from: SocketAddr,
        len: usize,
        segment: usize,
    ) -> Option<Received> {
        let mut kept = 0;
        let mut start = 0;
        while start < len {
            let end = (start + segment).min(len);
            if !self.handle_stun(&buf[start..end], from) {
                if kept != start {
                    buf.copy_within(start..end, kept);
                }
                kept += end - start;
            }
            start = end;
        }
        (kept > 0).then_some(Received {
            from: PeerAddr::Udp(from),
            len: kept,
            segment: segment.min(kept),
        })
    }

    /// One read through tokio's readiness: WouldBlock clears it.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let fd = self.socket.as_raw_fd();
        let read = self
            .socket
            .try_io(Interest::READABLE, || offload::recv(fd, buf))?;
        let from = canonical(read.from);
        self.sources.learn(from, read.local);
        Ok((read.len, from, read.segment))
    }

    /// One datagram, from the address `dest` reached us at; if that
    /// address is gone, from the kernel's choice (and forgotten).
    fn send_one(&mut self, dest: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        let source = self.sources.get(&dest);
        match send_now(&self.socket, dest, self.dual_stack, datagram, source) {
            Err(e) if source.is_some() && source_gone(&e) => {
                self.sources.0.remove(&dest);
                send_now(&self.socket, dest, self.dual_stack, datagram, None)
            }
            other => other,
        }
    }

    /// `datagrams` to `dest` in kernel-segmented sends (at most 64
    /// datagrams and 64 KB each); on an error that says the kernel cannot, GSO is
    /// off from then on and the rest go one by one.
    fn send_segmented(
        &mut self,
        dest: SocketAddr,
        datagrams: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        let to = socket2::SockAddr::from(socket_addr(dest, self.dual_stack));
        let fd = self.socket.as_raw_fd();
        let source = self.sources.get(&dest);
        let mut rest = datagrams;
        while !rest.is_empty() {
            let take = rest
                .len()
                .min(segment * offload::segments_per_send(segment));
            let (chunk, after) = rest.split_at(take);
            if self.gso {
                match offload::send_segments(fd, &to, chunk, segment, source) {
                    Ok(()) => {
                        self.gso_refused = 0;
                        rest = after;
                        continue;
                    }
                    Err(e) => match offload::refusal(&e) {
                        offload::Refusal::Unsupported => {
                            tracing::warn!(error = %e, "UDP segmentation offload refused: sending datagrams one by one from now on");
                            self.gso = false;
                        }
                        offload::Refusal::NotThis => {
                            self.gso_refused += 1;
                            if self.gso_refused >= GSO_REFUSALS_TO_GIVE_UP {
                                tracing::warn!(error = %e, "UDP segmentation offload refused {GSO_REFUSALS_TO_GIVE_UP} times in a row: sending datagrams one by one from now on");
                                self.gso = false;
                            }
                        }
                        offload::Refusal::Other => return Err(e),
                    },
                }
            }
            for datagram in chunk.chunks(segment) {
                self.send_one(dest, datagram)?;
            }
            rest = after;
        }
        Ok(())
    }
}

fn send_error(error: io::Error) -> SendError {
    if error.kind() == io::ErrorKind::WouldBlock {
        SendError::Backpressure
    } else {
        SendError::Io(error)
    }
}

/// Sends one datagram at once. Straight to the non-blocking socket:
/// tokio's try_send_to refuses until its reactor has seen the socket
/// writable once, which drops the first datagrams after bind.
fn send_now(
    socket: &UdpSocket,
    to: SocketAddr,
    dual_stack: bool,
    datagram: &[u8],
    source: Option<IpAddr>,
) -> io::Result<()> {
    let to = socket2::SockAddr::from(socket_addr(to, dual_stack));
    offload::send_segments(socket.as_raw_fd(), &to, datagram, datagram.len(), source)
}

/// A send from an address this host no longer has.
fn source_gone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL)
    )
}

fn socket_addr(sa: SocketAddr, dual_stack: bool) -> SocketAddr {
    match sa {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    }
}

/// Asks the STUN servers for our mapping and keeps the interface
/// addresses current, for as long as the transport lives.
async fn run_stun(socket: Arc<UdpSocket>, nat: Arc<Mutex<NatState>>, dual_stack: bool) {
    let port = socket.local_addr().map(|a| a.port()).unwrap_or_default();
    loop {
        let now = Instant::now();
        let (requests, wake) = {
            let Ok(mut state) = nat.lock() else { return };
            if now >= state.next_interface_refresh {
                state.interface_endpoints =
                    interface_endpoints(port, dual_stack, &state.skip_interfaces);
                state.next_interface_refresh = now + INTERFACE_REFRESH;
            }
            let mut requests = state.client.poll_transmits(now, random_transaction_id);
            let local = state.interface_endpoints.clone();
            requests.extend(
                state
                    .client
                    .poll_hairpin(now, &local, random_transaction_id),
            );
            let wake = state
                .client
                .poll_timeout()
                .unwrap_or(state.next_interface_refresh)
                .min(state.next_interface_refresh);
            (requests, wake)
        };
        for (server, request) in requests {
            if let Err(error) = send_now(&socket, server, dual_stack, &request, None) {
                tracing::debug!(%server, %error, "STUN request not sent");
            }
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            wake.max(now + Duration::from_millis(10)),
        ))
        .await;
    }
}

fn random_transaction_id() -> stun::TransactionId {
    let mut id = [0u8; 12];
    // A predictable id only lets an on-path attacker forge our mapping,
    // which it could do anyway; never worth failing over.
    let _ = getrandom::fill(&mut id);
    id
}

/// Our addresses a peer might reach: every interface but loopback, our
/// own TUN, point-to-point links and IPv6 link-local addresses (they need
/// a scope a peer lacks). Point-to-point links are tunnels (another VPN,
/// WireGuard): a path through one carries our datagrams inside another
/// tunnel with a smaller MTU. A PPP uplink's public address still reaches
/// peers as the address they see our probes come from, or through STUN.
fn interface_endpoints(port: u16, dual_stack: bool, skip: &[String]) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifaddr in addrs {
        let point_to_point = ifaddr
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_POINTOPOINT);
        if skip.contains(&ifaddr.interface_name) || point_to_point {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip: IpAddr = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            if !dual_stack {
                continue;
            }
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if ip.is_loopback() || ip.is_unspecified() || link_local {
            continue;
        }
        let sa = SocketAddr::new(ip, port);
        if !out.contains(&sa) {
            out.push(sa);
        }
    }
    out
}

/// Sets the TTL (IPv4, also for IPv4-mapped destinations of a dual-stack
/// socket) and hop limit (IPv6) of the socket's unicast sends; -1 restores
/// the route's default.
fn set_unicast_ttl(socket: &UdpSocket, ttl: i32) {
    let fd = socket.as_raw_fd();
    for (level, name) in [
        (libc::IPPROTO_IP, libc::IP_TTL),
        (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
    ] {
        // SAFETY: a valid socket and a pointer to a c_int of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&ttl as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

fn bind_socket(domain: Domain, port: u16) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    if let Err(error) = sockets::mark_new_socket(socket.as_raw_fd()) {
        tracing::debug!(%error, "UDP socket not marked");
    }
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

    fn send_with_ttl(&mut self, to: &PeerAddr, datagram: &[u8], ttl: u8) -> Result<(), SendError> {
        // The event loop is single-threaded: no other send sees this TTL.
        set_unicast_ttl(&self.socket, i32::from(ttl));
        let result = self.send(to, datagram);
        set_unicast_ttl(&self.socket, -1);
        result
    }

    fn local_endpoints(&self) -> Vec<PeerAddr> {
        let Ok(state) = self.nat.lock() else {
            return Vec::new();
        };
        let mut all = state.interface_endpoints.clone();
        if let Some(public) = state.client.public_endpoint() {
            if !all.contains(&public) {
                all.insert(0, public);
            }
        }
        all.into_iter().map(PeerAddr::Udp).collect()
    }

    fn send(&mut self, to: &PeerAddr, datagram: &[u8]) -> Result<(), SendError> {
        let PeerAddr::Udp(dest) = to else {
            return Err(SendError::WrongTransport(to.clone()));
        };
        self.send_one(*dest, datagram).map_err(send_error)
    }

    fn send_batch(
        &mut self,
        to: &PeerAddr,
        datagrams: &[u8],
        segment: usize,
    ) -> Result<(), SendError> {
        let PeerAddr::Udp(dest) = to else {
            return Err(SendError::WrongTransport(to.clone()));
        };
        if datagrams.len() <= segment {
            return self.send(to, datagrams);
        }
        self.send_segmented(*dest, datagrams, segment.max(1))
            .map_err(send_error)
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        let mut handled = 0;
        while handled < MAX_STUN_PER_CALL {
            match self.socket.poll_recv_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            match self.read(buf) {
                Ok((len, from, segment)) => {
                    if let Some(received) = self.received(buf, from, len, segment) {
                        return Poll::Ready(Ok(received));
                    }
                    handled += 1;
                }
                // Readiness was stale; it is cleared: poll again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // STUN only so far: come back after the event loop's other work.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        // Through tokio's readiness cache: the EAGAIN that ends a batch also
        // clears it, so the next poll_recv waits instead of asking again.
        for _ in 0..MAX_STUN_PER_CALL {
            match self.read(buf) {
                Ok((len, from, segment)) => {
                    if let Some(received) = self.received(buf, from, len, segment) {
                        return Ok(Some(received));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn health(&self) -> Health {
        let mut facts = vec![format!("bound on {}", self.local)];
        if let Ok(state) = self.nat.lock() {
            for (server, mapped) in state.client.mappings() {
                facts.push(match mapped {
                    Some(m) => format!("STUN {server} sees us at {m}"),
                    None => format!("STUN {server}: no answer"),
                });
            }
            if state.client.has_servers() {
                let nat = state.client.nat_type(&state.interface_endpoints);
                facts.push(format!("NAT: {nat}"));
                facts.push(format!("hairpinning: {}", state.client.hairpin()));
            }
        }
        // A bound socket is up; STUN only tells how others reach it.
        Health { up: true, facts }
    }

    fn describe(&self) -> String {
        let offload = match (self.gso, self.gro) {
            (true, true) => ", GSO and GRO",
            (true, false) => ", GSO",
            (false, true) => ", GRO",
            (false, false) => "",
        };
        let mut text = format!("udp listening on port {}{offload}", self.local.port());
        let Ok(state) = self.nat.lock() else {
            return text;
        };
        if !state.client.has_servers() {
            return text;
        }
        let nat_type = state.client.nat_type(&state.interface_endpoints);
        match state.client.public_endpoint() {
            Some(public) => text += &format!(", public endpoint {public}, NAT: {nat_type}"),
            None => text += ", no STUN answer yet (public endpoint unknown)",
        }
        text
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

    /// Any node is a STUN reflector: a binding request to its port gets
    /// the sender's endpoint back, and never reaches the core.
    #[tokio::test]
    async fn answers_stun_binding_requests_and_keeps_them_from_the_core() {
        let mut node = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            ..UdpConfig::default()
        })
        .unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let id = [9u8; 12];
        let to = ("127.0.0.1", node.local_addr().port());
        client.send_to(&stun::binding_request(&id), to).unwrap();
        client.send_to(b"\x04\0\0\0 not stun", to).unwrap();
        // The request is answered inside the receive call that returns
        // the next (non-STUN) datagram.
        let mut buf = [0u8; 128];
        let got = poll_fn(|cx| node.poll_recv(cx, &mut buf)).await.unwrap();
        assert_eq!(&buf[..got.len], b"\x04\0\0\0 not stun");
        let mut reply = [0u8; 128];
        let (n, _) = client.recv_from(&mut reply).unwrap();
        assert_eq!(
            stun::parse(&reply[..n]),
            Ok(stun::Message::BindingSuccess(
                id,
                Some(client.local_addr().unwrap())
            ))
        );
    }

    /// A flood of STUN requests: each receive call handles a bounded
    /// number and hands control back, so the event loop's timers still run.
    #[tokio::test]
    async fn a_stun_flood_does_not_hold_the_receive_call() {
        let mut node = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            ..UdpConfig::default()
        })
        .unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let to = ("127.0.0.1", node.local_addr().port());
        for i in 0..3 * MAX_STUN_PER_CALL {
            client
                .send_to(&stun::binding_request(&[i as u8; 12]), to)
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let answered = |client: &std::net::UdpSocket| {
            let mut buf = [0u8; 128];
            std::iter::from_fn(|| client.recv_from(&mut buf).ok()).count()
        };
        let mut buf = [0u8; 128];
        assert!(matches!(node.try_recv(&mut buf), Ok(None)));
        assert_eq!(answered(&client), MAX_STUN_PER_CALL);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(node.poll_recv(&mut cx, &mut buf).is_pending());
        assert_eq!(answered(&client), MAX_STUN_PER_CALL);
    }

    /// 127.0.0.2 is ours too, but not the kernel's choice of source for
    /// 127.0.0.5 (that is 127.0.0.1): answers and data leave from the
    /// address the sender reached, with and without segmentation.
    #[tokio::test]
    async fn answers_leave_from_the_address_the_sender_reached() {
        for offload in [false, true] {
            let mut node = loopback_transport(offload);
            let client = std::net::UdpSocket::bind("127.0.0.5:0").unwrap();
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let reached: SocketAddr = ([127, 0, 0, 2], node.local_addr().port()).into();
            client
                .send_to(&stun::binding_request(&[1; 12]), reached)
                .unwrap();
            client.send_to(b"\x04 data", reached).unwrap();
            let mut buf = [0u8; 128];
            poll_fn(|cx| node.poll_recv(cx, &mut buf)).await.unwrap();
            let mut reply = [0u8; 128];
            let (_, from) = client.recv_from(&mut reply).unwrap();
            assert_eq!(from, reached, "the STUN answer");
            let to = PeerAddr::Udp(client.local_addr().unwrap());
            node.send(&to, b"one").unwrap();
            node.send_batch(&to, b"twothree", 3).unwrap();
            for _ in 0..4 {
                let (_, from) = client.recv_from(&mut reply).unwrap();
                assert_eq!(from, reached, "data, offload {offload}");
            }
        }
    }

    fn loopback_transport(offload: bool) -> UdpTransport {
        UdpTransport::bind(UdpConfig {
            listen_port: 0,
            offload,
            ..UdpConfig::default()
        })
        .unwrap()
    }

    /// Datagram `i` of a batch: its own length and bytes.
    fn batch_datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 7 + j) as u8).collect()
    }

    /// A batch of 100 datagrams (two `sendmsg` calls of at most 64) and a
    /// shorter last one arrives whole and in order, over both families,
    /// whether the receiver reads them coalesced (GRO) or one by one; with
    /// offload off on either side too.
    #[tokio::test]
    async fn batches_arrive_whole_with_or_without_offload() {
        for (send_offload, recv_offload) in [(true, true), (true, false), (false, true)] {
            let mut a = loopback_transport(send_offload);
            let mut b = loopback_transport(recv_offload);
            for ip in ["127.0.0.1", "::1"] {
                let to = PeerAddr::Udp(SocketAddr::new(ip.parse().unwrap(), b.local_addr().port()));
                let sent: Vec<Vec<u8>> = (0..101)
                    .map(|i| batch_datagram(i, if i == 100 { 300 } else { 1200 }))
                    .collect();
                a.send_batch(&to, &sent.concat(), 1200).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65_536];
                let mut coalesced = false;
                while got.len() < sent.len() {
                    let received = tokio::time::timeout(
                        Duration::from_secs(5),
                        poll_fn(|cx| b.poll_recv(cx, &mut buf)),
                    )
                    .await
                    .expect("the batch arrives")
                    .unwrap();
                    coalesced |= received.len > received.segment;
                    got.extend(received.datagrams(&buf).map(<[u8]>::to_vec));
                }
                assert_eq!(got, sent, "{ip}, offload {send_offload}/{recv_offload}");
                if !recv_offload {
                    assert!(
                        !coalesced,
                        "a receiver without GRO gets one datagram per read"
                    );
                }
            }
        }
    }

    /// STUN inside a coalesced read is answered and cut out; the
    /// datagrams around it close the gap.
    #[tokio::test]
    async fn stun_inside_a_coalesced_read_is_taken_out() {
        let node = loopback_transport(true);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = client.local_addr().unwrap();
        let request = stun::binding_request(&[9; 12]);
        let segment = request.len();
        let mut buf = [vec![1u8; segment], request.to_vec(), vec![2u8; segment]].concat();
        let len = buf.len();
        let got = node.received(&mut buf, from, len, segment).unwrap();
        assert_eq!((got.len, got.segment), (2 * segment, segment));
        let datagrams: Vec<&[u8]> = got.datagrams(&buf).collect();
        assert_eq!(
            datagrams,
            [&vec![1u8; segment][..], &vec![2u8; segment][..]]
        );
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut reply = [0u8; 128];
        assert!(
            client.recv_from(&mut reply).is_ok(),
            "the STUN request was answered"
        );
    }

    #[tokio::test]
    async fn datagrams_cross_loopback_both_families() {
        let mut a = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            ..UdpConfig::default()
        })
        .unwrap();
        let mut b = UdpTransport::bind(UdpConfig {
            listen_port: 0,
            ..UdpConfig::default()
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
            ..UdpConfig::default()
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
