//! NAT traversal on a test bed of namespaces: a routed "internet", a
//! server namespace (coturn as STUN server on two addresses, tox-bootstrapd
//! as Tox DHT node and TCP relay, or three BitTorrent DHT nodes), two NAT
//! routers (iptables) and a veilmesh node behind each. The nodes know each
//! other only by public key (and Tox ID): they meet over Tox and swap
//! endpoints in the session, or find each other's endpoints in the DHT,
//! and punch. Needs root.
//!
//! ```text
//!  hA 10.1.0.2 ── natA 10.1.0.1 | 192.0.2.2 ──┐
//!                                            inet (router) ── srv 203.0.113.10, .11
//!  hB 10.2.0.2 ── natB 10.2.0.1 | 198.51.100.2 ┘
//! ```
//!
//! The internet is a router, not a bridge: a probe sent with TTL 2 leaves
//! its own NAT and dies at the next hop, as on the real internet.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LISTEN_PORT: u16 = 40000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nat {
    /// MASQUERADE with the default ACCEPT policy.
    Cone,
    /// Cone plus a firewall dropping new connections from the WAN side.
    ConeFirewall,
    /// MASQUERADE --random-fully: a new port per destination.
    Symmetric,
    /// Cone plus the veilmesh port forwarded to the host.
    FullCone,
}

impl Nat {
    fn name(self) -> &'static str {
        match self {
            Nat::Cone => "cone",
            Nat::ConeFirewall => "conefw",
            Nat::Symmetric => "sym",
            Nat::FullCone => "fullcone",
        }
    }

    fn configure(self, router: &Netns, host_ip: &str) {
        router.sysctl("net.ipv4.ip_forward", "1");
        let iptables = |args: &[&str]| {
            let mut full = vec!["iptables", "-w"];
            full.extend_from_slice(args);
            let out = router.exec(&full);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let mut masquerade = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan",
            "-j",
            "MASQUERADE",
        ];
        if self == Nat::Symmetric {
            masquerade.push("--random-fully");
        }
        iptables(&masquerade);
        if self == Nat::ConeFirewall {
            for chain in ["INPUT", "FORWARD"] {
                iptables(&[
                    "-A",
                    chain,
                    "-i",
                    "wan",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "DROP",
                ]);
            }
        }
        if self == Nat::FullCone {
            let port = LISTEN_PORT.to_string();
            let to = format!("{host_ip}:{port}");
            iptables(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "wan",
                "-p",
                "udp",
                "--dport",
                &port,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]);
        }
    }
}

struct Site {
    router: Netns,
    host: Netns,
    files: NodeFiles,
}

/// How the two nodes first meet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Meeting {
    /// As Tox friends (bootstrap node and TCP relay on the internet).
    Tox,
    /// Through a private BitTorrent DHT; no Tox at all.
    Dht,
}

/// The private DHT's nodes, on a private address (BEP 42 exempts those
/// from the node-id rules).
const DHT_NODES: [&str; 3] = ["172.16.0.10:6881", "172.16.0.10:6882", "172.16.0.10:6883"];

struct TestBed {
    a: Site,
    b: Site,
    _srv: Netns,
    _inet: Netns,
    _servers: Vec<ChildGuard>,
    _bootstrapd: Option<Bootstrapd>,
    _dir: tempfile::TempDir,
}

