//! The core driven without sockets: two or three nodes exchange datagrams
//! in memory.

use std::net::{Ipv4Addr, SocketAddr};

use proptest::prelude::*;

use super::packet::tests::{ipv4_udp, ipv6_echo};
use super::peer::{configured_paths, QUIET_AFTER, REPEATED_INITIATIONS};
use super::presence::{MOVE_SILENCE, RENEW_BACKOFF_MIN};
use super::*;
use boringtun::noise::Tunn;

const UDP_LIMITS: DatagramLimits = DatagramLimits {
    unfragmented: 1472,
    absolute: 65_507,
};

fn limits(_: &PeerAddr) -> DatagramLimits {
    UDP_LIMITS
}

fn udp(s: &str) -> PeerAddr {
    PeerAddr::Udp(s.parse::<SocketAddr>().unwrap())
}

/// A key that is the same in every run, one per seed.
pub(crate) fn seeded_key(seed: &[u8]) -> PrivateKey {
    use sha2::{Digest, Sha256};
    PrivateKey::from_bytes(Sha256::digest(seed).into())
}

struct Side {
    key: PrivateKey,
    addr: PeerAddr,
}

impl Side {
    /// Its key is seeded by its address: the same in every run.
    fn new(addr: &str) -> Side {
        Side {
            key: seeded_key(addr.as_bytes()),
            addr: udp(addr),
        }
    }
    fn mesh(&self) -> Ipv6Addr {
        self.key.public_key().mesh_address()
    }
    fn as_peer(&self, name: &str, endpoint: bool, allowed: &[&str]) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: self.key.public_key(),
            paths: endpoint.then(|| self.addr.clone()).into_iter().collect(),
            allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
            transports: veilmesh_transport::TransportKind::ALL.to_vec(),
            allowed_destinations: None,
            accept: None,
            relay: false,
        }
    }
}

struct Mesh {
    a: Side,
    b: Side,
    node_a: Node,
    node_b: Node,
    buf: Vec<u8>,
}

/// A knows B's endpoint; B learns A's by roaming. B routes 192.168.50.0/24.
fn mesh() -> Mesh {
    let now = Instant::now();
    let a = Side::new("198.18.0.1:51820");
    let b = Side::new("198.18.0.2:51820");
    let node_a = Node::new(
        &a.key,
        vec![b.as_peer("b", true, &["192.168.50.0/24"])],
        now,
    )
    .unwrap();
    let node_b = Node::new(&b.key, vec![a.as_peer("a", false, &["10.10.1.1/32"])], now).unwrap();
    Mesh {
        a,
        b,
        node_a,
        node_b,
        buf: vec![0u8; BUFFER_SIZE],
    }
}

/// Delivers every pending transmit between the two nodes until both are
/// quiet; returns the packets each wrote to its TUN.
fn pump(m: &mut Mesh, first: Option<(bool, Vec<u8>)>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut to_tun_a = Vec::new();
    let mut to_tun_b = Vec::new();
    let mut in_flight: VecDeque<(bool, Vec<u8>)> = first.into_iter().collect();
    for _ in 0..100 {
        while let Some(t) = m.node_a.poll_transmit() {
            assert_eq!(t.to, m.b.addr);
            in_flight.push_back((true, t.payload));
        }
        while let Some(t) = m.node_b.poll_transmit() {
            assert_eq!(t.to, m.a.addr);
            in_flight.push_back((false, t.payload));
        }
        let Some((to_b, datagram)) = in_flight.pop_front() else {
            break;
        };
        let (node, from, sink) = if to_b {
            (&mut m.node_b, &m.a.addr, &mut to_tun_b)
        } else {
            (&mut m.node_a, &m.b.addr, &mut to_tun_a)
        };
        if let FromNetwork::ToTun(p) =
            node.handle_datagram(from, &datagram, &mut m.buf, Instant::now())
        {
            sink.push(p.to_vec());
        }
    }
    (to_tun_a, to_tun_b)
}

fn send_from_a(m: &mut Mesh, packet: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut out = vec![0u8; BUFFER_SIZE];
    let first = match m
        .node_a
        .handle_tun_packet(packet, limits, &mut out, Instant::now())
    {
        FromTun::Send { to, datagram } => {
            assert_eq!(to, m.b.addr);
            Some((true, datagram.to_vec()))
        }
        FromTun::Done(DropReason::Queued) => None,
        other => panic!("unexpected {other:?}"),
    };
    pump(m, first)
}

#[test]
fn first_packet_survives_the_handshake_and_arrives_intact() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 56);
    let (_, at_b) = send_from_a(&mut m, &ping);
    assert_eq!(at_b, vec![ping]);
    // B learned A's address from the authenticated handshake and can answer.
    let reply = ipv6_echo(m.b.mesh(), m.a.mesh(), 56);
    let mut out = vec![0u8; BUFFER_SIZE];
    let datagram = match m
        .node_b
        .handle_tun_packet(&reply, limits, &mut out, Instant::now())
    {
        FromTun::Send { to, datagram } => {
            assert_eq!(to, m.a.addr);
            datagram.to_vec()
        }
        other => panic!("unexpected {other:?}"),
    };
    let got = m
        .node_a
        .handle_datagram(&m.b.addr, &datagram, &mut m.buf, Instant::now());
    assert!(matches!(got, FromNetwork::ToTun(p) if p == &reply[..]));
    let status = m.node_b.status(Instant::now());
    assert_eq!(
        status.peers[0].path.as_deref(),
        Some("udp 198.18.0.1:51820")
    );
    assert_eq!(status.peers[0].counters.rx_packets, 1);
    assert_eq!(status.peers[0].counters.handshakes, 1);
    assert_eq!(
        m.node_a.status(Instant::now()).peers[0].counters.handshakes,
        1
    );
    assert!(status.peers[0].seconds_since_handshake.is_some());
}

#[test]
fn site_to_site_subnet_is_routed_to_its_peer() {
    let mut m = mesh();
    let p = ipv4_udp(
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(192, 168, 50, 2),
        100,
        true,
    );
    let (_, at_b) = send_from_a(&mut m, &p);
    assert_eq!(at_b, vec![p]);
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    // A's side sends with a source B does not allow for A.
    let spoofed = ipv4_udp(
        Ipv4Addr::new(10, 66, 0, 1),
        Ipv4Addr::new(192, 168, 50, 2),
        20,
        true,
    );
    let (_, at_b) = send_from_a(&mut m, &spoofed);
    assert!(at_b.is_empty());
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0]
            .counters
            .spoofed_source,
        1
    );
}

#[test]
fn handshake_from_unknown_key_is_dropped_and_counted() {
    let mut m = mesh();
    let stranger = Side::new("198.18.0.9:51820");
    let mut node_s = Node::new(
        &stranger.key,
        vec![m.b.as_peer("b", true, &[])],
        Instant::now(),
    )
    .unwrap();
    let mut out = vec![0u8; BUFFER_SIZE];
    let init = match node_s.handle_tun_packet(
        &ipv6_echo(stranger.mesh(), m.b.mesh(), 8),
        limits,
        &mut out,
        Instant::now(),
    ) {
        FromTun::Send { datagram, .. } => datagram.to_vec(),
        other => panic!("unexpected {other:?}"),
    };
    let got = m
        .node_b
        .handle_datagram(&stranger.addr, &init, &mut m.buf, Instant::now());
    assert!(matches!(got, FromNetwork::Dropped(DropReason::UnknownPeer)));
    assert_eq!(m.node_b.counters().unknown_peer_handshakes, 1);
    assert!(
        m.node_b.poll_transmit().is_none(),
        "nothing may be sent to a stranger"
    );
}

