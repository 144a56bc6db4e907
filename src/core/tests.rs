//! The core driven without sockets: two or three nodes exchange datagrams
//! in memory.

use std::net::{Ipv4Addr, SocketAddr};

use proptest::prelude::*;

use super::packet::tests::{ipv4_udp, ipv6_echo};
use super::*;

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

struct Side {
    key: PrivateKey,
    addr: PeerAddr,
}

impl Side {
    fn new(addr: &str) -> Side {
        Side {
            key: PrivateKey::generate().unwrap(),
            addr: udp(addr),
        }
    }
    fn mesh(&self) -> Ipv6Addr {
        self.key.public_key().mesh_address()
    }
    fn as_peer(&self, name: &str, endpoint: bool, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            public_key: self.key.public_key(),
            endpoint: match (&self.addr, endpoint) {
                (PeerAddr::Udp(sa), true) => Some(*sa),
                _ => None,
            },
            allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
            tox: None,
            i2p: None,
            transports: veilmesh_transport::TransportKind::ALL.to_vec(),
            allowed_destinations: None,
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
    let first = match m.node_a.handle_tun_packet(packet, limits, &mut out) {
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
    let datagram = match m.node_b.handle_tun_packet(&reply, limits, &mut out) {
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
    match m.node_a.handle_tun_packet(&ping, limits, &mut out) {
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
    let got = m.node_a.handle_tun_packet(&crafted, limits, &mut out);
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
    match m.node_b.handle_tun_packet(&ping, limits, &mut out) {
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
    match m.node_a.handle_tun_packet(&big6, limits, &mut out) {
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
    match m.node_a.handle_tun_packet(&big4, limits, &mut out) {
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
    let datagram =
        match m
            .node_a
            .handle_tun_packet(&ipv6_echo(m.a.mesh(), m.b.mesh(), 8), limits, &mut out)
        {
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
        m.node_a.handle_tun_packet(&rs, limits, &mut out),
        FromTun::Done(DropReason::Multicast)
    ));
    assert_eq!(m.node_a.counters().multicast_ignored, 1);
}

#[test]
fn timers_start_a_handshake_for_keepalive_peers() {
    let a = Side::new("198.18.0.1:51820");
    let b = Side::new("198.18.0.2:51820");
    let mut peer = b.as_peer("b", true, &[]);
    peer.persistent_keepalive = Some(1);
    let start = Instant::now();
    let mut node = Node::new(&a.key, vec![peer], start).unwrap();
    assert!(node.poll_timeout() <= start);
    // boringtun's keepalive timer reads its own clock; give it a second.
    std::thread::sleep(Duration::from_millis(1100));
    node.handle_timeout(start + Duration::from_millis(1100));
    let t = node.poll_transmit().expect("a handshake initiation");
    assert_eq!(t.to, b.addr);
    assert_eq!(message_type(&t.payload), Some(1));
    assert!(node.poll_timeout() > start + Duration::from_millis(1100));
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
        let _ = m.node_a.handle_tun_packet(&bytes, limits, &mut out);
    }
}

fn data_message_from_a(m: &mut Mesh, packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; BUFFER_SIZE];
    match m.node_a.handle_tun_packet(packet, limits, &mut out) {
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
    let datagram = data_message_from_a(&mut m, &ping);
    assert_eq!(message_type(&datagram), Some(DATA));
    assert!(matches!(
        m.node_b
            .handle_datagram(&m.a.addr, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::ToTun(_)
    ));
    // And the new peer is routed: its first packet starts a handshake.
    let ping_c = ipv6_echo(m.a.mesh(), c.mesh(), 8);
    let to_c = data_message_from_a(&mut m, &ping_c);
    assert_eq!(message_type(&to_c), Some(1));
}

#[test]
fn reconfigure_forgets_removed_peers_and_moves_routes() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let from_a = data_message_from_a(&mut m, &ping);
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
        m.node_a.handle_tun_packet(&old, limits, &mut out),
        FromTun::Reply(_)
    ));
    let new = ipv4_udp(
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(192, 168, 60, 2),
        8,
        true,
    );
    assert!(matches!(
        m.node_a.handle_tun_packet(&new, limits, &mut out),
        FromTun::Send { .. }
    ));
}

#[test]
fn over_tox_only_the_peers_own_tox_key_may_carry_its_session() {
    use veilmesh_transport::ToxPublicKey;
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    send_from_a(&mut m, &ping);
    let datagram = data_message_from_a(&mut m, &ping);
    // b has no Tox ID configured for a: a Tox friend cannot deliver a's traffic.
    let stranger = PeerAddr::Tox(ToxPublicKey([9; 32]));
    assert!(matches!(
        m.node_b
            .handle_datagram(&stranger, &datagram, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::WrongPath)
    ));
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
    restricted.i2p = Some(a_dest);
    restricted.transports = vec![TransportKind::I2p];
    m.node_b
        .reconfigure(vec![restricted], Instant::now())
        .unwrap();
    let path_of_a = |node: &Node| node.status(Instant::now()).peers[0].path.clone();
    assert_eq!(path_of_a(&m.node_b), Some(format!("i2p {a_dest}")));

    // Authentic traffic from a over UDP is dropped before decryption, and
    // b does not roam to UDP.
    let over_udp = data_message_from_a(&mut m, &ping);
    assert!(matches!(
        m.node_b
            .handle_datagram(&m.a.addr.clone(), &over_udp, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::WrongPath)
    ));
    // So is traffic from another I2P destination.
    let other_dest = PeerAddr::I2p(I2pAddress([6; 32]));
    assert!(matches!(
        m.node_b
            .handle_datagram(&other_dest, &over_udp, &mut m.buf, Instant::now()),
        FromNetwork::Dropped(DropReason::WrongPath)
    ));
    assert_eq!(
        m.node_b.status(Instant::now()).peers[0].counters.wrong_path,
        2
    );
    assert_eq!(path_of_a(&m.node_b), Some(format!("i2p {a_dest}")));

    // From a's own destination it is delivered, and b answers over I2P.
    let over_i2p = data_message_from_a(&mut m, &ping);
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
    match m.node_b.handle_tun_packet(&reply, limits, &mut out) {
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
    peer.i2p = Some(I2pAddress([1; 32]));
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
    now: Instant,
    buf: Vec<u8>,
    delivered_to_tun: [usize; 2],
}

impl PathSim {
    fn new() -> PathSim {
        use veilmesh_tox::ToxId;
        let now = Instant::now();
        let keys = [
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
        ];
        let tox_ids = [ToxId([1; 38]), ToxId([2; 38])];
        let udp: [SocketAddr; 2] = [
            "192.0.2.1:40000".parse().unwrap(),
            "198.51.100.1:40000".parse().unwrap(),
        ];
        let peer_config = |i: usize| PeerConfig {
            name: format!("n{i}"),
            public_key: keys[i].public_key(),
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
            tox: Some(tox_ids[i]),
            i2p: None,
            transports: vec![TransportKind::Udp, TransportKind::Tox],
            allowed_destinations: None,
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
            tox: [
                PeerAddr::Tox(tox_ids[0].public_key()),
                PeerAddr::Tox(tox_ids[1].public_key()),
            ],
            udp,
            udp_blocked: false,
            now,
            buf: vec![0u8; BUFFER_SIZE],
            delivered_to_tun: [0, 0],
        }
    }

    /// Where a datagram to `to` lands, and who it appears to come from.
    fn route(&self, sender: usize, to: &PeerAddr) -> Option<(usize, PeerAddr)> {
        let receiver = 1 - sender;
        match to {
            PeerAddr::Tox(_) if *to == self.tox[receiver] => {
                Some((receiver, self.tox[sender].clone()))
            }
            PeerAddr::Udp(sa) if *sa == self.udp[receiver] && !self.udp_blocked => {
                Some((receiver, PeerAddr::Udp(self.udp[sender])))
            }
            _ => None,
        }
    }

    fn deliver(&mut self, sender: usize, to: &PeerAddr, payload: &[u8]) {
        if let Some((receiver, from)) = self.route(sender, to) {
            let now = self.now;
            if let FromNetwork::ToTun(_) =
                self.nodes[receiver].handle_datagram(&from, payload, &mut self.buf, now)
            {
                self.delivered_to_tun[receiver] += 1;
            }
        }
    }

    /// Runs timers and delivers everything sent, for `duration`.
    fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.now += Duration::from_millis(50);
            for i in 0..2 {
                let now = self.now;
                self.nodes[i].handle_timeout(now);
            }
            for _ in 0..100 {
                let mut moved = false;
                for i in 0..2 {
                    while let Some(t) = self.nodes[i].poll_transmit() {
                        moved = true;
                        self.deliver(i, &t.to, &t.payload);
                    }
                }
                if !moved {
                    break;
                }
            }
        }
    }

    /// A ping from node 0 to node 1's mesh address; returns the path used.
    fn ping(&mut self) -> Option<PeerAddr> {
        let src = self.nodes[0].mesh_address();
        let dst = self.nodes[1].mesh_address();
        let mut out = vec![0u8; BUFFER_SIZE];
        let (to, datagram) =
            match self.nodes[0].handle_tun_packet(&ipv6_echo(src, dst, 8), limits, &mut out) {
                FromTun::Send { to, datagram } => (to, datagram.to_vec()),
                _ => return None,
            };
        self.deliver(0, &to, &datagram);
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

#[test]
fn endpoints_are_never_announced_to_a_peer_restricted_from_udp() {
    let mut sim = PathSim::new();
    // Node 0 allows node 1 only over Tox.
    let mut restricted = sim.nodes[0].peers[0].as_ref().unwrap().config.clone();
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
        m.node_a.handle_tun_packet(&packet, limits, &mut out),
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

/// Runs A's timers at `at` and hands what A sends to B; B's answers are
/// lost (its router still sends them to where A was).
fn a_talks_into_the_void(m: &mut Mesh, at: Instant) {
    m.node_a.handle_timeout(at);
    while let Some(t) = m.node_a.poll_transmit() {
        m.node_b
            .handle_datagram(&m.a.addr, &t.payload, &mut m.buf, at);
    }
    while m.node_b.poll_transmit().is_some() {}
}

#[test]
fn a_peer_silent_after_we_moved_is_asked_once_to_renew_and_does_not_ask_back() {
    let (mut m, t0) = mesh_after_a_moved();
    for s in 0..10 {
        a_talks_into_the_void(&mut m, t0 + Duration::from_secs(s));
        assert_eq!(
            m.node_b.poll_renewal(),
            None,
            "asked before the grace ran out ({s} s)"
        );
    }
    a_talks_into_the_void(&mut m, t0 + paths::RENEW_GRACE);
    assert_eq!(m.node_b.poll_renewal(), Some(TransportKind::Udp));
    assert_eq!(m.node_b.poll_renewal(), None);
    // Asking goes on, but the peer renews once per cooldown.
    for s in 11..20 {
        a_talks_into_the_void(&mut m, t0 + Duration::from_secs(s));
    }
    assert_eq!(m.node_b.poll_renewal(), None);

    // B's renewal answers A's request: B contacts A but asks nothing back,
    // even while A's answers are lost too.
    let t1 = t0 + Duration::from_secs(20);
    m.node_b.transport_rehomed(TransportKind::Udp, t1);
    for s in 0..30 {
        let at = t1 + Duration::from_secs(s);
        m.node_b.handle_timeout(at);
        let mut sent = 0;
        while let Some(t) = m.node_b.poll_transmit() {
            m.node_a
                .handle_datagram(&m.b.addr, &t.payload, &mut m.buf, at);
            sent += 1;
        }
        assert!(s > 0 || sent > 0, "b did not contact a at once");
        while m.node_a.poll_transmit().is_some() {}
        assert_eq!(m.node_a.poll_renewal(), None);
    }
}

#[test]
fn a_peer_heard_after_we_moved_is_not_asked_to_renew() {
    let (mut m, t0) = mesh_after_a_moved();
    m.node_a.handle_timeout(t0);
    pump(&mut m, None);
    for s in 1..=70 {
        a_talks_into_the_void(&mut m, t0 + Duration::from_secs(s));
    }
    assert_eq!(m.node_b.poll_renewal(), None);
    assert_eq!(m.node_a.poll_renewal(), None);
}

#[test]
fn with_no_peer_getting_through_after_a_move_we_renew_our_own_presence_once() {
    let (mut m, t0) = mesh_after_a_moved();
    let deadline = paths::RENEW_GRACE + paths::RENEW_ASK_WINDOW;
    for s in 0..deadline.as_secs() {
        a_talks_into_the_void(&mut m, t0 + Duration::from_secs(s));
        assert_eq!(
            m.node_a.poll_renewal(),
            None,
            "renewed ourselves early ({s} s)"
        );
    }
    a_talks_into_the_void(&mut m, t0 + deadline);
    assert_eq!(m.node_a.poll_renewal(), Some(TransportKind::Udp));
    // The renewed presence fares no better: no renewing in a loop.
    let t1 = t0 + deadline + Duration::from_secs(30);
    m.node_a.transport_rehomed(TransportKind::Udp, t1);
    for s in 0..2 * deadline.as_secs() {
        a_talks_into_the_void(&mut m, t1 + Duration::from_secs(s));
    }
    assert_eq!(m.node_a.poll_renewal(), None);
}

#[test]
fn a_peer_that_keeps_initiating_although_answered_makes_us_renew() {
    let mut m = mesh();
    let ping = ipv6_echo(m.a.mesh(), m.b.mesh(), 8);
    let mut out = vec![0u8; BUFFER_SIZE];
    for round in 1..=REPEATED_INITIATIONS {
        // A fresh node each time: a new initiation, as after A's retries.
        let b_config = m.b.as_peer("b", true, &["192.168.50.0/24"]);
        m.node_a = Node::new(&m.a.key, vec![b_config], Instant::now()).unwrap();
        let FromTun::Send { datagram, .. } = m.node_a.handle_tun_packet(&ping, limits, &mut out)
        else {
            panic!("no initiation");
        };
        let got = m
            .node_b
            .handle_datagram(&m.a.addr, datagram, &mut m.buf, Instant::now());
        assert!(matches!(got, FromNetwork::Consumed));
        // B answers; the answer is lost.
        assert!(m.node_b.poll_transmit().is_some());
        while m.node_b.poll_transmit().is_some() {}
        let expected = (round == REPEATED_INITIATIONS).then_some(TransportKind::Udp);
        assert_eq!(m.node_b.poll_renewal(), expected, "round {round}");
    }
}
