//! Datagrams as a node receives them, most of them inside a live session:
//! the harness is a peer with a real Noise session to the node under test
//! (boringtun on its side), so what it encrypts reaches the peer-message
//! parser and the checks on decrypted packets. The first input byte picks
//! how the rest is sent:
//! 0: a raw datagram over UDP (garbage WireGuard messages);
//! 1: a peer message payload (probes, endpoint announcements, ...);
//! 2: any IP packet, encrypted;
//! 3: a raw datagram from a Tox key and an I2P destination.
#![no_main]

use std::net::Ipv6Addr;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use libfuzzer_sys::fuzz_target;
use veilmesh::core::{Node, PeerSpec, BUFFER_SIZE};
use veilmesh::identity::PrivateKey;
use veilmesh_transport::{I2pAddress, PeerAddr, ToxPublicKey, TransportKind};

const PEER_KEY: &str = "YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=";
const NODE_KEY: &str = "IDFyBYNPm6nH/SX3pN8nkWeMj7anzZ4N0xZN2UpIOHY=";

struct Harness {
    node: Node,
    peer: Tunn,
    peer_mesh: Ipv6Addr,
    node_mesh: Ipv6Addr,
    from: PeerAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Harness {
    fn new() -> Harness {
        let peer_key = PrivateKey::parse(PEER_KEY).unwrap();
        let node_key = PrivateKey::parse(NODE_KEY).unwrap();
        let config = PeerSpec {
            name: "fuzzer".into(),
            public_key: peer_key.public_key(),
            paths: vec![],
            allowed_ips: vec!["10.1.0.0/16".parse().unwrap()],
            persistent_keepalive: None,
            transports: TransportKind::ALL.to_vec(),
            allowed_destinations: None,
            accept: None,
            relay: false,
        };
        let node = Node::new(&node_key, vec![config], Instant::now()).unwrap();
        let peer = Tunn::new(
            peer_key.to_x25519(),
            node_key.public_key().to_x25519(),
            None,
            None,
            1,
            None,
        );
        Harness {
            node,
            peer,
            peer_mesh: peer_key.public_key().mesh_address(),
            node_mesh: node_key.public_key().mesh_address(),
            from: PeerAddr::Udp("198.18.0.9:51820".parse().unwrap()),
            buf: vec![0u8; BUFFER_SIZE],
            out: vec![0u8; BUFFER_SIZE],
        }
    }

    fn deliver(&mut self, from: &PeerAddr, datagram: &[u8]) {
        let _ = self
            .node
            .handle_datagram(from, datagram, &mut self.out, Instant::now());
    }

    /// The peer's side encrypts `packet`; a handshake first when its
    /// session is gone (boringtun rekeys after two minutes).
    fn send_in_session(&mut self, packet: &[u8]) {
        for _ in 0..3 {
            let datagram = match self.peer.encapsulate(packet, &mut self.buf) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => return,
            };
            let handshake = datagram.first() == Some(&1);
            let from = self.from.clone();
            self.deliver(&from, &datagram);
            if !handshake {
                return;
            }
            // The node's response completes the peer's side.
            while let Some(t) = self.node.poll_transmit() {
                let mut reply = vec![0u8; BUFFER_SIZE];
                let mut result = self.peer.decapsulate(None, &t.payload, &mut reply);
                while let TunnResult::WriteToNetwork(d) = result {
                    let d = d.to_vec();
                    self.deliver(&from, &d);
                    result = self.peer.decapsulate(None, &[], &mut reply);
                }
            }
        }
    }
}

static HARNESS: LazyLock<Mutex<Harness>> = LazyLock::new(|| Mutex::new(Harness::new()));

fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len().min(u16::MAX as usize) as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut h = HARNESS.lock().unwrap_or_else(|p| p.into_inner());
    match mode % 4 {
        0 => {
            let from = h.from.clone();
            h.deliver(&from, rest);
        }
        1 => {
            let packet = ipv6_packet(h.peer_mesh, h.node_mesh, 253, rest);
            h.send_in_session(&packet);
        }
        2 => h.send_in_session(rest),
        _ => {
            h.deliver(&PeerAddr::Tox(ToxPublicKey([3; 32])), rest);
            h.deliver(&PeerAddr::I2p(I2pAddress([4; 32])), rest);
        }
    }
    // Whatever the node wants to send in answer: drained, never kept.
    while h.node.poll_transmit().is_some() {}
    h.node.handle_timeout(Instant::now());
    while h.node.poll_transmit().is_some() {}
});