#[test]
fn unowned_mesh_address_gets_icmpv6_unreachable() {
    let mut m = mesh();
    let nobody: Ipv6Addr = "fd60:db4d:ddb5::1234".parse().unwrap();
    let ping = ipv6_echo(m.a.mesh(), nobody, 8);
    let mut out = vec![0u8; BUFFER_SIZE];
    match m
        .node_a
        .handle_tun_packet(&ping, limits, &mut out, Instant::now())
    {
        FromTun::Reply(icmp) => {
            let info = packet::parse(icmp).unwrap();
            assert_eq!(info.dst, IpAddr::V6(m.a.mesh()));
            assert_eq!((icmp[40], icmp[41]), (1, 0));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(m.node_a.counters().no_route, 1);
}

/// The packet from the issue: ICMP to an unrouted address with IPv4
/// total length 0. It panicked the ICMP error builder.
#[test]
fn ipv4_with_total_length_zero_is_refused_not_a_panic() {
    let mut m = mesh();
    let crafted = [
        0x45, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x01, 0x00, 0x00, 0x0a, 0x00, 0x00,
        0x01, 0x0a, 0x00, 0x00, 0x02,
    ];
    let mut out = vec![0u8; BUFFER_SIZE];
    let got = m
        .node_a
        .handle_tun_packet(&crafted, limits, &mut out, Instant::now());
    assert!(
        matches!(got, FromTun::Done(DropReason::BadPacket)),
        "{got:?}"
    );
    assert_eq!(m.node_a.counters().bad_tun_packet, 1);
}

#[test]
fn peer_without_path_gets_address_unreachable() {
    let mut m = mesh();
    // B has never heard from A, and has no endpoint for it.
    let ping = ipv6_echo(m.b.mesh(), m.a.mesh(), 8);
    let mut out = vec![0u8; BUFFER_SIZE];
    match m
        .node_b
        .handle_tun_packet(&ping, limits, &mut out, Instant::now())
    {
        FromTun::Reply(icmp) => assert_eq!((icmp[40], icmp[41]), (1, 3)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].counters.no_route,
        1
    );
}

#[test]
fn oversize_packets_get_packet_too_big_with_the_path_mtu() {
    let mut m = mesh();
    let mut out = vec![0u8; BUFFER_SIZE];
    let big6 = ipv6_echo(m.a.mesh(), m.b.mesh(), 1500);
    match m
        .node_a
        .handle_tun_packet(&big6, limits, &mut out, Instant::now())
    {
        FromTun::Reply(icmp) => {
            assert_eq!(icmp[40], 2);
            assert_eq!(
                u32::from_be_bytes([icmp[44], icmp[45], icmp[46], icmp[47]]),
                1440
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let big4 = ipv4_udp(
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(192, 168, 50, 2),
        1500,
        true,
    );
    match m
        .node_a
        .handle_tun_packet(&big4, limits, &mut out, Instant::now())
    {
        FromTun::Reply(icmp) => assert_eq!((icmp[20], icmp[21]), (3, 4)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        m.node_a.status(Instant::now()).peers[0].counters.oversize,
        2
    );
    // Without DF the outer datagram may be fragmented: it goes through.
    let big4_frag = ipv4_udp(
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(192, 168, 50, 2),
        1500,
        false,
    );
    let (_, at_b) = send_from_a(&mut m, &big4_frag);
    assert_eq!(at_b, vec![big4_frag]);
}

#[test]
fn authenticated_traffic_from_a_new_address_moves_the_path() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let mut out = vec![0u8; BUFFER_SIZE];
    let datagram = match m.node_a.handle_tun_packet(
        &ipv6_echo(m.a.mesh(), m.b.mesh(), 8),
        limits,
        &mut out,
        Instant::now(),
    ) {
        FromTun::Send { datagram, .. } => datagram.to_vec(),
        other => panic!("unexpected {other:?}"),
    };
    let moved = udp("198.18.0.77:40000");
    // Garbage from the new address must not move the path...
    let _ = m
        .node_b
        .handle_datagram(&moved, &[4, 0, 0, 0, 1, 2, 3], &mut m.buf, Instant::now());
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].path.as_deref(),
        Some("udp 198.18.0.1:51820")
    );
    // ...an authenticated packet does.
    assert!(matches!(
        m.node_b
            .handle_datagram(&moved, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::ToTun(_)
    ));
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].path.as_deref(),
        Some("udp 198.18.0.77:40000")
    );
}

#[test]
fn kernel_multicast_is_ignored_and_counted() {
    let mut m = mesh();
    let mut rs = ipv6_echo("fe80::1".parse().unwrap(), "ff02::2".parse().unwrap(), 8);
    rs[40] = 133;
    let mut out = vec![0u8; BUFFER_SIZE];
    assert!(matches!(
        m.node_a
            .handle_tun_packet(&rs, limits, &mut out, Instant::now()),
        FromTun::Done(DropReason::Multicast)
    ));
    assert_eq!(m.node_a.counters().multicast_ignored, 1);
}

/// A peer left unused for longer than `QUIET_AFTER` gets no WireGuard
/// timers driven; its first packet wakes it: the handshake and the packet
/// go through, over its path brought up to date.
#[test]
fn a_quiet_peer_wakes_with_its_first_packet() {
    let mut m = mesh();
    let later = Instant::now() + QUIET_AFTER + Duration::from_secs(60);
    m.node_a.handle_timeout(later);
    assert!(m.node_a.poll_transmit().is_none());
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 56);
    let (_, at_b) = send_from_a(&mut m, &ping);
    assert_eq!(at_b, vec![ping]);
    let status = m.node_a.status(later);
    assert_eq!(status.peers[0].counters.handshakes, 1);
    assert_eq!(
        status.peers[0].path.as_deref(),
        Some("udp 198.18.0.2:51820")
    );
}

#[test]
fn session_state_is_made_on_first_use_and_not_for_forged_indices() {
    let mut m = mesh();
    let made = |node: &Node| node.peers.slots[0].as_ref().unwrap().tunn.is_some();
    assert!(!made(&m.node_a) && !made(&m.node_b));
    // A data message naming the peer's first session index, which it
    // never handed out.
    let mut forged = vec![0u8; 48];
    forged[0] = 4;
    let bad_before = m.node_b.counters().bad_packet;
    let got = m
        .node_b
        .handle_datagram(&m.a.addr, &forged, &mut m.buf, Instant::now());
    assert!(
        matches!(got, FromNetwork::Dropped(DropReason::BadPacket)),
        "{got:?}"
    );
    assert_eq!(m.node_b.counters().bad_packet, bad_before + 1);
    assert!(!made(&m.node_b));
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 56);
    let (_, at_b) = send_from_a(&mut m, &ping);
    assert_eq!(at_b, vec![ping]);
    assert!(made(&m.node_a) && made(&m.node_b));
}

#[test]
fn timers_start_a_handshake_for_keepalive_peers() {
    let a = Side::new("198.18.0.1:51820");
    let b = Side::new("198.18.0.2:51820");
    let mut peer = b.as_peer("b", true, &[]);
    peer.persistent_keepalive = Some(1);
    let start = Instant::now();
    let mut node = Node::new(&a.key, vec![peer], start).unwrap();
    assert!(node.poll_timeout().at <= start);
    node.handle_timeout(start);
    let t = node.poll_transmit().expect("a handshake initiation");
    assert_eq!(t.to, b.addr);
    assert_eq!(message_type(&t.payload), Some(1));
    assert!(node.poll_transmit().is_none());
    assert!(node.poll_timeout().at > start);
}

proptest! {
    #[test]
    fn garbage_datagrams_never_panic_and_are_counted(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        kind in 0u8..6,
    ) {
        let mut m = mesh();
        let mut datagram = bytes;
        // Bias towards valid message types so the deeper parsers are reached.
        if kind < 4 && datagram.len() >= 4 {
            datagram[..4].copy_from_slice(&u32::from(kind + 1).to_le_bytes());
        }
        let before = m.node_b.counters().clone();
        let got = m.node_b.handle_datagram(&m.a.addr, &datagram, &mut m.buf, Instant::now());
        prop_assert!(matches!(got, FromNetwork::Dropped(_)), "{:?}", got);
        let after = m.node_b.counters();
        let peer_bad = m.node_b.status(Instant::now()).peers[0].counters.bad_packet;
        prop_assert!(after.bad_packet + peer_bad + after.unknown_peer_handshakes
            > before.bad_packet + before.unknown_peer_handshakes);
    }

    #[test]
    fn garbage_tun_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut m = mesh();
        let mut out = vec![0u8; BUFFER_SIZE];
        let _ = m.node_a.handle_tun_packet(&bytes, limits, &mut out, Instant::now());
    }
}

fn data_message(node: &mut Node, packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; BUFFER_SIZE];
    match node.handle_tun_packet(packet, limits, &mut out, Instant::now()) {
        FromTun::Send { datagram, .. } => datagram.to_vec(),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn reconfigure_keeps_unchanged_sessions_and_adds_peers() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let c = Side::new("198.18.0.3:51820");
    let report = m
        .node_a
        .reconfigure(
            vec![
                m.b.as_peer("b", true, &["192.168.50.0/24"]),
                c.as_peer("c", true, &[]),
            ],
            Instant::now(),
        )
        .unwrap();
    assert_eq!(report.added, vec!["c"]);
    assert_eq!(report.unchanged, vec!["b"]);
    // Still a data message (type 4), not a new handshake (type 1).
    let datagram = data_message(&mut m.node_a, &ping);
    assert_eq!(message_type(&datagram), Some(DATA));
    assert!(matches!(
        m.node_b
            .handle_datagram(&m.a.addr, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::ToTun(_)
    ));
    // And the new peer is routed: its first packet starts a handshake.
    let ping_c = ipv6_echo(m.a.mesh(), c.mesh(), 8);
    let to_c = data_message(&mut m.node_a, &ping_c);
    assert_eq!(message_type(&to_c), Some(1));
}

#[test]
fn reconfigure_forgets_removed_peers_and_moves_routes() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let from_a = data_message(&mut m.node_a, &ping);
    // b drops a; a's traffic is no longer accepted.
    let report = m.node_b.reconfigure(vec![], Instant::now()).unwrap();
    assert_eq!(report.removed, vec!["a"]);
    assert!(matches!(
        m.node_b
            .handle_datagram(&m.a.addr, &from_a, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(_)
    ));
    assert!(m.node_b.status(Instant::now()).peers.is_empty());
    // a moves b's subnet: 192.168.50.0/24 becomes 192.168.60.0/24.
    let report = m
        .node_a
        .reconfigure(
            vec![m.b.as_peer("b", true, &["192.168.60.0/24"])],
            Instant::now(),
        )
        .unwrap();
    assert_eq!(report.changed, vec!["b"]);
    let mut out = vec![0u8; BUFFER_SIZE];
    let old = ipv4_udp(
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(192, 168, 50, 2),
        8,
        true,
    );
    assert!(matches!(
        m.node_a
            .handle_tun_packet(&old, limits, &mut out, Instant::now()),
        FromTun::Reply(_)
    ));
    let new = ipv4_udp(
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(192, 168, 60, 2),
        8,
        true,
    );
    assert!(matches!(
        m.node_a
            .handle_tun_packet(&new, limits, &mut out, Instant::now()),
        FromTun::Send { .. }
    ));
}

#[test]
fn over_tox_only_the_peers_own_tox_key_may_carry_its_session() {
    use veilmesh_transport::ToxPublicKey;
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let datagram = data_message(&mut m.node_a, &ping);
    // b has no Tox ID configured for a: a Tox friend cannot deliver a's traffic.
    let stranger = PeerAddr::Tox(ToxPublicKey([9; 32]));
    assert!(matches!(
        m.node_b
            .handle_datagram(&stranger, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::UnknownPeer)
    ));
    assert_eq!(m.node_b.counters().unknown_sender, 1);
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].path.as_deref(),
        Some("udp 198.18.0.1:51820")
    );
}