impl TestBed {
    fn new(tag: &str, nat_a: Nat, nat_b: Nat, meeting: Meeting) -> TestBed {
        require_root();
        reap_stale();
        let dir = tempfile::tempdir().unwrap();
        let inet = Netns::new(&format!("{tag}-inet"));
        inet.sysctl("net.ipv4.ip_forward", "1");
        let srv = Netns::new(&format!("{tag}-srv"));
        veth(&inet, "srv", &srv, "eth0");
        inet.ip(&["addr", "add", "203.0.113.1/24", "dev", "srv"]);
        srv.ip(&["addr", "add", "203.0.113.10/24", "dev", "eth0"]);
        srv.ip(&["addr", "add", "203.0.113.11/24", "dev", "eth0"]);
        srv.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        inet.ip(&["addr", "add", "172.16.0.1/24", "dev", "srv"]);
        srv.ip(&["addr", "add", "172.16.0.10/24", "dev", "eth0"]);
        let site = |name: &str, nat: Nat, wan: &str, inet_side: &str, lan: &str| {
            let router = Netns::new(&format!("{tag}-nat{name}"));
            let host = Netns::new(&format!("{tag}-h{name}"));
            let inet_if = format!("nat{name}");
            veth(&inet, &inet_if, &router, "wan");
            inet.ip(&["addr", "add", &format!("{inet_side}/24"), "dev", &inet_if]);
            router.ip(&["addr", "add", &format!("{wan}/24"), "dev", "wan"]);
            router.ip(&["route", "add", "default", "via", inet_side]);
            veth(&router, "lan", &host, "eth0");
            router.ip(&["addr", "add", &format!("{lan}.1/24"), "dev", "lan"]);
            let host_ip = format!("{lan}.2");
            host.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", "eth0"]);
            host.ip(&["route", "add", "default", "via", &format!("{lan}.1")]);
            nat.configure(&router, &host_ip);
            Site {
                router,
                host,
                files: NodeFiles::new(dir.path(), name),
            }
        };
        let a = site("A", nat_a, "192.0.2.2", "192.0.2.1", "10.1.0");
        let b = site("B", nat_b, "198.51.100.2", "198.51.100.1", "10.2.0");

        let pidfile = dir.path().join("turnserver.pid");
        let mut servers = vec![ChildGuard(srv.spawn(&[
            "turnserver",
            "-n",
            "--stun-only",
            "--listening-ip",
            "203.0.113.10",
            "--listening-ip",
            "203.0.113.11",
            "--listening-port",
            "3478",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--log-file",
            "stdout",
            "--simple-log",
            "--no-software-attribute",
            "--pidfile",
            pidfile.to_str().unwrap(),
        ]))];
        wait_for_udp_listener(&srv, "203.0.113.11:3478");
        let stun = "[udp]\nstun_servers = [\"203.0.113.10:3478\", \"203.0.113.11:3478\"]\n";
        let mut bootstrapd = None;
        if meeting == Meeting::Tox {
            let tox = Bootstrapd::start(&srv, dir.path());
            let key = tox.public_key.clone();
            bootstrapd = Some(tox);
            let section = |files: &NodeFiles| {
                format!(
                    "listen_port = {LISTEN_PORT}\n{stun}\
                     [tox]\nenabled = true\nstate_file = \"{}\"\n\
                     bootstrap_nodes = [\"203.0.113.10:33445:{key}\"]\n\
                     tcp_relays = [\"203.0.113.10:33446:{key}\"]\nlocal_discovery = false\n",
                    files.dir.join("veil0.tox").display(),
                )
            };
            a.files.write_config(&section(&a.files), "");
            b.files.write_config(&section(&b.files), "");
            let (id_a, id_b) = (tox_id(&a.host, &a.files), tox_id(&b.host, &b.files));
            let peer = |files: &NodeFiles, name: &str, id: &str| {
                format!("{}tox = \"{id}\"\n", files.peer_block(name, None, &[]))
            };
            a.files
                .write_config(&section(&a.files), &peer(&b.files, "b", &id_b));
            b.files
                .write_config(&section(&b.files), &peer(&a.files, "a", &id_a));
        } else {
            for (i, node) in DHT_NODES.iter().enumerate() {
                let (ip, port) = node.split_once(':').unwrap();
                let mut args = vec![BIN, "dht-node", "--bind", ip, "--port", port];
                if i > 0 {
                    args.extend(["--bootstrap", DHT_NODES[0]]);
                }
                servers.push(ChildGuard(srv.spawn(&args)));
                wait_for_udp_listener(&srv, node);
            }
            let nodes: Vec<String> = DHT_NODES.iter().map(|n| format!("\"{n}\"")).collect();
            let section = format!(
                "listen_port = {LISTEN_PORT}\n{stun}\
                 [rendezvous]\ndht = true\nbootstrap = [{}]\n",
                nodes.join(", ")
            );
            a.files
                .write_config(&section, &b.files.peer_block("b", None, &[]));
            b.files
                .write_config(&section, &a.files.peer_block("a", None, &[]));
        }
        TestBed {
            a,
            b,
            _srv: srv,
            _inet: inet,
            _servers: servers,
            _bootstrapd: bootstrapd,
            _dir: dir,
        }
    }
}

