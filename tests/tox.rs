//! Two daemons reachable only over Tox: no UDP endpoints, bootstrapped to a
//! local tox-bootstrapd (Debian's toxcore-utils), LAN discovery off. Needs
//! root.

mod common;

/// Held while a test measures time or saturates the machine: the RTT
/// bound and the relayed transfer must not be measured during the other
/// test's 10 s transfer.
static QUIET: std::sync::Mutex<()> = std::sync::Mutex::new(());

use std::time::{Duration, Instant};

use common::*;

/// Two nodes a (198.18.0.1) and b (.2) and tox-bootstrapd in r (.3) on a
/// bridge; a and b know each other only by Tox ID.
struct ToxPair {
    _dir: tempfile::TempDir,
    a: Netns,
    b: Netns,
    fa: NodeFiles,
    fb: NodeFiles,
    id_a: String,
    _bootstrapd: Bootstrapd,
    _r: Netns,
    _br: Bridge,
}

impl ToxPair {
    fn new(tag: &str, block_direct_udp: bool) -> ToxPair {
        require_root();
        reap_stale();
        let dir = tempfile::tempdir().unwrap();
        let mut br = Bridge::new(&format!("{tag}-br"));
        let (a, b, r) = (
            Netns::new(&format!("{tag}-a")),
            Netns::new(&format!("{tag}-b")),
            Netns::new(&format!("{tag}-r")),
        );
        br.attach(&a, "198.18.0.1/24");
        br.attach(&b, "198.18.0.2/24");
        br.attach(&r, "198.18.0.3/24");
        if block_direct_udp {
            for chain in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
                let out = a.exec(&[
                    "iptables",
                    "-A",
                    chain[0],
                    "-p",
                    "udp",
                    chain[1],
                    "198.18.0.2",
                    "-j",
                    "DROP",
                ]);
                assert!(
                    out.status.success(),
                    "iptables: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let bootstrapd = Bootstrapd::start(&r, dir.path());
        let (fa, fb) = (
            NodeFiles::new(dir.path(), "a"),
            NodeFiles::new(dir.path(), "b"),
        );
        let key = bootstrapd.public_key.clone();
        let tox_section = move |files: &NodeFiles| {
            format!(
                "\n[tox]\nenabled = true\nstate_file = \"{}\"\nbootstrap_nodes = [\"198.18.0.3:33445:{key}\"]\n\
                 tcp_relays = [\"198.18.0.3:33446:{key}\"]\nlocal_discovery = false\n",
                files.dir.join("veil0.tox").display(),
            )
        };
        // Identities first: each config needs the other's Tox ID.
        fa.write_config("", &tox_section(&fa));
        fb.write_config("", &tox_section(&fb));
        let (id_a, id_b) = (tox_id(&a, &fa), tox_id(&b, &fb));
        assert_eq!(id_a.len(), 76);
        assert_eq!(tox_id(&a, &fa), id_a, "the Tox ID must be stable");
        let peer = |files: &NodeFiles, name: &str, id: &str| {
            // Tox only: on one bridge, the nodes would otherwise move to direct UDP.
            format!(
                "{}tox = \"{id}\"\ntransports = [\"tox\"]\n",
                files.peer_block(name, None, &[])
            )
        };
        fa.write_config("", &(tox_section(&fa) + &peer(&fb, "b", &id_b)));
        fb.write_config("", &(tox_section(&fb) + &peer(&fa, "a", &id_a)));
        ToxPair {
            _dir: dir,
            a,
            b,
            fa,
            fb,
            id_a,
            _bootstrapd: bootstrapd,
            _r: r,
            _br: br,
        }
    }

    /// Pings b from a until it answers; returns the time it took.
    fn first_reply(&self, since: Instant, daemon: &Daemon) -> Duration {
        first_reply(
            &self.a,
            &self.fb.mesh().to_string(),
            since,
            Duration::from_secs(120),
            daemon,
        )
    }

    /// iperf3 TCP from a to b's mesh address; returns Mbit/s.
    fn iperf(&self, seconds: u32) -> f64 {
        iperf_mbit(&self.a, &self.b, &self.fb.mesh().to_string(), seconds)
    }
}

fn friend_state(daemon: &Daemon, peer: &str) -> Option<String> {
    daemon.peer(peer).path_state
}

#[test]
fn two_nodes_reach_each_other_over_tox_only() {
    let t = ToxPair::new("tx", false);
    let started = Instant::now();
    let mut da = Daemon::start(&t.a, &t.fa);
    let _db = Daemon::start(&t.b, &t.fb);
    let took = t.first_reply(started, &da);
    println!(
        "first ping reply over Tox {:.1} s after start",
        took.as_secs_f64()
    );
    let b_mesh = t.fb.mesh().to_string();
    let (sent, got, out) = t.a.ping6(&b_mesh, 10);
    assert!(got >= 9, "over Tox: {got}/{sent}\n{out}");
    println!(
        "ping -6 over Tox: {got}/{sent}, {}",
        out.lines().last().unwrap_or("")
    );
    // The event loop wakes as a packet reaches toxcore's socket; when it
    // iterated every millisecond the median was 1.6 ms, by construction
    // (a loose bound: the benchmark gives the number). Not while the other
    // test saturates; up to three rounds of 50, as a VM late in a long CI
    // run can be slowed for seconds at a time.
    let quiet = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    let mut medians = Vec::new();
    let mut last = String::new();
    while medians.len() < 3 && medians.iter().all(|m: &f64| *m >= 1.0) {
        let (_, got, out) =
            t.a.ping(&["-6", "-c", "50", "-i", "0.05", "-W", "2", &b_mesh]);
        medians.push(rtt_median_ms(&out));
        println!(
            "ping -6 over Tox: median RTT {:.3} ms ({got}/50)",
            medians[medians.len() - 1]
        );
        last = out;
    }
    drop(quiet);
    let best = medians.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(best < 1.0, "median RTT over Tox {medians:?} ms:\n{last}");

    let (ok, out) = veilmesh_ping(&t.fa, "b", &[]);
    assert!(ok && out.contains("pong from b over tox "), "{out}");
    let (ok, out) = veilmesh_netcheck(&t.fa);
    assert!(
        ok && out.contains("tox: up\n  connected to the Tox network over ")
            && out.contains("1/1 friends online"),
        "{out}"
    );

    let status = da.show();
    let to_b = da.peer("b");
    assert!(
        to_b.path.as_deref().unwrap_or("").starts_with("tox "),
        "{:?}",
        to_b.path
    );
    assert_eq!(to_b.path_state.as_deref(), Some("friend UDP"));
    assert!(
        status
            .transports
            .iter()
            .any(|s| s.contains(&format!("tox ID {}", t.id_a))),
        "{:?}",
        status.transports
    );

    // 1398 bytes fit the TUN (1420) but not a Tox packet (1372 - 32 of Noise): an ICMPv6
    // packet-too-big, never a silent drop.
    let (_, _, out) = t.a.ping(&[
        "-6", "-c", "1", "-W", "2", "-M", "do", "-s", "1350", &b_mesh,
    ]);
    assert!(
        out.contains("mtu=1340"),
        "no packet-too-big for the Tox path:\n{out}\n{:#?}",
        da.show().node
    );

    let quiet = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    let mbit = t.iperf(10);
    drop(quiet);
    println!("iperf3 TCP 10 s over Tox (UDP): {mbit:.1} Mbit/s");
    assert_eq!(
        friend_state(&da, "b").as_deref(),
        Some("friend UDP"),
        "friend connection lost during iperf"
    );
    let (_, got, _) = t.a.ping6(&b_mesh, 3);
    assert!(got >= 2, "ping after iperf: {got}/3");

    assert!(da.stop().success());
    assert_eq!(
        tox_id(&t.a, &t.fa),
        t.id_a,
        "the Tox ID changed across a restart"
    );
}

#[test]
fn tox_falls_back_to_the_tcp_relay_when_udp_is_blocked() {
    let t = ToxPair::new("tr", true);
    let started = Instant::now();
    let da = Daemon::start(&t.a, &t.fa);
    let _db = Daemon::start(&t.b, &t.fb);
    let took = t.first_reply(started, &da);
    println!(
        "first ping reply through the TCP relay {:.1} s after start",
        took.as_secs_f64()
    );
    assert_eq!(friend_state(&da, "b").as_deref(), Some("friend TCP"));
    // 10 s of a saturating transfer: pacing keeps the relay connection alive.
    let quiet = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    let mbit = t.iperf(10);
    drop(quiet);
    println!("iperf3 TCP 10 s through the Tox TCP relay: {mbit:.2} Mbit/s");
    let b_mesh = t.fb.mesh().to_string();
    let (sent, got, out) = t.a.ping6(&b_mesh, 5);
    assert!(got >= 4, "after a saturating transfer the relayed friend connection must survive: {got}/{sent}\n{out}");
    assert_eq!(friend_state(&da, "b").as_deref(), Some("friend TCP"));
}