#[test]
fn a_peer_restricted_to_i2p_is_neither_reached_nor_accepted_over_udp() {
    use veilmesh_transport::I2pAddress;
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    // b now allows a only over I2P, though it knows a UDP endpoint too.
    let a_dest = I2pAddress([5; 32]);
    let mut restricted = m.a.as_peer("a", true, &["10.10.1.1/32"]);
    restricted.paths.push(PeerAddr::I2p(a_dest));
    restricted.transports = vec![TransportKind::I2p];
    m.node_b
        .reconfigure(vec![restricted], Instant::now())
        .unwrap();
    let path_of_a = |node: &Node| node.status(Instant::now()).peers[0].path.clone();
    assert_eq!(path_of_a(&m.node_b), Some(format!("i2p {a_dest}")));

    // Authentic traffic from a over UDP is dropped before decryption, and
    // b does not roam to UDP.
    let over_udp = data_message(&mut m.node_a, &ping);
    assert!(matches!(
        m.node_b
            .handle_datagram(&m.a.addr.clone(), &over_udp, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::WrongPath)
    ));
    // So is traffic from another I2P destination, before any crypto.
    let other_dest = PeerAddr::I2p(I2pAddress([6; 32]));
    assert!(matches!(
        m.node_b
            .handle_datagram(&other_dest, &over_udp, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::UnknownPeer)
    ));
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].counters.wrong_path,
        1
    );
    assert_eq!(m.node_b.counters().unknown_sender, 1);
    assert_eq!(path_of_a(&m.node_b), Some(format!("i2p {a_dest}")));

    // From a's own destination it is delivered, and b answers over I2P.
    let over_i2p = data_message(&mut m.node_a, &ping);
    assert!(matches!(
        m.node_b.handle_datagram(
            &PeerAddr::I2p(a_dest),
            &over_i2p,
            &mut m.buf,
            Instant::now()
        ),
        FromNetwork::ToTun(_)
    ));
    let reply = ipv6_echo(m.b.mesh(), m.a.mesh(), 8);
    let mut out = vec![0u8; BUFFER_SIZE];
    match m
        .node_b
        .handle_tun_packet(&reply, limits, &mut out, Instant::now())
    {
        FromTun::Send { to, .. } => assert_eq!(to, PeerAddr::I2p(a_dest)),
        other => panic!("unexpected {other:?}"),
    }
    // Timers (keepalives, rekeys) also only ever go over I2P.
    m.node_b
        .handle_timeout(Instant::now() + Duration::from_secs(200));
    while let Some(t) = m.node_b.poll_transmit() {
        assert_eq!(t.to, PeerAddr::I2p(a_dest));
    }
}

#[test]
fn transports_order_chooses_the_first_path() {
    use veilmesh_transport::I2pAddress;
    let side = Side::new("198.18.0.1:51820");
    let mut peer = side.as_peer("p", true, &[]);
    peer.paths.push(PeerAddr::I2p(I2pAddress([1; 32])));
    let i2p = PeerAddr::I2p(I2pAddress([1; 32]));
    assert_eq!(configured_paths(&peer), [side.addr.clone(), i2p.clone()]);
    peer.transports = vec![TransportKind::I2p, TransportKind::Udp];
    assert_eq!(configured_paths(&peer), [i2p, side.addr.clone()]);
    peer.transports = vec![TransportKind::Tox];
    assert_eq!(configured_paths(&peer), []);
}

/// Two nodes that know each other only by Tox, each with a UDP endpoint
/// of its own; the network between them is simulated with time in steps.
struct PathSim {
    nodes: [Node; 2],
    tox: [PeerAddr; 2],
    udp: [SocketAddr; 2],
    udp_blocked: bool,
    /// Node 0 behind a symmetric NAT: its own endpoint (the one it
    /// announces, as a STUN server saw it) admits nothing; toward node 1
    /// it appears from this mapping, open once a packet to node 1 left.
    sym_nat_0: Option<(SocketAddr, bool)>,
    /// Data messages (not handshakes) node 1 sends over Tox are lost until
    /// then, as on a paced Tox TCP relay; counted in `lost`.
    tox_data_lost_from_1_until: Option<Instant>,
    lost: usize,
    now: Instant,
    buf: Vec<u8>,
    delivered_to_tun: [usize; 2],
}

/// Nodes on a simulated network, its clock moved by hand.
trait Sim {
    fn nodes(&mut self) -> &mut [Node];
    fn clock(&mut self) -> &mut Instant;
    /// `ttl`: the IP TTL the datagram was sent with, if not the default.
    fn deliver(&mut self, sender: usize, to: &PeerAddr, payload: &[u8], ttl: Option<u8>);

    /// Runs timers and delivers everything sent, for `duration`.
    fn run(&mut self, duration: Duration) {
        let end = *self.clock() + duration;
        while *self.clock() < end {
            *self.clock() += Duration::from_millis(50);
            let now = *self.clock();
            for node in self.nodes() {
                node.handle_timeout(now);
            }
            for _ in 0..100 {
                let mut moved = false;
                for i in 0..self.nodes().len() {
                    while let Some(t) = self.nodes()[i].poll_transmit() {
                        moved = true;
                        self.deliver(i, &t.to, &t.payload, t.ttl);
                    }
                }
                if !moved {
                    break;
                }
            }
        }
    }
}

impl Sim for PathSim {
    fn nodes(&mut self) -> &mut [Node] {
        &mut self.nodes
    }
    fn clock(&mut self) -> &mut Instant {
        &mut self.now
    }
    fn deliver(&mut self, sender: usize, to: &PeerAddr, payload: &[u8], ttl: Option<u8>) {
        let data_message = payload.first() == Some(&4);
        if sender == 1
            && data_message
            && matches!(to, PeerAddr::Tox(_))
            && self
                .tox_data_lost_from_1_until
                .is_some_and(|t| self.now < t)
        {
            self.lost += 1;
            return;
        }
        if let Some((receiver, from)) = self.route(sender, to, ttl) {
            let now = self.now;
            if let FromNetwork::ToTun(_) =
                self.nodes[receiver].handle_datagram(&from, payload, &mut self.buf, now)
            {
                self.delivered_to_tun[receiver] += 1;
            }
        }
    }
}

impl PathSim {
    fn new() -> PathSim {
        use veilmesh_transport::ToxPublicKey;
        let now = Instant::now();
        let keys = [seeded_key(b"path sim a"), seeded_key(b"path sim b")];
        let tox_keys = [ToxPublicKey([1; 32]), ToxPublicKey([2; 32])];
        let udp: [SocketAddr; 2] = [
            "192.0.2.1:40000".parse().unwrap(),
            "198.51.100.1:40000".parse().unwrap(),
        ];
        let peer_config = |i: usize| PeerSpec {
            name: format!("n{i}"),
            public_key: keys[i].public_key(),
            paths: vec![PeerAddr::Tox(tox_keys[i])],
            allowed_ips: vec![],
            persistent_keepalive: None,
            transports: vec![TransportKind::Udp, TransportKind::Tox],
            allowed_destinations: None,
            accept: None,
            relay: false,
        };
        let mut nodes = [
            Node::new(&keys[0], vec![peer_config(1)], now).unwrap(),
            Node::new(&keys[1], vec![peer_config(0)], now).unwrap(),
        ];
        for (node, sa) in nodes.iter_mut().zip(udp) {
            node.set_local_candidates(vec![sa], now);
        }
        PathSim {
            nodes,
            tox: [PeerAddr::Tox(tox_keys[0]), PeerAddr::Tox(tox_keys[1])],
            udp,
            udp_blocked: false,
            sym_nat_0: None,
            tox_data_lost_from_1_until: None,
            lost: 0,
            now,
            buf: vec![0u8; BUFFER_SIZE],
            delivered_to_tun: [0, 0],
        }
    }

    /// Where a datagram to `to` lands, and who it appears to come from.
    fn route(
        &mut self,
        sender: usize,
        to: &PeerAddr,
        ttl: Option<u8>,
    ) -> Option<(usize, PeerAddr)> {
        let receiver = 1 - sender;
        match (to, &mut self.sym_nat_0) {
            (PeerAddr::Tox(_), _) if *to == self.tox[receiver] => {
                Some((receiver, self.tox[sender].clone()))
            }
            _ if self.udp_blocked => None,
            (PeerAddr::Udp(sa), None) if *sa == self.udp[receiver] => {
                Some((receiver, PeerAddr::Udp(self.udp[sender])))
            }
            // Any packet opens the mapping; one with a short TTL dies
            // before node 1 (a full cone, which lets in anything).
            (PeerAddr::Udp(sa), Some((mapping, open))) if sender == 0 && *sa == self.udp[1] => {
                *open = true;
                ttl.is_none().then(|| (1, PeerAddr::Udp(*mapping)))
            }
            (PeerAddr::Udp(sa), Some((mapping, true))) if sender == 1 && sa == mapping => {
                Some((0, PeerAddr::Udp(self.udp[1])))
            }
            _ => None,
        }
    }

    /// A ping from node 0 to node 1's mesh address; returns the path used.
    fn ping(&mut self) -> Option<PeerAddr> {
        let src = self.nodes[0].mesh_address();
        let dst = self.nodes[1].mesh_address();
        let mut out = vec![0u8; BUFFER_SIZE];
        let (to, datagram) = match self.nodes[0].handle_tun_packet(
            &ipv6_echo(src, dst, 8),
            limits,
            &mut out,
            self.now,
        ) {
            FromTun::Send { to, datagram } => (to, datagram.to_vec()),
            _ => return None,
        };
        self.deliver(0, &to, &datagram, None);
        Some(to)
    }

    fn in_use(&self, i: usize) -> Option<String> {
        self.nodes[i].status(self.now).peers[0].path.clone()
    }
}

#[test]
fn a_peer_first_reached_over_tox_is_moved_to_direct_udp_and_back() {
    let mut sim = PathSim::new();
    sim.ping();
    sim.run(Duration::from_secs(2));
    let direct_b = format!("udp {}", sim.udp[1]);
    let direct_a = format!("udp {}", sim.udp[0]);
    assert_eq!(sim.in_use(0).as_deref(), Some(direct_b.as_str()));
    assert_eq!(sim.in_use(1).as_deref(), Some(direct_a.as_str()));
    assert_eq!(sim.ping(), Some(PeerAddr::Udp(sim.udp[1])));
    let status = sim.nodes[0].status(sim.now);
    let paths = &status.peers[0].paths;
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(
        paths
            .iter()
            .all(|p| p.state == "live" && p.rtt_ms.is_some()),
        "{paths:?}"
    );

    // The direct path breaks: within 5 s both sides use Tox.
    sim.udp_blocked = true;
    let blocked_at = sim.now;
    let mut moved_after = None;
    for _ in 0..100 {
        sim.run(Duration::from_millis(100));
        if sim.in_use(0).is_some_and(|p| p.starts_with("tox"))
            && sim.in_use(1).is_some_and(|p| p.starts_with("tox"))
        {
            moved_after = Some(sim.now - blocked_at);
            break;
        }
    }
    let moved_after = moved_after.expect("failover to Tox");
    assert!(moved_after <= Duration::from_secs(5), "{moved_after:?}");
    let before = sim.delivered_to_tun[1];
    sim.ping();
    assert_eq!(sim.delivered_to_tun[1], before + 1, "pings cross over Tox");

    // It heals: traffic returns to direct UDP.
    sim.udp_blocked = false;
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.in_use(0).as_deref(), Some(direct_b.as_str()));
    assert_eq!(sim.ping(), Some(PeerAddr::Udp(sim.udp[1])));
}