fn wait_for_udp_listener(ns: &Netns, address: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.exec(&["ss", "-lun"]);
        if String::from_utf8_lossy(&out.stdout).contains(address) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {address}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn path_in_use(daemon: &Daemon, peer: &str) -> String {
    daemon.peer(peer).path.unwrap_or_default()
}

/// Polls until `peer`'s path in use starts with `prefix`; the time it took.
fn wait_for_path(daemon: &Daemon, peer: &str, prefix: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if path_in_use(daemon, peer).starts_with(prefix) {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(100));
    }
    None
}

struct Outcome {
    pair: String,
    path: String,
    first_reply: Duration,
    direct_after: Option<Duration>,
    ping: (u32, u32),
    nat_type: String,
    /// a's `veilmesh netcheck` output.
    netcheck: String,
}

/// Starts both nodes, pings until b answers, then waits for a direct path.
/// Tox finding its friend through two NATs takes 10–90 s (through the TCP
/// relay for sym/sym, slower on a loaded machine): the first reply gets
/// three minutes.
fn run_pair(tag: &str, nat_a: Nat, nat_b: Nat, expect_direct: bool) -> Outcome {
    let bed = TestBed::new(tag, nat_a, nat_b, Meeting::Tox);
    let started = Instant::now();
    let da = Daemon::start(&bed.a.host, &bed.a.files);
    let db = Daemon::start(&bed.b.host, &bed.b.files);
    let b_mesh = bed.b.files.mesh().to_string();
    let first_reply = first_reply(&bed.a.host, &b_mesh, started, Duration::from_secs(180), &da);
    let limit = if expect_direct { 30 } else { 15 };
    let direct =
        wait_for_path(&da, "b", "udp ", Duration::from_secs(limit)).map(|_| started.elapsed());
    let (sent, got, out) = bed.a.host.ping6(&b_mesh, 5);
    let path = path_in_use(&da, "b");
    if expect_direct && direct.is_none() {
        println!("--- a ---\n{}\n--- b ---\n{}", da.log_text(), db.log_text());
        for site in [&bed.a, &bed.b] {
            let ct = site.router.exec(&["conntrack", "-L", "-p", "udp"]);
            println!(
                "conntrack {}:\n{}",
                site.router.name,
                String::from_utf8_lossy(&ct.stdout)
            );
        }
    }
    assert!(got >= 4, "{tag}: ping over {path}: {got}/{sent}\n{out}");
    let nat_type = da.show().transports.first().cloned().unwrap_or_default();
    let (_, netcheck) = veilmesh_netcheck(&bed.a.files);
    Outcome {
        netcheck,
        pair: format!("{}/{}", nat_a.name(), nat_b.name()),
        path,
        first_reply,
        direct_after: direct,
        ping: (sent, got),
        nat_type,
    }
}

fn print_table(rows: &[(Outcome, bool)]) {
    println!(
        "| NAT A / NAT B | path reached | first reply over Tox (s) | direct UDP (s after start) \
         | time to direct path after first reply (s) | ping |"
    );
    println!("|---|---|---|---|---|---|");
    let seconds = |d: Option<Duration>| {
        d.map(|d| format!("{:.1}", d.as_secs_f64()))
            .unwrap_or_else(|| "none".into())
    };
    for (o, _) in rows {
        println!(
            "| {} | {} | {:.1} | {} | {} | {}/{} |",
            o.pair,
            o.path,
            o.first_reply.as_secs_f64(),
            seconds(o.direct_after),
            seconds(o.direct_after.map(|d| d.saturating_sub(o.first_reply))),
            o.ping.1,
            o.ping.0
        );
    }
    if let Some((o, _)) = rows.first() {
        println!("a's UDP transport: {}", o.nat_type);
        println!("a's netcheck:\n{}", o.netcheck);
    }
}

