//! End-to-end: real daemons, real TUN devices, real UDP, in network
//! namespaces linked by a bridge. Needs root.
//!
//! ```text
//!              br (198.18.0.0/24)
//!     ┌─────────┬─────┴───┬──────────┐
//!     a .1      b .2      c .3       e .5 (stranger: knows a, a does not know it)
//!               │ 192.168.50.1
//!               lan .2  (site behind b)
//! ```

mod common;

use std::time::Duration;

use common::*;

#[test]
fn mesh_of_three_with_site_to_site_and_cryptokey_routing() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let mut br = Bridge::new("br");
    let (a, b, c, e) = (
        Netns::new("a"),
        Netns::new("b"),
        Netns::new("c"),
        Netns::new("e"),
    );
    let lan = Netns::new("lan");
    br.attach(&a, "198.18.0.1/24");
    br.attach(&b, "198.18.0.2/24");
    br.attach(&c, "198.18.0.3/24");
    br.attach(&e, "198.18.0.5/24");
    veth(&b, "lan0", &lan, "eth0");
    b.ip(&["addr", "add", "192.168.50.1/24", "dev", "lan0"]);
    b.sysctl("net.ipv4.ip_forward", "1");
    lan.ip(&["addr", "add", "192.168.50.2/24", "dev", "eth0"]);
    lan.ip(&["route", "add", "default", "via", "192.168.50.1"]);

    let (fa, fb, fc, fe) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
        NodeFiles::new(dir.path(), "c"),
        NodeFiles::new(dir.path(), "e"),
    );
    // a's TUN takes 1500-byte packets so the path MTU (1440) is exceeded.
    fa.write_config(
        "addresses = [\"10.10.1.1/24\"]\nmtu = 1500",
        &(fb.peer_block(
            "b",
            Some("198.18.0.2:51820"),
            &["192.168.50.0/24", "10.10.1.2/32"],
        ) + &fc.peer_block("c", Some("198.18.0.3:51820"), &[])),
    );
    fb.write_config(
        "addresses = [\"10.10.1.2/24\"]",
        &(fa.peer_block("a", Some("198.18.0.1:51820"), &["10.10.1.1/32"])
            + &fc.peer_block("c", Some("198.18.0.3:51820"), &[])),
    );
    // c learns a's and b's endpoints when they reach it (roaming).
    fc.write_config(
        "",
        &(fa.peer_block("a", None, &[]) + &fb.peer_block("b", None, &[])),
    );
    fe.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));

    let mut da = Daemon::start(&a, &fa);
    let mut db = Daemon::start(&b, &fb);
    let mut dc = Daemon::start(&c, &fc);
    let mut de = Daemon::start(&e, &fe);

    // Full mesh over IPv6 mesh addresses. a and b first, so c has learnt their
    // endpoints before it has to answer on its own.
    let nodes = [("a", &a, &fa), ("b", &b, &fb), ("c", &c, &fc)];
    for (from_name, from, _) in nodes {
        for (to_name, _, to_files) in nodes {
            if from_name == to_name {
                continue;
            }
            let target = to_files.mesh().to_string();
            let (sent, got, out) = from.ping6(&target, 3);
            assert_eq!(
                (sent, got),
                (3, 3),
                "{from_name} -> {to_name} ({target}):\n{out}"
            );
            println!("ping -6 {from_name} -> {to_name}: {got}/{sent}");
        }
    }

    // Site-to-site: a reaches the LAN behind b; b forwards.
    let (sent, got, out) = a.ping(&["-c", "3", "-i", "0.2", "-W", "2", "192.168.50.2"]);
    assert_eq!((sent, got), (3, 3), "a -> 192.168.50.2 via b:\n{out}");
    println!("site-to-site a -> 192.168.50.2: {got}/{sent}");

    // Spoofing: b's side sends from an address outside b's allowed IPs.
    let spoofed_before = peer(&da.show(), "b").counters.spoofed_source;
    let tun_rx_before = a.link_stat("veil0", "rx_packets");
    b.ip(&["addr", "add", "10.66.0.1/32", "dev", "veil0"]);
    let (_, got, out) = b.ping(&[
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.66.0.1",
        "10.10.1.1",
    ]);
    assert_eq!(got, 0, "a spoofed packet was answered:\n{out}");
    let spoofed_after = peer(&da.show(), "b").counters.spoofed_source;
    assert!(
        spoofed_after >= spoofed_before + 3,
        "spoofed counter {spoofed_before} -> {spoofed_after}"
    );
    assert_eq!(
        a.link_stat("veil0", "rx_packets"),
        tun_rx_before,
        "a spoofed packet reached a's TUN"
    );
    println!("spoofed source: dropped, counter {spoofed_before} -> {spoofed_after}");

    // A key a does not know cannot reach a.
    let (_, got, out) = e.ping(&[
        "-6",
        "-c",
        "2",
        "-i",
        "0.5",
        "-W",
        "1",
        &fa.mesh().to_string(),
    ]);
    assert_eq!(got, 0, "a stranger reached a:\n{out}");
    let unknown = da.show().node.counters.unknown_peer_handshakes;
    assert!(unknown >= 1, "a did not count the stranger's handshake");
    println!("unknown key: unreachable, {unknown} handshake(s) dropped");

    // A mesh address nobody owns: ICMPv6 destination unreachable, counted.
    let (_, got, out) = a.ping(&["-6", "-c", "1", "-W", "1", "fd60:db4d:ddb5::1234"]);
    assert_eq!(got, 0);
    assert!(
        out.contains("Destination unreachable"),
        "no ICMPv6 unreachable:\n{out}"
    );
    assert!(da.show().node.counters.no_route >= 1);

    // Too big for the path: ICMPv6 packet too big with the path MTU.
    let (_, _, out) = a.ping(&[
        "-6",
        "-c",
        "1",
        "-W",
        "1",
        "-M",
        "do",
        "-s",
        "1452",
        &fb.mesh().to_string(),
    ]);
    assert!(
        out.contains("1440"),
        "no packet-too-big with mtu 1440:\n{out}"
    );
    assert!(peer(&da.show(), "b").counters.oversize >= 1);
    // The same over IPv4 (site-to-site): fragmentation needed, mtu 1440. The
    // error must come from an address that is not a's own, or Linux drops
    // it as a martian and TCP stalls.
    let (_, _, out) = a.ping(&[
        "-c",
        "2",
        "-W",
        "1",
        "-M",
        "do",
        "-s",
        "1452",
        "192.168.50.2",
    ]);
    assert!(
        out.contains("1440"),
        "no fragmentation-needed with mtu 1440:\n{out}"
    );
    println!(
        "oversize: {}",
        out.lines().find(|l| l.contains("1440")).unwrap_or("")
    );

    // A second daemon for the same interface is refused, whether it finds
    // the control socket or only the interface.
    let second = a.exec(&[BIN, "up", "--config", fa.config.to_str().unwrap()]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    let other_socket = fa.dir.join("other.toml");
    std::fs::write(
        &other_socket,
        std::fs::read_to_string(&fa.config)
            .unwrap()
            .replace("control.sock", "other.sock"),
    )
    .unwrap();
    let second = a.exec(&[BIN, "up", "--config", other_socket.to_str().unwrap()]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("interface veil0 already exists"), "{err}");
    assert!(
        da.show().node.peers.len() == 2,
        "the first daemon must survive"
    );

    // SIGTERM: clean exit, no TUN, no route, no socket left behind.
    for (name, ns, daemon) in [
        ("a", &a, &mut da),
        ("b", &b, &mut db),
        ("c", &c, &mut dc),
        ("e", &e, &mut de),
    ] {
        let status = daemon.stop();
        assert!(
            status.success(),
            "{name} exited with {status}:\n{}",
            daemon.log_text()
        );
        assert!(!ns.has_link("veil0"), "{name} still has veil0");
        let routes = ns.ip(&["-4", "route", "show"]) + &ns.ip(&["-6", "route", "show"]);
        assert!(!routes.contains("veil0"), "{name} kept routes:\n{routes}");
        assert!(!daemon.socket.exists(), "{name} left its control socket");
        // Its stderr went to a file: plain text, no terminal colour codes.
        let log = daemon.log_text();
        assert!(log.contains("INFO"), "{name} logged nothing:\n{log}");
        assert!(
            !log.contains('\u{1b}'),
            "{name}'s log has escape codes:\n{log}"
        );
    }
    std::thread::sleep(Duration::from_millis(10));
}

fn peer<'a>(
    status: &'a veilmesh::control::DaemonStatus,
    name: &str,
) -> &'a veilmesh::core::PeerStatus {
    status
        .node
        .peers
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no peer {name}"))
}