/// A symmetric NAT meets a full cone over Tox, and the first exchange of
/// endpoints is lost on the way (a paced TCP relay dropping data): the
/// announcement is asked again within seconds, not at the next punch 30 s
/// later, and the pair reaches direct UDP.
#[test]
fn a_lost_answer_to_an_announcement_is_asked_again_soon() {
    let mut sim = PathSim::new();
    sim.sym_nat_0 = Some(("192.0.2.1:50123".parse().unwrap(), false));
    sim.tox_data_lost_from_1_until = Some(sim.now + Duration::from_secs(1));
    let start = sim.now;
    sim.ping();
    let direct_b = format!("udp {}", sim.udp[1]);
    let mut direct_after = None;
    for _ in 0..200 {
        sim.run(Duration::from_millis(100));
        if sim.in_use(0).as_deref() == Some(direct_b.as_str()) {
            direct_after = Some(sim.now - start);
            break;
        }
    }
    assert!(sim.lost > 0, "nothing was lost: the test tests nothing");
    let after = direct_after.expect("no direct path within 20 s");
    assert!(after <= Duration::from_secs(6), "direct after {after:?}");
    assert_eq!(sim.ping(), Some(PeerAddr::Udp(sim.udp[1])));
}

#[test]
fn endpoints_are_never_announced_to_a_peer_restricted_from_udp() {
    let mut sim = PathSim::new();
    // Node 0 allows node 1 only over Tox.
    let mut restricted = sim.nodes[0].peers.slots[0].as_ref().unwrap().spec.clone();
    restricted.transports = vec![TransportKind::Tox];
    let now = sim.now;
    sim.nodes[0].reconfigure(vec![restricted], now).unwrap();
    sim.ping();
    sim.run(Duration::from_secs(3));
    // Node 1 never learns a UDP path to node 0, and node 0 never uses UDP.
    let status = sim.nodes[1].status(sim.now);
    assert!(
        status.peers[0]
            .paths
            .iter()
            .all(|p| !p.address.starts_with("udp")),
        "{:?}",
        status.peers[0].paths
    );
    assert!(sim.in_use(0).is_some_and(|p| p.starts_with("tox")));
    assert_eq!(sim.nodes[0].status(sim.now).peers[0].counters.wrong_path, 0);
}

#[test]
fn peer_messages_from_the_tun_are_refused() {
    let mut m = mesh();
    let mut packet = Vec::new();
    peer_messages::encode_packet(
        &PeerMessage::Probe { id: 1 },
        m.a.mesh(),
        m.b.mesh(),
        &mut packet,
    );
    let mut out = vec![0u8; BUFFER_SIZE];
    assert!(matches!(
        m.node_a
            .handle_tun_packet(&packet, limits, &mut out, Instant::now()),
        FromTun::Done(DropReason::BadPacket)
    ));
}

/// A mesh with a session, right after A's presence on UDP was re-created.
fn mesh_after_a_moved() -> (Mesh, Instant) {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let t0 = Instant::now();
    m.node_a.transport_rehomed(TransportKind::Udp, t0);
    (m, t0)
}

/// Runs both nodes' timers at `at`; what A sends reaches B, B's answers
/// are lost (its router still sends them to where A was).
fn b_is_not_heard(m: &mut Mesh, at: Instant) {
    m.node_a.handle_timeout(at);
    while let Some(t) = m.node_a.poll_transmit() {
        m.node_b
            .handle_datagram(&m.a.addr, &t.payload, &mut m.buf, at);
    }
    m.node_b.handle_timeout(at);
    while m.node_b.poll_transmit().is_some() {}
}

/// Only A's timers run, and nothing gets through either way.
fn nobody_gets_through(m: &mut Mesh, at: Instant) {
    m.node_a.handle_timeout(at);
    while m.node_a.poll_transmit().is_some() {}
}

/// After A moved, B hears A but A does not hear B: B renews its own
/// presence on its own evidence (its probes go unanswered while A's
/// traffic arrives), once, and A asks for nothing.
#[test]
fn a_peer_that_is_heard_but_not_answered_renews_its_presence_once() {
    let (mut m, t0) = mesh_after_a_moved();
    let mut renewed_at = None;
    for tick in 0..4 * 120 {
        let at = t0 + Duration::from_millis(250 * tick);
        b_is_not_heard(&mut m, at);
        if let Some(kind) = renewal(&mut m.node_b) {
            assert_eq!(kind, TransportKind::Udp);
            assert!(renewed_at.is_none(), "renewed again at {:?}", at - t0);
            renewed_at = Some(at - t0);
            // The daemon re-creates the presence; it fares no better here,
            // and the next renewal waits for the backoff.
            m.node_b.transport_rehomed(TransportKind::Udp, at);
        }
        assert_eq!(renewal(&mut m.node_a), None, "a renewed at {:?}", at - t0);
        if renewed_at.is_some_and(|r| at - t0 > r + RENEW_BACKOFF_MIN - Duration::from_secs(1)) {
            break;
        }
    }
    let renewed_at = renewed_at.expect("b never renewed");
    println!("b renewed {renewed_at:?} after a moved");
    assert!(
        renewed_at <= paths::KEEPALIVE_INTERVAL + Duration::from_secs(15),
        "{renewed_at:?}"
    );
}

#[test]
fn peers_that_hear_each_other_after_a_move_renew_nothing() {
    let (mut m, t0) = mesh_after_a_moved();
    for s in 0..=120 {
        let at = t0 + Duration::from_secs(s);
        m.node_a.handle_timeout(at);
        m.node_b.handle_timeout(at);
        pump(&mut m, None);
    }
    assert_eq!(renewal(&mut m.node_b), None);
    assert_eq!(renewal(&mut m.node_a), None);
}

#[test]
fn with_no_peer_getting_through_after_a_move_we_renew_our_own_presence_once() {
    let (mut m, t0) = mesh_after_a_moved();
    for s in 0..MOVE_SILENCE.as_secs() {
        nobody_gets_through(&mut m, t0 + Duration::from_secs(s));
        assert_eq!(
            renewal(&mut m.node_a),
            None,
            "renewed ourselves early ({s} s)"
        );
    }
    nobody_gets_through(&mut m, t0 + MOVE_SILENCE);
    assert_eq!(renewal(&mut m.node_a), Some(TransportKind::Udp));
    // The renewed presence fares no better: no renewing in a loop.
    let t1 = t0 + MOVE_SILENCE + Duration::from_secs(30);
    m.node_a.transport_rehomed(TransportKind::Udp, t1);
    for s in 0..3 * MOVE_SILENCE.as_secs() {
        nobody_gets_through(&mut m, t1 + Duration::from_secs(s));
    }
    assert_eq!(renewal(&mut m.node_a), None);
}

/// An initiation from a fresh node of A's, as after A's retries or a
/// restart; B answers it.
fn b_answers_a_new_initiation(m: &mut Mesh, at: Instant) {
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    let mut out = vec![0u8; BUFFER_SIZE];
    let b_config = m.b.as_peer("b", true, &["192.168.50.0/24"]);
    m.node_a = Node::new(&m.a.key, vec![b_config], at).unwrap();
    let FromTun::Send { datagram, .. } = m.node_a.handle_tun_packet(&ping, limits, &mut out, at)
    else {
        panic!("no initiation");
    };
    let got = m
        .node_b
        .handle_datagram(&m.a.addr, datagram, &mut m.buf, at);
    assert!(matches!(got, FromNetwork::Consumed));
    // B answers; the answer is lost.
    assert!(m.node_b.poll_transmit().is_some());
    while m.node_b.poll_transmit().is_some() {}
}

#[test]
fn a_peer_that_keeps_initiating_although_answered_makes_us_renew() {
    let mut m = mesh();
    let t0 = Instant::now();
    for round in 1..=REPEATED_INITIATIONS {
        b_answers_a_new_initiation(&mut m, t0 + Duration::from_secs(u64::from(round)));
        let expected = (round == REPEATED_INITIATIONS).then_some(TransportKind::Udp);
        assert_eq!(renewal(&mut m.node_b), expected, "round {round}");
    }
}

/// A peer that never confirms a session and re-initiates three times a
/// minute for ten minutes gets renewals at exponentially growing
/// intervals, not one a minute: each costs every peer on the transport an
/// outage. (Ten minutes, three a minute: boringtun's rate limiter counts
/// in real time, and the test runs in well under a second of it.)
#[test]
fn renewals_a_peer_provokes_back_off_exponentially() {
    let mut m = mesh();
    let t0 = Instant::now();
    let mut renewals = Vec::new();
    for minute in 0..10u64 {
        for i in 0..3 {
            let at = t0 + Duration::from_secs(60 * minute + 5 * i);
            b_answers_a_new_initiation(&mut m, at);
            m.node_b.handle_timeout(at);
            while m.node_b.poll_transmit().is_some() {}
            if renewal(&mut m.node_b).is_some() {
                renewals.push((at - t0).as_secs());
            }
        }
    }
    println!("renewals in ten minutes: {renewals:?} s");
    // At 10 s, then at least 60, 120, 240 s apart: 4 at most.
    assert_eq!(renewals.len(), 4, "{renewals:?}");
    for (pair, wait) in renewals.windows(2).zip([60, 120, 240]) {
        assert!(pair[1] - pair[0] >= wait, "{renewals:?}");
    }
}

/// The next renewal the node asks for; other events are passed over.
fn renewal(node: &mut Node) -> Option<TransportKind> {
    std::iter::from_fn(|| node.poll_event()).find_map(|event| match event {
        Event::RenewPresence(kind) => Some(kind),
        _ => None,
    })
}

