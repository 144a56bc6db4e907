//! Per-peer accept rules between two real daemons. Needs root.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Serves `hello` to one connection on [address]:port, inside `ns`;
/// returns once listening.
fn serve_once(ns: &Netns, address: Ipv6Addr, port: u16) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = ns.within_background(move || {
        let listener = TcpListener::bind((address, port)).expect("listen");
        ready_tx.send(()).unwrap();
        listener.set_nonblocking(false).unwrap();
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.write_all(b"hello");
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    handle
}

/// Connects from inside `ns` and reads what the server says; the error
/// and how long it took to come, if it failed.
fn fetch(ns: &Netns, address: Ipv6Addr, port: u16) -> Result<String, (String, Duration)> {
    ns.within(move || {
        let started = Instant::now();
        let to = SocketAddr::from((address, port));
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .map_err(|e| (e.to_string(), started.elapsed()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| (e.to_string(), started.elapsed()))?;
        Ok(text)
    })
}

#[test]
fn a_peer_opens_only_what_its_accept_rules_name() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = veth_pair("acc");
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    fa.write_config("", &fb.peer_block("b", Some("198.18.0.2:51820"), &[]));
    let a_at_b =
        fa.peer_block("a", Some("198.18.0.1:51820"), &[]) + "accept = [\"icmp\", \"tcp/8080\"]\n";
    fb.write_config("", &a_at_b);
    let _da = Daemon::start(&a, &fa);
    let db = Daemon::start(&b, &fb);
    let (a_mesh, b_mesh) = (fa.mesh(), fb.mesh());

    let (sent, got, out) = a.ping6(&b_mesh.to_string(), 3);
    assert_eq!((sent, got), (3, 3), "ping is accepted:\n{out}");

    let server = serve_once(&b, b_mesh, 8080);
    assert_eq!(
        fetch(&a, b_mesh, 8080),
        Ok("hello".into()),
        "tcp/8080 is accepted"
    );
    server.join().unwrap();

    // 8081 listens but is not accepted: the connection fails at once
    // (ICMPv6 administratively prohibited), not after a timeout.
    let _listener = serve_once(&b, b_mesh, 8081);
    let (error, took) = fetch(&a, b_mesh, 8081).expect_err("tcp/8081 is refused");
    assert!(
        took < Duration::from_secs(3),
        "refused after {took:?} ({error}): no prohibited answer?"
    );
    println!("a -> b:8081 refused in {took:?}: {error}");

    // b opens a connection to a's 8081: the answers pass b's rules.
    let server = serve_once(&a, a_mesh, 8081);
    assert_eq!(
        fetch(&b, a_mesh, 8081),
        Ok("hello".into()),
        "a connection b opens gets its answers"
    );
    server.join().unwrap();

    // `veilmesh ping` by name, key and mesh address: the UDP path answers.
    for who in [String::from("a"), fa.public(), a_mesh.to_string()] {
        let (ok, out) = veilmesh_ping(&fb, &who, &["--all"]);
        assert!(
            ok && out.contains("pong from ") && out.contains(" over udp 198.18.0.1:51820 in "),
            "{out}"
        );
    }
    let (ok, out) = veilmesh_ping(&fb, "nobody", &[]);
    assert!(!ok && out.contains("no peer `nobody`"), "{out}");
    let (ok, out) = veilmesh_ping(&fb, "a", &["--json"]);
    let reports: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert!(ok && reports[0]["probes"][0]["transport"] == "udp", "{out}");

    let to_a = db.peer("a");
    assert_eq!(
        to_a.accept,
        Some(vec!["icmp".to_string(), "tcp/8080".to_string()])
    );
    assert!(to_a.counters.not_accepted >= 1, "{:?}", to_a.counters);
    let text = run(&[BIN, "show", "--socket", fb.socket.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("accepts: icmp, tcp/8080"), "{text}");
    assert!(text.contains(" not accepted"), "{text}");
    // One line says what carries the peer and why not the others.
    assert!(
        text.contains("  transports: udp in use (live, ")
            && text.contains("; tox not run by this node; i2p not run by this node"),
        "{text}"
    );
}
