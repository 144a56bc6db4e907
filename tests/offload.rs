//! The batched data path end to end: TCP over the mesh delivers exactly
//! the bytes sent (count and SHA-256), both directions, with IPv4 and IPv6
//! inside, with segmentation offload (TUN TSO/GRO, UDP GSO/GRO) as the
//! daemons find it;
//! iperf3 runs over each too. scripts/test.sh runs it again with
//! VEILMESH_OFFLOAD=off in the environment, which the daemons inherit.
//! Needs root.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use common::*;
use sha2::{Digest, Sha256};

/// Bytes each transfer moves: enough for many runs of 64 datagrams.
const BYTES: usize = 24 << 20;

/// Sends `BYTES` of a pseudo-random stream from `from` to `to`, where a
/// listener on `address` counts and hashes what arrives. Returns (bytes
/// and hash sent, bytes and hash received).
fn transfer(from: &Netns, to: &Netns, address: &str) -> ((usize, Vec<u8>), (usize, Vec<u8>)) {
    let bind = SocketAddr::new(address.parse().expect("an IP address"), 5299);
    let listener = to.within(move || TcpListener::bind(bind).expect("listen"));
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let (mut total, mut hash) = (0, Sha256::new());
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = stream.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n;
            hash.update(&buf[..n]);
        }
        (total, hash.finalize().to_vec())
    });
    let sent = from.within(move || {
        let mut stream = TcpStream::connect(bind).expect("connect");
        let (mut state, mut hash) = (0x9e37_79b9_7f4a_7c15u64, Sha256::new());
        let mut chunk = vec![0u8; 1 << 16];
        let mut left = BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            for byte in &mut chunk[..n] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            stream.write_all(&chunk[..n]).expect("write");
            hash.update(&chunk[..n]);
            left -= n;
        }
        stream.shutdown(Shutdown::Write).expect("shutdown");
        (BYTES, hash.finalize().to_vec())
    });
    (sent, receiver.join().expect("receiver"))
}

/// The same over an IPv6-only underlay: GSO and GRO on an IPv6 socket
/// path, no IPv4 address between the hosts at all.
#[test]
fn tcp_over_the_mesh_delivers_every_byte_over_an_ipv6_underlay() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Netns::new("o6-a"), Netns::new("o6-b"));
    veth(&a, "eth0", &b, "eth0");
    a.ip(&["addr", "add", "fd00:198:18::1/64", "dev", "eth0", "nodad"]);
    b.ip(&["addr", "add", "fd00:198:18::2/64", "dev", "eth0", "nodad"]);
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    fa.write_config("", &fb.peer_block("b", Some("[fd00:198:18::2]:51820"), &[]));
    fb.write_config("", &fa.peer_block("a", Some("[fd00:198:18::1]:51820"), &[]));
    let da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);
    let (a_mesh, b_mesh) = (fa.mesh().to_string(), fb.mesh().to_string());
    let (_, got, out) = a.ping6(&b_mesh, 3);
    assert!(got >= 2, "{out}");
    assert_eq!(
        da.peer("b").path.as_deref(),
        Some("udp [fd00:198:18::2]:51820")
    );
    for (from, to, dest, label) in [(&a, &b, &b_mesh, "a -> b"), (&b, &a, &a_mesh, "b -> a")] {
        let (sent, received) = transfer(from, to, dest);
        assert_eq!(received, sent, "{label}: bytes and SHA-256");
        println!("IPv6 underlay {label}: {} bytes, hashes equal", received.0);
    }
}

#[test]
fn tcp_over_the_mesh_delivers_every_byte_both_ways_over_ipv4_and_ipv6() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = veth_pair("of");
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    fa.write_config(
        "addresses = [\"10.77.0.1/24\"]",
        &fb.peer_block("b", Some("198.18.0.2:51820"), &["10.77.0.2/32"]),
    );
    fb.write_config(
        "addresses = [\"10.77.0.2/24\"]",
        &fa.peer_block("a", Some("198.18.0.1:51820"), &["10.77.0.1/32"]),
    );
    let da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);
    let b_mesh = fb.mesh().to_string();
    let (_, got, out) = a.ping6(&b_mesh, 3);
    assert!(got >= 2, "{out}");
    let offload = std::env::var("VEILMESH_OFFLOAD").unwrap_or_default();
    let udp = da
        .show()
        .transports
        .into_iter()
        .find(|t| t.starts_with("udp "))
        .unwrap_or_default();
    println!("offload setting {offload:?}: {udp}");
    if offload == "off" {
        assert!(!udp.contains("GSO") && !udp.contains("GRO"), "{udp}");
    }
    for address in ["10.77.0.2", b_mesh.as_str()] {
        let a_side = if address == b_mesh {
            fa.mesh().to_string()
        } else {
            "10.77.0.1".into()
        };
        for (from, to, dest, label) in [
            (&a, &b, address, "a -> b"),
            (&b, &a, a_side.as_str(), "b -> a"),
        ] {
            let (sent, received) = transfer(from, to, dest);
            assert_eq!(received, sent, "{label} to {dest}: bytes and SHA-256");
            println!("{label} to {dest}: {} bytes, hashes equal", received.0);
        }
        for reverse in [false, true] {
            let args: &[&str] = if reverse {
                &["-t", "2", "-R"]
            } else {
                &["-t", "2"]
            };
            let report = iperf_json(&a, &b, address, args)
                .unwrap_or_else(|e| panic!("iperf3 to {address} (reverse {reverse}): {e}"));
            let mbit = report["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e6;
            println!("iperf3 {address} reverse {reverse}: {mbit:.0} Mbit/s");
            assert!(mbit > 0.0, "{address}, reverse {reverse}");
        }
    }
    let peer = da.peer("b");
    assert_eq!(peer.counters.bad_packet, 0, "{:?}", peer.counters);
}