/// The last rendezvous wish the node has for the daemon, if it changed.
fn rendezvous_wanted(node: &mut Node) -> Option<RendezvousWanted> {
    std::iter::from_fn(|| node.poll_event())
        .filter_map(|event| match event {
            Event::RendezvousWanted(wanted) => Some(wanted),
            _ => None,
        })
        .last()
}

/// The rendezvous DHT is told what to do when that changes, not on every
/// wake-up: at start, when a session is made, when our endpoints change.
#[test]
fn rendezvous_wishes_come_only_when_they_change() {
    let mut m = mesh();
    let wanted = rendezvous_wanted(&mut m.node_a).expect("a first wish at start");
    assert_eq!(wanted.publish_to, [m.b.key.public_key()]);
    assert_eq!(wanted.look_up, [m.b.key.public_key()], "no session yet");
    assert!(wanted.endpoints.is_empty());
    let now = Instant::now();
    m.node_a.handle_timeout(now);
    assert_eq!(rendezvous_wanted(&mut m.node_a), None, "nothing changed");

    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let wanted = rendezvous_wanted(&mut m.node_a).expect("a session was made");
    assert!(wanted.look_up.is_empty(), "{wanted:?}");
    assert_eq!(wanted.publish_to, [m.b.key.public_key()]);
    let wanted = rendezvous_wanted(&mut m.node_b).expect("b made one too");
    assert!(wanted.look_up.is_empty(), "{wanted:?}");

    let own: SocketAddr = "198.18.0.1:51820".parse().unwrap();
    m.node_a.set_local_candidates(vec![own], now);
    let wanted = rendezvous_wanted(&mut m.node_a).expect("our endpoints changed");
    assert_eq!(wanted.endpoints, [own]);
    m.node_a.set_local_candidates(vec![own], now);
    m.node_a.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(rendezvous_wanted(&mut m.node_a), None);
}

/// The retired Renew request (peer message type 4), even inside an
/// authenticated session, makes us renew nothing.
#[test]
fn a_peer_cannot_ask_us_to_renew() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let mut packet = Vec::new();
    peer_messages::encode_packet(
        &PeerMessage::Probe { id: 0 },
        m.a.mesh(),
        m.b.mesh(),
        &mut packet,
    );
    packet.truncate(44);
    packet[43] = 4;
    packet[4..6].copy_from_slice(&4u16.to_be_bytes());
    let mut out = vec![0u8; BUFFER_SIZE];
    let peer = m.node_a.peers.slots[0].as_mut().unwrap();
    let tunn = peer.tunn.as_mut().expect("a session");
    let TunnResult::WriteToNetwork(datagram) = tunn.encapsulate(&packet, &mut out) else {
        panic!("no session");
    };
    let datagram = datagram.to_vec();
    for s in 0..120 {
        let at = Instant::now() + Duration::from_secs(s);
        m.node_b
            .handle_datagram(&m.a.addr, &datagram, &mut m.buf, at);
        assert_eq!(renewal(&mut m.node_b), None);
    }
}

/// Another path's worth of endpoints a peer may not make us use: loopback,
/// link-local and our own.
#[test]
fn announced_endpoints_that_reach_no_peer_are_never_probed() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let now = Instant::now();
    let own: SocketAddr = "198.18.0.1:51820".parse().unwrap();
    m.node_a.set_local_candidates(vec![own], now);
    let announced: Vec<SocketAddr> = [
        "127.0.0.1:51820",
        "[::1]:51820",
        "169.254.7.7:51820",
        "[fe80::1]:51820",
        "198.18.0.1:51820",
        "198.18.0.77:51820",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    m.node_b.send_peer_message(
        0,
        m.a.addr.clone(),
        &PeerMessage::Candidates {
            endpoints: announced,
            reply: false,
        },
        None,
    );
    let announcement = m.node_b.poll_transmit().unwrap();
    m.node_a
        .handle_datagram(&m.b.addr, &announcement.payload, &mut m.buf, now);
    let probed: Vec<PeerAddr> = std::iter::from_fn(|| m.node_a.poll_transmit())
        .map(|t| t.to)
        .collect();
    assert!(probed.contains(&udp("198.18.0.77:51820")), "{probed:?}");
    let paths: Vec<String> = m.node_a.status(now).peers[0]
        .paths
        .iter()
        .map(|p| p.address.clone())
        .collect();
    assert!(
        paths.contains(&"udp 198.18.0.77:51820".to_owned()),
        "{paths:?}"
    );
    for bad in ["127.0.0.1", "::1", "169.254.7.7", "fe80::1", "198.18.0.1:"] {
        assert!(!paths.iter().any(|p| p.contains(bad)), "{bad} in {paths:?}");
    }
}

/// b reaches a only over I2P; a's side of the test is done by hand.
fn mesh_with_a_anonymous_to_b(allowed_destinations: Option<Vec<IpNet>>) -> (Mesh, PeerAddr) {
    use veilmesh_transport::I2pAddress;
    let mut m = mesh();
    let a_dest = PeerAddr::I2p(I2pAddress([5; 32]));
    let mut restricted = m.a.as_peer("a", false, &["10.10.1.1/32"]);
    restricted.paths.push(a_dest.clone());
    restricted.transports = vec![TransportKind::I2p];
    restricted.allowed_destinations = allowed_destinations;
    m.node_b
        .reconfigure(vec![restricted], Instant::now())
        .unwrap();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    let init = data_message(&mut m.node_a, &ping);
    m.node_b
        .handle_datagram(&a_dest, &init, &mut m.buf, Instant::now());
    let response = m.node_b.poll_transmit().expect("handshake response");
    assert_eq!(response.to, a_dest);
    m.node_a
        .handle_datagram(&m.b.addr, &response.payload, &mut m.buf, Instant::now());
    while m.node_a.poll_transmit().is_some() {}
    (m, a_dest)
}

/// A UDP packet between a's tunnel address and b's LAN, either way.
fn lan_packet(to_lan: bool) -> Vec<u8> {
    let (a, lan) = (Ipv4Addr::new(10, 10, 1, 1), Ipv4Addr::new(192, 168, 50, 2));
    let (src, dst) = if to_lan { (a, lan) } else { (lan, a) };
    ipv4_udp(src, dst, 20, true)
}

/// An anonymous peer that pings our LAN or public address through the
/// tunnel would learn it from the answer: it reaches our mesh address only.
#[test]
fn an_anonymous_peer_reaches_our_mesh_address_only() {
    let (mut m, a_dest) = mesh_with_a_anonymous_to_b(None);
    let now = Instant::now();
    let to_lan = lan_packet(true);
    let datagram = data_message(&mut m.node_a, &to_lan);
    assert!(matches!(
        m.node_b
            .handle_datagram(&a_dest, &datagram, &mut m.buf, now),
        FromNetwork::Dropped(DropReason::RefusedAddress)
    ));
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    let datagram = data_message(&mut m.node_a, &ping);
    assert!(matches!(
        m.node_b
            .handle_datagram(&a_dest, &datagram, &mut m.buf, now),
        FromNetwork::ToTun(_)
    ));
    // Nothing leaves towards it from another address of ours either.
    let from_lan = lan_packet(false);
    let mut out = vec![0u8; BUFFER_SIZE];
    assert!(matches!(
        m.node_b
            .handle_tun_packet(&from_lan, limits, &mut out, Instant::now()),
        FromTun::Done(DropReason::RefusedAddress)
    ));
    let counters = m.node_b.status(now).peers[0].counters.clone();
    assert_eq!(
        (counters.refused_destination, counters.refused_source),
        (1, 1)
    );
}