/// Every NAT pair of the issue, two test beds at a time.
#[test]
fn nat_pairs_reach_a_direct_path_where_one_exists() {
    let mut cases: Vec<(String, Nat, Nat, bool)> = (1..=5)
        .map(|i| (format!("cc{i}"), Nat::Cone, Nat::Cone, true))
        .collect();
    cases.push(("ff".into(), Nat::ConeFirewall, Nat::ConeFirewall, true));
    cases.push(("sf".into(), Nat::Symmetric, Nat::FullCone, true));
    cases.push(("ss".into(), Nat::Symmetric, Nat::Symmetric, false));
    let mut rows = Vec::new();
    for chunk in cases.chunks(2) {
        let handles: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(tag, a, b, direct)| {
                thread::spawn(move || (run_pair(&tag, a, b, direct), direct))
            })
            .collect();
        for h in handles {
            rows.push(h.join().expect("a NAT case panicked"));
        }
    }
    print_table(&rows);
    for (o, expect_direct) in &rows {
        // Both STUN servers answered long ago, and the hairpin test (at
        // most 7.5 s after the mapping) has its result.
        assert!(
            o.netcheck.contains("udp: up\n") && o.netcheck.contains("NAT: endpoint-"),
            "{}: {}",
            o.pair,
            o.netcheck
        );
        assert!(
            o.netcheck.contains("hairpinning: works") || o.netcheck.contains("hairpinning: fails"),
            "{}: {}",
            o.pair,
            o.netcheck
        );
        if *expect_direct {
            assert!(
                o.path.starts_with("udp "),
                "{}: no direct path: {}",
                o.pair,
                o.path
            );
        } else {
            assert!(
                o.path.starts_with("tox "),
                "{}: expected Tox, got {}",
                o.pair,
                o.path
            );
        }
    }
}

/// Starts both daemons and waits until a reaches b over direct UDP;
/// returns them and b's mesh address.
fn start_until_direct(bed: &TestBed) -> (Daemon, Daemon, String) {
    let started = Instant::now();
    let da = Daemon::start(&bed.a.host, &bed.a.files);
    let db = Daemon::start(&bed.b.host, &bed.b.files);
    let b_mesh = bed.b.files.mesh().to_string();
    first_reply(&bed.a.host, &b_mesh, started, Duration::from_secs(180), &da);
    assert!(
        wait_for_path(&da, "b", "udp ", Duration::from_secs(30)).is_some(),
        "no direct path:\n{}\n{}",
        da.log_text(),
        db.log_text()
    );
    (da, db, b_mesh)
}

