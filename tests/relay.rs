//! Relays: a and b cannot reach each other over UDP (iptables), both reach
//! r, which relays; a pings b's mesh address through r, and `show` and
//! `ping` say so. r learns nothing of a and b's traffic but sizes: their
//! Noise session is end to end. Needs root.

mod common;

use common::*;

#[test]
fn peers_without_a_direct_path_talk_through_a_relay() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let mut lan = Bridge::new("rl-br");
    let (a, b, r) = (Netns::new("rl-a"), Netns::new("rl-b"), Netns::new("rl-r"));
    lan.attach(&a, "198.18.0.1/24");
    lan.attach(&b, "198.18.0.2/24");
    lan.attach(&r, "198.18.0.3/24");
    // Nothing passes between a and b directly.
    for (args, what) in [
        (["-A", "OUTPUT", "-d", "198.18.0.2"], "to b"),
        (["-A", "INPUT", "-s", "198.18.0.2"], "from b"),
    ] {
        let mut full = vec!["iptables", "-w"];
        full.extend_from_slice(&args);
        full.extend_from_slice(&["-j", "DROP"]);
        let out = a.exec(&full);
        assert!(out.status.success(), "iptables {what}: {out:?}");
    }
    let (fa, fb, fr) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
        NodeFiles::new(dir.path(), "r"),
    );
    let relay = |block: String| block + "relay = true\n";
    fa.write_config(
        "",
        &(fb.peer_block("b", Some("198.18.0.2:51820"), &[])
            + &relay(fr.peer_block("r", Some("198.18.0.3:51820"), &[]))),
    );
    fb.write_config(
        "",
        &(fa.peer_block("a", Some("198.18.0.1:51820"), &[])
            + &relay(fr.peer_block("r", Some("198.18.0.3:51820"), &[]))),
    );
    fr.write_config(
        "relay = true",
        &(fa.peer_block("a", Some("198.18.0.1:51820"), &[])
            + &fb.peer_block("b", Some("198.18.0.2:51820"), &[])),
    );
    let dr = Daemon::start(&r, &fr);
    let db = Daemon::start(&b, &fb);
    let da = Daemon::start(&a, &fa);

    let b_mesh = fb.mesh().to_string();
    let started = std::time::Instant::now();
    first_reply(
        &a,
        &b_mesh,
        started,
        std::time::Duration::from_secs(30),
        &da,
    );
    let (sent, got, out) = a.ping6(&b_mesh, 5);
    assert_eq!((sent, got), (5, 5), "{out}");
    let to_b = da.peer("b");
    assert_eq!(
        to_b.path.as_deref(),
        Some("relay via r"),
        "{:#?}",
        to_b.paths
    );
    assert_eq!(db.peer("a").path.as_deref(), Some("relay via r"));
    let shown = run(&[BIN, "show", "--socket", fa.socket.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("path: relay via r"), "{shown}");
    assert!(shown.contains("relay in use (live"), "{shown}");

    let pinged = run(&[
        BIN,
        "ping",
        "b",
        "-n",
        "1",
        "--socket",
        fa.socket.to_str().unwrap(),
    ]);
    let (ok, text) = success_and_text(&pinged);
    assert!(
        ok && text.contains("pong from b over relay via r"),
        "{text}"
    );

    let relayed = dr.show().node.counters.relayed;
    assert!(relayed >= 10, "r relayed {relayed} datagrams");
    // Through r, a and b still speak end to end: none of the pings
    // reached r's own TUN.
    for peer in ["a", "b"] {
        let counters = dr.peer(peer).counters;
        assert!(counters.rx_packets < 5, "{peer}: {counters:?}");
    }
}