/// The TUN's own addresses say nothing of where we are: an anonymous peer
/// (a Tox-only peer of a toxvpn-style setup, say) reaches them.
#[test]
fn an_anonymous_peer_reaches_our_tunnel_addresses() {
    let (mut m, a_dest) = mesh_with_a_anonymous_to_b(None);
    m.node_b
        .set_tunnel_addresses(["192.168.50.2".parse::<IpAddr>().unwrap()]);
    let datagram = data_message(&mut m.node_a, &lan_packet(true));
    assert!(matches!(
        m.node_b
            .handle_datagram(&a_dest, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::ToTun(_)
    ));
    let mut out = vec![0u8; BUFFER_SIZE];
    assert!(matches!(
        m.node_b
            .handle_tun_packet(&lan_packet(false), limits, &mut out, Instant::now()),
        FromTun::Send { .. }
    ));
}

#[test]
fn allowed_destinations_open_more_of_our_addresses_to_an_anonymous_peer() {
    let lan: IpNet = "192.168.50.0/24".parse().unwrap();
    let (mut m, a_dest) = mesh_with_a_anonymous_to_b(Some(vec![lan]));
    let to_lan = lan_packet(true);
    let datagram = data_message(&mut m.node_a, &to_lan);
    assert!(matches!(
        m.node_b
            .handle_datagram(&a_dest, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::ToTun(_)
    ));
    let from_lan = lan_packet(false);
    let mut out = vec![0u8; BUFFER_SIZE];
    assert!(matches!(
        m.node_b
            .handle_tun_packet(&from_lan, limits, &mut out, Instant::now()),
        FromTun::Send { .. }
    ));
}

/// A handshake initiation from `key` to `to` (valid MAC, so it reaches
/// the rate limiter and, under load, the cookie logic).
fn initiation(key: &PrivateKey, to: &PublicKey) -> Vec<u8> {
    let mut tunn = Tunn::new(key.to_x25519(), to.to_x25519(), None, None, 1, None);
    let mut out = vec![0u8; 256];
    match tunn.format_handshake_initiation(&mut out, true) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        _ => panic!("no initiation"),
    }
}

/// A flood of UDP initiations from spoofed sources (any key: only our
/// public key is needed for a valid MAC). Nobody restricted away from UDP
/// gets any answer over UDP, whatever the load; peers that may use UDP
/// get cookies; and handshakes over I2P go through at once.
#[test]
fn a_udp_flood_neither_blocks_i2p_handshakes_nor_answers_anonymous_keys() {
    use veilmesh_transport::I2pAddress;
    let mut m = mesh();
    let hidden = Side::new("198.18.0.3:51820");
    let hidden_dest = I2pAddress([7; 32]);
    let mut hidden_peer = hidden.as_peer("hidden", false, &[]);
    hidden_peer.paths.push(PeerAddr::I2p(hidden_dest));
    hidden_peer.transports = vec![TransportKind::I2p];
    let b_peer = m.b.as_peer("b", true, &["192.168.50.0/24"]);
    let now = Instant::now();
    let mut node_a = Node::new(&m.a.key, vec![b_peer, hidden_peer], now).unwrap();
    let a_public = m.a.key.public_key();
    // Not under load: an anonymous key over UDP gets nothing.
    let from_hidden = initiation(&hidden.key, &a_public);
    node_a.handle_datagram(&hidden.addr, &from_hidden, &mut m.buf, now);
    assert!(node_a.poll_transmit().is_none());
    for i in 0..300u32 {
        let spoofed = udp(&format!("203.0.113.{}:{}", i % 250 + 1, 1000 + i));
        let key = seeded_key(&i.to_be_bytes());
        node_a.handle_datagram(&spoofed, &initiation(&key, &a_public), &mut m.buf, now);
    }
    while node_a.poll_transmit().is_some() {}
    // Under load: still nothing for the anonymous key, from any address...
    node_a.handle_datagram(&hidden.addr, &from_hidden, &mut m.buf, now);
    assert!(
        node_a.poll_transmit().is_none(),
        "a cookie reply confirms our IP to a peer that may not know it"
    );
    // ...a cookie for a peer that may use UDP...
    let from_b = initiation(&m.b.key, &a_public);
    node_a.handle_datagram(&m.b.addr, &from_b, &mut m.buf, now);
    let cookie = node_a.poll_transmit().expect("a cookie for b");
    assert_eq!(message_type(&cookie.payload), Some(3));
    // ...and the I2P handshake is answered at once.
    let over_i2p = initiation(&hidden.key, &a_public);
    node_a.handle_datagram(&PeerAddr::I2p(hidden_dest), &over_i2p, &mut m.buf, now);
    let response = node_a
        .poll_transmit()
        .expect("an I2P handshake is not held up");
    assert_eq!(response.to, PeerAddr::I2p(hidden_dest));
    assert_eq!(message_type(&response.payload), Some(2));
    assert!(node_a.counters().rate_limited > 0);
}

/// I2P RAW datagrams name no sender. One that decrypts for a peer allowed
/// I2P is that peer's, and is answered at its configured destination; one
/// that decrypts for a peer not allowed I2P, or does not decrypt, is
/// dropped and counted.
#[test]
fn unattributed_datagrams_belong_to_the_peer_they_decrypt_for() {
    let raw = PeerAddr::Unattributed(TransportKind::I2p);
    let (mut m, a_dest) = mesh_with_a_anonymous_to_b(None);
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    let datagram = data_message(&mut m.node_a, &ping);
    assert!(matches!(
        m.node_b
            .handle_datagram(&raw, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::ToTun(_)
    ));
    let reply = ipv6_echo(m.b.mesh(), m.a.mesh(), 8);
    let mut out = vec![0u8; BUFFER_SIZE];
    match m
        .node_b
        .handle_tun_packet(&reply, limits, &mut out, Instant::now())
    {
        FromTun::Send { to, .. } => assert_eq!(to, a_dest),
        other => panic!("unexpected {other:?}"),
    }
    assert!(m.node_b.status(Instant::now()).peers[0]
        .paths
        .iter()
        .all(|p| !p.address.contains("not named")));
    // Garbage over RAW: counted, nothing sent.
    let before = m.node_b.counters().bad_packet
        + m.node_b.status(Instant::now()).peers[0].counters.bad_packet;
    let mut forged = datagram.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(matches!(
        m.node_b
            .handle_datagram(&raw, &forged, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::BadPacket)
    ));
    let after = m.node_b.counters().bad_packet
        + m.node_b.status(Instant::now()).peers[0].counters.bad_packet;
    assert_eq!(after, before + 1);
    assert!(m.node_b.poll_transmit().is_none());

    // A peer that may not use I2P (it has no destination here) cannot
    // arrive that way, however well its traffic decrypts.
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let datagram = data_message(&mut m.node_a, &ping);
    assert!(matches!(
        m.node_b
            .handle_datagram(&raw, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::WrongPath)
    ));
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].counters.wrong_path,
        1
    );
}

/// The core in virtual time: boringtun's clock (mock_instant's, one per
/// thread) and the `now` handed in move together, from one timeout to the
/// next; an hour takes milliseconds. `cargo test -p veilmesh-core
/// --features test-clock`.
#[cfg(feature = "test-clock")]
mod virtual_time {
    use super::*;
    use mock_instant::MockClock;

    struct Sim {
        m: Mesh,
        start: Instant,
        elapsed: Duration,
        /// Datagrams on the wire, delivered at once: (towards B, bytes).
        in_flight: VecDeque<(bool, Vec<u8>)>,
        /// How many of the next datagrams towards A are lost.
        lose_to_a: usize,
        /// Packets written to B's TUN, with when.
        at_b: Vec<(Duration, Vec<u8>)>,
        steps: usize,
    }

    impl Sim {
        fn new(m: Mesh) -> Sim {
            Sim {
                m,
                start: Instant::now(),
                elapsed: Duration::ZERO,
                in_flight: VecDeque::new(),
                lose_to_a: 0,
                at_b: Vec::new(),
                steps: 0,
            }
        }

        fn now(&self) -> Instant {
            self.start + self.elapsed
        }

        fn advance_to(&mut self, at: Instant) {
            let step = at.saturating_duration_since(self.now());
            MockClock::advance(step);
            self.elapsed += step;
        }

        fn send_from_a(&mut self, packet: &[u8]) {
            let mut out = vec![0u8; BUFFER_SIZE];
            let now = self.now();
            if let FromTun::Send { datagram, .. } = self
                .m
                .node_a
                .handle_tun_packet(packet, limits, &mut out, now)
            {
                self.in_flight.push_back((true, datagram.to_vec()));
            }
        }

        fn deliver_all(&mut self) {
            loop {
                while let Some(t) = self.m.node_a.poll_transmit() {
                    self.in_flight.push_back((true, t.payload));
                }
                while let Some(t) = self.m.node_b.poll_transmit() {
                    self.in_flight.push_back((false, t.payload));
                }
                let Some((to_b, datagram)) = self.in_flight.pop_front() else {
                    return;
                };
                let now = self.now();
                if to_b {
                    let got = self.m.node_b.handle_datagram(
                        &self.m.a.addr,
                        &datagram,
                        &mut self.m.buf,
                        now,
                    );
                    if let FromNetwork::ToTun(packet) = got {
                        self.at_b.push((self.elapsed, packet.to_vec()));
                    }
                } else if self.lose_to_a > 0 {
                    self.lose_to_a -= 1;
                } else {
                    let _ = self.m.node_a.handle_datagram(
                        &self.m.b.addr,
                        &datagram,
                        &mut self.m.buf,
                        now,
                    );
                }
            }
        }

        /// Delivers, then jumps from timeout to timeout until `for_` has
        /// passed.
        fn run(&mut self, for_: Duration) {
            let until = self.now() + for_;
            loop {
                self.deliver_all();
                let next = self
                    .m
                    .node_a
                    .poll_timeout()
                    .at
                    .min(self.m.node_b.poll_timeout().at);
                if next > until {
                    self.advance_to(until);
                    return;
                }
                self.advance_to(next);
                let now = self.now();
                for node in [&mut self.m.node_a, &mut self.m.node_b] {
                    if node.poll_timeout().at <= now {
                        node.handle_timeout(now);
                    }
                }
                self.steps += 1;
                assert!(self.steps < 100_000, "timers spin at {:?}", self.elapsed);
            }
        }

        fn handshakes(&self) -> u64 {
            self.m.node_a.status(self.now()).peers[0]
                .counters
                .handshakes
        }
    }

    #[test]
    fn a_lost_handshake_response_is_retried_and_the_first_packet_arrives() {
        let mut sim = Sim::new(mesh());
        let ping = ipv6_echo(sim.m.a.mesh(), sim.m.b.mesh(), 56);
        sim.lose_to_a = 1;
        sim.send_from_a(&ping);
        sim.run(Duration::from_secs(10));
        let [(at, packet)] = &sim.at_b[..] else {
            panic!("{} packets at b", sim.at_b.len());
        };
        assert_eq!(packet, &ping);
        // REKEY_TIMEOUT (5 s, plus up to 1/3 s of jitter), seen at a tick.
        assert!(
            *at >= Duration::from_secs(5) && *at < Duration::from_secs(7),
            "{at:?}"
        );
        assert_eq!(sim.handshakes(), 1);
    }

    #[test]
    fn a_session_unused_past_its_lifetime_is_made_again_by_the_next_packet() {
        let mut sim = Sim::new(mesh());
        let ping = ipv6_echo(sim.m.a.mesh(), sim.m.b.mesh(), 56);
        sim.send_from_a(&ping);
        sim.run(Duration::from_secs(1));
        assert_eq!((sim.at_b.len(), sim.handshakes()), (1, 1));
        // REJECT_AFTER_TIME is 180 s: the keys may no longer be used.
        sim.run(Duration::from_secs(200));
        sim.send_from_a(&ping);
        sim.run(Duration::from_secs(1));
        assert_eq!((sim.at_b.len(), sim.handshakes()), (2, 2));
    }

    #[test]
    fn a_keepalive_peer_keeps_its_session_for_an_hour() {
        let a = Side::new("198.18.0.1:51820");
        let b = Side::new("198.18.0.2:51820");
        let mut to_b = b.as_peer("b", true, &[]);
        to_b.persistent_keepalive = Some(25);
        let now = Instant::now();
        let node_a = Node::new(&a.key, vec![to_b], now).unwrap();
        let node_b = Node::new(&b.key, vec![a.as_peer("a", false, &[])], now).unwrap();
        let mut sim = Sim::new(Mesh {
            a,
            b,
            node_a,
            node_b,
            buf: vec![0u8; BUFFER_SIZE],
        });
        for _ in 0..60 {
            sim.run(Duration::from_secs(60));
            let b_sees_a = &sim.m.node_b.status(sim.now()).peers[0];
            let since = b_sees_a.seconds_since_handshake.expect("a session");
            // Rekeyed every REKEY_AFTER_TIME (120 s) while keepalives flow.
            assert!(
                since <= 150,
                "{since} s since the handshake at {:?}",
                sim.elapsed
            );
        }
        let handshakes = sim.handshakes();
        assert!((25..=35).contains(&handshakes), "{handshakes}");
        // The nodes tick together at 4 Hz: about one step per tick, and a
        // few for probes, not a busy loop.
        assert!(sim.steps <= 4 * 3600 + 400, "{} steps", sim.steps);
    }
}