/// Blocking the direct path mid-ping moves traffic to Tox within 5 s;
/// unblocking brings it back.
#[test]
fn a_blocked_direct_path_fails_over_to_tox_and_back() {
    let bed = TestBed::new("fo", Nat::ConeFirewall, Nat::ConeFirewall, Meeting::Tox);
    let (da, _db, b_mesh) = start_until_direct(&bed);
    // 0.1 s between pings for 16 s: 160 pings; block at 3 s, unblock at 11 s.
    let ping = bed
        .a
        .host
        .spawn(&["ping", "-6", "-n", "-i", "0.1", "-c", "160", &b_mesh]);
    thread::sleep(Duration::from_secs(3));
    let port = LISTEN_PORT.to_string();
    let rule = |op: &str| {
        for dir in ["--sport", "--dport"] {
            let out = bed.a.router.exec(&[
                "iptables", "-w", op, "FORWARD", "-p", "udp", dir, &port, "-j", "DROP",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    rule("-I");
    let blocked = Instant::now();
    let moved = wait_for_path(&da, "b", "tox ", Duration::from_secs(8));
    thread::sleep(Duration::from_secs(8).saturating_sub(blocked.elapsed()));
    rule("-D");
    let back = wait_for_path(&da, "b", "udp ", Duration::from_secs(20));
    let out = ping.wait_with_output().unwrap();
    let (sent, got, text) = ping_result(out);
    let lost_seconds = f64::from(sent - got) * 0.1;
    println!(
        "failover: Tox in use {:.1} s after the block; {got}/{sent} pings answered \
         ({lost_seconds:.1} s of loss); direct UDP back {:.1} s after unblocking",
        moved.map_or(f64::NAN, |d| d.as_secs_f64()),
        back.map_or(f64::NAN, |d| d.as_secs_f64()),
    );
    assert!(moved.is_some(), "no failover to Tox:\n{}", da.log_text());
    assert!(lost_seconds <= 5.0, "{lost_seconds} s of loss\n{text}");
    assert!(
        back.is_some(),
        "traffic did not return to UDP:\n{}",
        da.log_text()
    );
}

/// No Tox, no static endpoint: the nodes find each other's endpoints in a
/// private DHT and punch through two cone NATs.
#[test]
fn first_contact_through_the_dht_reaches_a_direct_path() {
    let bed = TestBed::new("dh", Nat::Cone, Nat::Cone, Meeting::Dht);
    let started = Instant::now();
    let da = Daemon::start(&bed.a.host, &bed.a.files);
    let db = Daemon::start(&bed.b.host, &bed.b.files);
    let b_mesh = bed.b.files.mesh().to_string();
    let took = first_reply(&bed.a.host, &b_mesh, started, Duration::from_secs(90), &da);
    let path = path_in_use(&da, "b");
    println!(
        "DHT rendezvous, cone/cone: first reply {:.1} s after start, over {path}",
        took.as_secs_f64()
    );
    assert!(path.starts_with("udp "), "{path}\n{}", db.log_text());
    let (sent, got, out) = bed.a.host.ping6(&b_mesh, 5);
    assert!(got >= 4, "{got}/{sent}\n{out}");
    // The DHT found b: it knows nodes, and netcheck says so.
    let (ok, netcheck) = veilmesh_netcheck(&bed.a.files);
    assert!(ok, "{netcheck}");
    let known = netcheck
        .lines()
        .find_map(|l| l.trim().strip_suffix(" DHT nodes known"))
        .and_then(|n| n.parse::<usize>().ok());
    assert!(
        netcheck.contains("rendezvous: up\n") && known.is_some_and(|n| n > 0),
        "{netcheck}"
    );
}

/// The NAT in front of a forgets a's veilmesh mapping and gives a new one
/// from another port range (a rebinding; Tox's mappings are left alone):
/// a's STUN refresh sees the new public endpoint, a announces it over Tox,
/// and the two punch again.
#[test]
fn a_rebound_nat_mapping_gets_a_direct_path_again() {
    let bed = TestBed::new("rb", Nat::ConeFirewall, Nat::ConeFirewall, Meeting::Tox);
    let (da, db, b_mesh) = start_until_direct(&bed);
    assert!(
        wait_for_path(&db, "a", "udp 192.0.2.2:40000", Duration::from_secs(30)).is_some(),
        "no direct path:\n{}",
        db.log_text()
    );
    let router = &bed.a.router;
    let port = LISTEN_PORT.to_string();
    let out = router.exec(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-I",
        "POSTROUTING",
        "1",
        "-o",
        "wan",
        "-p",
        "udp",
        "--sport",
        &port,
        "-j",
        "MASQUERADE",
        "--to-ports",
        "50000-50999",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Exits 1 when nothing matched; either way the mapping is gone after.
    router.exec(&["conntrack", "-D", "-p", "udp", "--orig-port-src", &port]);
    let rebound = Instant::now();
    let back = wait_for_path(&db, "a", "udp 192.0.2.2:50", Duration::from_secs(60));
    println!(
        "NAT rebinding: b uses a's new mapping ({}) {:.1} s later",
        path_in_use(&db, "a"),
        rebound.elapsed().as_secs_f64()
    );
    assert!(
        back.is_some(),
        "no direct path after rebinding:\n{}",
        da.log_text()
    );
    let (sent, got, out) = bed.a.host.ping6(&b_mesh, 5);
    assert!(got >= 4, "{got}/{sent}\n{out}");
}

/// sym/sym pairs never get a direct path; with a public relay node r
/// (`[interface] relay = true`, each node marks it `relay = true`) they
/// reach each other through r, above Tox, and much faster than Tox's TCP
/// relay: measured here with iperf3, relay first, then Tox once r is cut
/// off.
#[test]
fn a_relay_carries_a_sym_sym_pair_far_faster_than_tox() {
    let bed = TestBed::new("ry", Nat::Symmetric, Nat::Symmetric, Meeting::Tox);
    // r on a public network of its own, with two addresses; the peers use
    // the second, which is not the kernel's choice of source: r's answers
    // must leave from it anyway, or the symmetric NATs drop them.
    let rns = Netns::new("ry-relay");
    veth(&bed._inet, "rly", &rns, "eth0");
    bed._inet
        .ip(&["addr", "add", "198.18.5.1/24", "dev", "rly"]);
    rns.ip(&["addr", "add", "198.18.5.2/24", "dev", "eth0"]);
    rns.ip(&["addr", "add", "198.18.5.3/24", "dev", "eth0"]);
    rns.ip(&["route", "add", "default", "via", "198.18.5.1"]);
    let fr = NodeFiles::new(bed._dir.path(), "r");
    let r_block = fr.peer_block("r", Some("198.18.5.3:40000"), &[])
        + "relay = true\npersistent_keepalive = 25\n";
    for site in [&bed.a, &bed.b] {
        let text = std::fs::read_to_string(&site.files.config).unwrap();
        std::fs::write(&site.files.config, text + "\n" + &r_block).unwrap();
    }
    fr.write_config(
        "listen_port = 40000\nrelay = true",
        &(bed.a.files.peer_block("a", None, &[]) + &bed.b.files.peer_block("b", None, &[])),
    );
    let dr = Daemon::start(&rns, &fr);
    let started = Instant::now();
    let da = Daemon::start(&bed.a.host, &bed.a.files);
    let db = Daemon::start(&bed.b.host, &bed.b.files);
    let b_mesh = bed.b.files.mesh().to_string();
    first_reply(&bed.a.host, &b_mesh, started, Duration::from_secs(60), &da);
    let relayed = wait_for_path(&da, "b", "relay via r", Duration::from_secs(30));
    assert!(
        relayed.is_some(),
        "no relay path: {:#?}\nr's view: {:#?}\n{}",
        da.peer("b").paths,
        dr.show().node,
        dr.log_text()
    );
    let over_relay = iperf_mbit(&bed.a.host, &bed.b.host, &b_mesh, 3);

    // r goes away: the pair falls back to Tox (its TCP relay, for sym/sym).
    let out = rns.exec(&[
        "iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", "40000", "-j", "DROP",
    ]);
    assert!(out.status.success(), "{out:?}");
    // Pings keep the paths probed every second (an idle path is probed
    // every 15 s); Tox's own friend connection through two symmetric NATs
    // may still be on its way (10-90 s, see run_pair).
    let blocked = Instant::now();
    let mut tox = None;
    while tox.is_none() && blocked.elapsed() < Duration::from_secs(120) {
        bed.a.host.ping(&["-6", "-c", "1", "-W", "1", &b_mesh]);
        tox = path_in_use(&da, "b")
            .starts_with("tox ")
            .then(|| blocked.elapsed());
    }
    assert!(
        tox.is_some(),
        "no fallback to Tox: {:#?}",
        da.peer("b").paths
    );
    let over_tox = iperf_mbit(&bed.a.host, &bed.b.host, &b_mesh, 3);
    println!(
        "sym/sym: relay via r {over_relay:.0} Mbit/s, Tox {over_tox:.1} Mbit/s ({:.1}x); \
         r relayed {} datagrams; Tox in use {:.1} s after r was cut off",
        over_relay / over_tox,
        dr.show().node.counters.relayed,
        tox.unwrap_or_default().as_secs_f64()
    );
    assert!(
        over_relay >= 10.0 * over_tox,
        "relay {over_relay:.1} Mbit/s is not 10x Tox's {over_tox:.1}\n{}",
        db.log_text()
    );
}