/// The test's side of `handle_tun_batch`: runs and ICMP errors, kept.
#[derive(Default)]
struct KeptRuns {
    runs: Vec<(PeerAddr, Vec<u8>, usize, usize)>,
    replies: Vec<Vec<u8>>,
}

impl batch::TunBatchOutput for KeptRuns {
    fn limits(&self, to: &PeerAddr) -> DatagramLimits {
        limits(to)
    }

    fn send(&mut self, run: batch::Run<'_>) -> bool {
        self.runs
            .push((run.to, run.datagrams.to_vec(), run.segment, run.count));
        true
    }

    fn reply(&mut self, packet: &[u8]) {
        self.replies.push(packet.to_vec());
    }
}

/// The test's side of `handle_datagram_batch`: holds `room` packets.
struct KeptPackets {
    packets: Vec<Vec<u8>>,
    room: usize,
    space: Vec<u8>,
}

impl batch::TunSink for KeptPackets {
    fn space(&mut self) -> Option<&mut [u8]> {
        (self.packets.len() < self.room).then_some(&mut self.space[..])
    }

    fn commit(&mut self, len: usize) {
        self.packets.push(self.space[..len].to_vec());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A batch gives what the packets one by one give: runs hold the
    /// same datagrams (sizes, order, path; equal sizes but the last in
    /// each run), they decrypt at the peer to the same packets, and a
    /// packet nobody owns gets its ICMP error, in batches and with a sink
    /// that fills up anywhere.
    #[test]
    fn a_batch_gives_what_the_packets_one_by_one_give(
        sizes in proptest::collection::vec((0usize..1300, 0u8..10), 1..150),
        room in 1usize..9,
    ) {
        let now = Instant::now();
        let nobody: Ipv6Addr = "fd60:db4d:ddb5::1".parse().unwrap();
        let make_packets = |m: &Mesh| -> Vec<Vec<u8>> {
            sizes.iter().map(|&(size, kind)| match kind {
                0 => ipv6_echo(m.a.mesh(), nobody, size),
                1..=3 => ipv4_udp(Ipv4Addr::new(10, 10, 1, 1), Ipv4Addr::new(192, 168, 50, 7), size, true),
                _ => ipv6_echo(m.a.mesh(), m.b.mesh(), size),
            }).collect()
        };
        // One by one, on a mesh of its own: the datagram sizes.
        let mut single = mesh();
        let hello = ipv6_echo(single.a.mesh(), single.b.mesh(), 8);
        send_from_a(&mut single, &hello);
        let mut one_by_one = Vec::new();
        let mut out = vec![0u8; BUFFER_SIZE];
        for packet in make_packets(&single) {
            match single.node_a.handle_tun_packet(&packet, limits, &mut out, now) {
                FromTun::Send { datagram, .. } => one_by_one.push(datagram.len()),
                FromTun::Reply(_) => one_by_one.push(0),
                other => panic!("unexpected {other:?}"),
            }
        }
        // As batches of up to 17, the open run carried across batches.
        let mut m = mesh();
        let hello = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
        send_from_a(&mut m, &hello);
        let packets = make_packets(&m);
        let mut tx = batch::TxBatch::new();
        let mut output = KeptRuns::default();
        for chunk in packets.chunks(17) {
            m.node_a.handle_tun_batch(chunk.iter().map(Vec::as_slice), &mut tx, &mut output, now);
        }
        m.node_a.flush_tun_batch(&mut tx, &mut output);
        let mut datagrams = Vec::new();
        for (to, bytes, segment, count) in &output.runs {
            prop_assert_eq!(to, &m.b.addr);
            let run: Vec<&[u8]> = bytes.chunks(*segment).collect();
            prop_assert_eq!(run.len(), *count);
            prop_assert!(run[..run.len() - 1].iter().all(|d| d.len() == *segment));
            datagrams.extend(run.into_iter().map(<[u8]>::to_vec));
        }
        let sealed: Vec<usize> = one_by_one.iter().copied().filter(|&n| n > 0).collect();
        prop_assert_eq!(datagrams.iter().map(Vec::len).collect::<Vec<_>>(), sealed);
        prop_assert_eq!(output.replies.len(), one_by_one.iter().filter(|&&n| n == 0).count());
        // At b, in receive calls of 5, through a sink of `room` packets.
        let mut sink = KeptPackets { packets: Vec::new(), room, space: vec![0u8; BUFFER_SIZE] };
        let mut delivered = Vec::new();
        for call in datagrams.chunks(5) {
            let mut call = call.iter().map(Vec::as_slice);
            while !m.node_b.handle_datagram_batch(&m.a.addr, &mut call, &mut sink, now) {
                delivered.append(&mut sink.packets);
            }
            delivered.append(&mut sink.packets);
        }
        let owned: Vec<Vec<u8>> = packets.into_iter().zip(&one_by_one).filter(|(_, &n)| n > 0).map(|(p, _)| p).collect();
        prop_assert_eq!(delivered, owned);
    }
}

/// An IPv6 TCP segment with only `flags` set (checksum not computed: the
/// core does not check it).
fn ipv6_tcp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&20u16.to_be_bytes());
    p[6] = 6;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&sport.to_be_bytes());
    p[42..44].copy_from_slice(&dport.to_be_bytes());
    p[52] = 5 << 4;
    p[53] = flags;
    p
}

/// b accepts only ping and TCP 8080 from a: a connection to 8081 is
/// refused, counted and answered with "administratively prohibited"
/// through the tunnel; a connection b opens to a gets its answers.
#[test]
fn accept_rules_refuse_what_they_do_not_name_and_answer_it() {
    let mut m = mesh();
    let mut a_at_b = m.a.as_peer("a", false, &["10.10.1.1/32"]);
    a_at_b.accept = Some(vec!["icmp".parse().unwrap(), "tcp/8080".parse().unwrap()]);
    m.node_b.reconfigure(vec![a_at_b], Instant::now()).unwrap();
    let (a_mesh, b_mesh) = (m.a.mesh(), m.b.mesh());
    let (_, at_b) = send_from_a(&mut m, &ipv6_echo(a_mesh, b_mesh, 8));
    assert_eq!(at_b.len(), 1, "ping passes");
    let (_, at_b) = send_from_a(&mut m, &ipv6_tcp(a_mesh, b_mesh, 40000, 8080, 0x02));
    assert_eq!(at_b.len(), 1, "tcp/8080 passes");
    let (at_a, at_b) = send_from_a(&mut m, &ipv6_tcp(a_mesh, b_mesh, 40001, 8081, 0x02));
    assert!(at_b.is_empty(), "tcp/8081 refused");
    assert_eq!(at_a.len(), 1, "a hears why");
    let answer = &at_a[0];
    assert_eq!(
        (answer[6], answer[40], answer[41]),
        (58, 1, 1),
        "ICMPv6 admin-prohibited"
    );
    assert_eq!(&answer[8..24], &b_mesh.octets(), "from the address a tried");
    let b_status = m.node_b.status(Instant::now());
    assert_eq!(b_status.peers[0].counters.not_accepted, 1);

    // b opens a connection to a's 8081: a's answer passes b's rules.
    let mut out = vec![0u8; BUFFER_SIZE];
    let syn = ipv6_tcp(b_mesh, a_mesh, 50000, 8081, 0x02);
    let FromTun::Send { datagram, .. } =
        m.node_b
            .handle_tun_packet(&syn, limits, &mut out, Instant::now())
    else {
        panic!("b's SYN goes out");
    };
    let datagram = datagram.to_vec();
    let (at_a, _) = pump(&mut m, Some((false, datagram)));
    assert_eq!(at_a.len(), 1);
    let (_, at_b) = send_from_a(&mut m, &ipv6_tcp(a_mesh, b_mesh, 8081, 50000, 0x12));
    assert_eq!(at_b.len(), 1, "the SYN-ACK of b's own connection passes");
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0]
            .counters
            .not_accepted,
        1
    );
}

/// `veilmesh ping`: probes over the path in use (or all), answers as events.
#[test]
fn ping_probes_the_path_and_reports_the_answer() {
    let mut m = mesh();
    let (a_mesh, b_mesh) = (m.a.mesh(), m.b.mesh());
    send_from_a(&mut m, &ipv6_echo(a_mesh, b_mesh, 8));
    let b = m.node_a.find_peer("b").expect("by name");
    assert_eq!(m.node_a.find_peer(&b_mesh.to_string()), Some(b));
    assert_eq!(
        m.node_a.find_peer(&m.b.key.public_key().to_base64()),
        Some(b)
    );
    assert_eq!(m.node_a.find_peer("nobody"), None);
    while m.node_a.poll_event().is_some() {}
    let probes = m.node_a.ping(b, true, Instant::now());
    assert_eq!(probes.len(), 1, "{probes:?}");
    assert_eq!(probes[0].to, m.b.addr);
    pump(&mut m, None);
    let mut answered = Vec::new();
    while let Some(event) = m.node_a.poll_event() {
        if let Event::PingAnswered { probe, rtt } = event {
            answered.push(probe);
            assert!(rtt < Duration::from_secs(1));
        }
    }
    assert_eq!(answered, vec![probes[0].probe]);
}

/// A uses B as its exit (0.0.0.0/0 and ::/0) and reaches C's site
/// subnet through C: the longest prefix wins, mesh addresses never go to
/// the exit, and the exit may send from any address but those.
#[test]
fn an_exit_carries_what_no_longer_prefix_claims() {
    let now = Instant::now();
    let a = Side::new("198.18.0.1:51820");
    let b = Side::new("198.18.0.2:51820");
    let c = Side::new("198.18.0.3:51820");
    let node_a = Node::new(
        &a.key,
        vec![
            b.as_peer("b", true, &["0.0.0.0/0", "::/0"]),
            c.as_peer("c", false, &["192.168.60.0/24"]),
        ],
        now,
    )
    .unwrap();
    let node_b = Node::new(&b.key, vec![a.as_peer("a", false, &["10.10.1.1/32"])], now).unwrap();
    let mut m = Mesh {
        a,
        b,
        node_a,
        node_b,
        buf: vec![0u8; BUFFER_SIZE],
    };
    let a_v4 = Ipv4Addr::new(10, 10, 1, 1);
    let out_there = ipv4_udp(a_v4, Ipv4Addr::new(203, 0, 113, 5), 100, true);
    let (_, at_b) = send_from_a(&mut m, &out_there);
    assert_eq!(at_b, vec![out_there], "the internet goes through the exit");

    let mut out = vec![0u8; BUFFER_SIZE];
    let to_site = ipv4_udp(a_v4, Ipv4Addr::new(192, 168, 60, 1), 100, true);
    assert!(
        matches!(
            m.node_a.handle_tun_packet(&to_site, limits, &mut out, now),
            FromTun::Reply(_)
        ),
        "C's subnet goes to C (which has no path), not to the exit"
    );
    let nobody: Ipv6Addr = "fd60:db4d:ddb5::1234".parse().unwrap();
    let to_stranger = ipv6_echo(m.a.mesh(), nobody, 8);
    m.node_a
        .handle_tun_packet(&to_stranger, limits, &mut out, now);
    assert_eq!(
        m.node_a.counters().no_route,
        1,
        "no mesh address via an exit"
    );

    // The exit answers from the internet; it may not speak for C's
    // subnet nor for a mesh address.
    let sources = [
        (Ipv4Addr::new(203, 0, 113, 5).into(), true),
        (Ipv4Addr::new(192, 168, 60, 1).into(), false),
    ];
    for (src, accepted) in sources {
        let IpAddr::V4(src) = src else { unreachable!() };
        let answer = ipv4_udp(src, a_v4, 60, true);
        let datagram = data_message(&mut m.node_b, &answer);
        let got = m
            .node_a
            .handle_datagram(&m.b.addr, &datagram, &mut m.buf, now);
        assert_eq!(matches!(got, FromNetwork::ToTun(_)), accepted, "from {src}");
    }
    let spoofed_mesh = ipv6_echo(nobody, m.a.mesh(), 8);
    let datagram = data_message(&mut m.node_b, &spoofed_mesh);
    let got = m
        .node_a
        .handle_datagram(&m.b.addr, &datagram, &mut m.buf, now);
    assert!(matches!(got, FromNetwork::Dropped(DropReason::Spoofed)));
}

/// a and b cannot reach each other over UDP; both reach r, which relays.
struct RelaySim {
    nodes: Vec<Node>,
    udp: Vec<SocketAddr>,
    now: Instant,
    buf: Vec<u8>,
    delivered_to_tun: Vec<usize>,
}

impl RelaySim {
    /// `relay_service`: whether r offers to relay.
    fn new(relay_service: bool) -> RelaySim {
        let now = Instant::now();
        let keys: Vec<PrivateKey> = ["relay sim a", "relay sim b", "relay sim r"]
            .iter()
            .map(|s| seeded_key(s.as_bytes()))
            .collect();
        let udp: Vec<SocketAddr> = ["192.0.2.1:1", "198.51.100.1:1", "203.0.113.1:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let names = ["a", "b", "r"];
        let spec = |i: usize, relays: &[usize]| {
            let key = keys[i].public_key();
            let mut paths = vec![PeerAddr::Udp(udp[i])];
            paths.extend(relays.iter().filter(|&&r| r != i).map(|&r| {
                PeerAddr::Relay(RelayAddr {
                    relay: keys[r].public_key().0,
                    peer: key.0,
                })
            }));
            PeerSpec {
                name: names[i].into(),
                public_key: key,
                paths,
                allowed_ips: vec![],
                persistent_keepalive: None,
                transports: vec![TransportKind::Udp, TransportKind::Relay],
                allowed_destinations: None,
                accept: None,
                relay: relays.contains(&i),
            }
        };
        let peers_of = |me: usize, relays: &[usize]| -> Vec<PeerSpec> {
            (0..3)
                .filter(|&i| i != me)
                .map(|i| spec(i, relays))
                .collect()
        };
        let mut nodes = vec![
            Node::new(&keys[0], peers_of(0, &[2]), now).unwrap(),
            Node::new(&keys[1], peers_of(1, &[2]), now).unwrap(),
            Node::new(&keys[2], peers_of(2, &[]), now).unwrap(),
        ];
        nodes[2].set_relay_service(relay_service.then_some(DEFAULT_RELAY_RATE));
        RelaySim {
            nodes,
            udp,
            now,
            buf: vec![0u8; BUFFER_SIZE],
            delivered_to_tun: vec![0; 3],
        }
    }

    /// A ping from a to b's mesh address, delivered.
    fn ping(&mut self) {
        let src = self.nodes[0].mesh_address();
        let dst = self.nodes[1].mesh_address();
        let mut out = vec![0u8; BUFFER_SIZE];
        let packet = ipv6_echo(src, dst, 8);
        match self.nodes[0].handle_tun_packet(&packet, limits, &mut out, self.now) {
            FromTun::Send { to, datagram } => {
                let datagram = datagram.to_vec();
                self.deliver(0, &to, &datagram, None);
            }
            FromTun::Done(_) => {}
            FromTun::Reply(_) => panic!("unreachable"),
        }
        self.run(Duration::from_millis(100));
    }

    /// `count` pings from a to b at this instant, then the relay's
    /// forwards delivered; how many reached b.
    fn ping_burst(&mut self, count: usize) -> usize {
        let before = self.delivered_to_tun[1];
        let src = self.nodes[0].mesh_address();
        let dst = self.nodes[1].mesh_address();
        let mut out = vec![0u8; BUFFER_SIZE];
        let packet = ipv6_echo(src, dst, 8);
        for _ in 0..count {
            if let FromTun::Send { to, datagram } =
                self.nodes[0].handle_tun_packet(&packet, limits, &mut out, self.now)
            {
                let datagram = datagram.to_vec();
                self.deliver(0, &to, &datagram, None);
            }
        }
        for i in 0..3 {
            while let Some(t) = self.nodes[i].poll_transmit() {
                self.deliver(i, &t.to, &t.payload, t.ttl);
            }
        }
        self.delivered_to_tun[1] - before
    }

    fn path(&self, node: usize, peer: &str) -> Option<String> {
        let status = self.nodes[node].status(self.now);
        status.peers.into_iter().find(|p| p.name == peer)?.path
    }
}

impl Sim for RelaySim {
    fn nodes(&mut self) -> &mut [Node] {
        &mut self.nodes
    }
    fn clock(&mut self) -> &mut Instant {
        &mut self.now
    }
    fn deliver(&mut self, sender: usize, to: &PeerAddr, payload: &[u8], _ttl: Option<u8>) {
        let PeerAddr::Udp(sa) = to else {
            panic!("only UDP leaves a node, not {to}");
        };
        let Some(receiver) = self.udp.iter().position(|u| u == sa) else {
            return;
        };
        // The direct path between a and b is blocked.
        if sender + receiver == 1 {
            return;
        }
        let from = PeerAddr::Udp(self.udp[sender]);
        let now = self.now;
        if let FromNetwork::ToTun(_) =
            self.nodes[receiver].handle_datagram(&from, payload, &mut self.buf, now)
        {
            self.delivered_to_tun[receiver] += 1;
        }
    }
}

/// a and b, each using the path through r to the other.
fn relayed_pair() -> RelaySim {
    let mut sim = RelaySim::new(true);
    sim.ping();
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.path(0, "b").as_deref(), Some("relay via r"));
    assert_eq!(sim.path(1, "a").as_deref(), Some("relay via r"));
    sim
}

#[test]
fn peers_that_cannot_reach_each_other_talk_through_a_relay() {
    let mut sim = relayed_pair();
    let before = sim.delivered_to_tun[1];
    sim.ping();
    assert_eq!(sim.delivered_to_tun[1], before + 1, "the ping arrived");
    let relay = sim.nodes[2].counters();
    assert!(relay.relayed > 0 && relay.relay_refused == 0, "{relay:?}");
    // The relay saw a's and b's session only as opaque datagrams: it
    // wrote nothing of theirs to its own TUN.
    assert_eq!(sim.delivered_to_tun[2], 0);
    let paths = sim.nodes[0].status(sim.now).peers[0].paths.clone();
    let relay_path = paths.iter().find(|p| p.transport == "relay").unwrap();
    assert_eq!(
        (relay_path.state.as_str(), relay_path.address.as_str()),
        ("live", "relay via r")
    );
    assert!(relay_path.rtt_ms.is_some());
}

#[test]
fn a_relay_forwards_at_most_its_rate_for_each_peer() {
    let mut sim = relayed_pair();
    // 10 KB/s, with a burst of 64 KB.
    sim.nodes[2].set_relay_service(Some(10_000));
    let refused = sim.nodes[2].counters().relay_refused;
    let burst = sim.ping_burst(2000);
    let refused = sim.nodes[2].counters().relay_refused - refused;
    assert!(burst > 100 && burst < 2000, "{burst}");
    assert_eq!(burst as u64 + refused, 2000);
    // A second later, a second's worth: 10 KB of the burst's 64 KB.
    sim.now += Duration::from_secs(1);
    let next = sim.ping_burst(2000) as f64;
    let expected = burst as f64 * 10_000.0 / 65_536.0;
    assert!(
        (next - expected).abs() <= 2.0,
        "{next} after 1 s, expected {expected:.1}"
    );
}

#[test]
fn a_node_that_offers_no_relay_forwards_nothing() {
    let mut sim = RelaySim::new(false);
    sim.ping();
    sim.run(Duration::from_secs(3));
    let before = sim.delivered_to_tun[1];
    sim.ping();
    assert_eq!(sim.delivered_to_tun[1], before);
    let relay = sim.nodes[2].counters();
    assert!(relay.relayed == 0 && relay.relay_refused > 0, "{relay:?}");
}
