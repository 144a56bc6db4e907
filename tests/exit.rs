//! Exit nodes: a sends everything through x, whose network (203.0.113.0/24,
//! "the internet") it masquerades into; a second peer's subnet still goes
//! to that peer; x itself is reached only over a's own default route, so
//! the tunnel to x keeps working only if veilmesh's socket stays outside
//! the exit (the mark). Stopping a, or killing it and starting again,
//! leaves no rule behind. Needs root.

mod common;

use common::*;

const MARK: &str = "30317";

/// a's policy rules that name our mark, and the routes of our table.
fn exit_state(a: &Netns) -> (Vec<String>, String) {
    let mut rules = Vec::new();
    for family in ["-4", "-6"] {
        rules.extend(
            a.ip(&[family, "rule", "show"])
                .lines()
                .filter(|l| l.contains(&format!("fwmark {MARK}")) || l.contains("0x766d"))
                .map(|l| format!("{family} {}", l.trim())),
        );
    }
    // An empty table does not exist: `ip` fails, and prints nothing.
    let table = ["-4", "-6"]
        .iter()
        .map(|family| {
            let out = a.exec(&["ip", family, "route", "show", "table", MARK]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    (rules, table)
}

#[test]
fn an_exit_carries_the_internet_and_nothing_of_our_own() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    // a and b on a LAN; a router r between the LAN and x's network.
    let mut lan = Bridge::new("ex-lan");
    let (a, b, r, x, net) = (
        Netns::new("ex-a"),
        Netns::new("ex-b"),
        Netns::new("ex-r"),
        Netns::new("ex-x"),
        Netns::new("ex-net"),
    );
    lan.attach(&a, "198.18.1.2/24");
    lan.attach(&b, "198.18.1.3/24");
    lan.attach(&r, "198.18.1.1/24");
    veth(&r, "eth1", &x, "eth0");
    r.ip(&["addr", "add", "198.18.2.1/24", "dev", "eth1"]);
    x.ip(&["addr", "add", "198.18.2.2/24", "dev", "eth0"]);
    r.sysctl("net.ipv4.ip_forward", "1");
    // x is reached over a's default route: the one an exit takes over.
    a.ip(&["route", "add", "default", "via", "198.18.1.1"]);
    x.ip(&["route", "add", "default", "via", "198.18.2.1"]);
    // Behind x: "the internet", which knows no route to the mesh.
    veth(&x, "eth1", &net, "eth0");
    x.ip(&["addr", "add", "203.0.113.1/24", "dev", "eth1"]);
    net.ip(&["addr", "add", "203.0.113.5/24", "dev", "eth0"]);
    x.sysctl("net.ipv4.ip_forward", "1");
    let masquerade = x.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth1",
        "-j",
        "MASQUERADE",
    ]);
    assert!(masquerade.status.success(), "{masquerade:?}");

    let (fa, fb, fx) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
        NodeFiles::new(dir.path(), "x"),
    );
    let peers_of_a = fx.peer_block("x", Some("198.18.2.2:51820"), &["0.0.0.0/0", "::/0"])
        + &fb.peer_block("b", Some("198.18.1.3:51820"), &["10.77.0.0/24"]);
    fa.write_config("addresses = [\"10.99.0.2/32\"]", &peers_of_a);
    fb.write_config(
        "addresses = [\"10.77.0.1/24\"]",
        &fa.peer_block("a", None, &["10.99.0.2/32"]),
    );
    fx.write_config("", &fa.peer_block("a", None, &["10.99.0.2/32"]));
    let _dx = Daemon::start(&x, &fx);
    let _db = Daemon::start(&b, &fb);
    let mut da = Daemon::start(&a, &fa);

    let internet = || a.ping(&["-c", "3", "-i", "0.2", "-W", "2", "203.0.113.5"]);
    let (sent, got, out) = internet();
    assert_eq!(
        (sent, got),
        (3, 3),
        "the internet through x:\n{out}\n{}",
        da.log_text()
    );
    assert_eq!(
        da.peer("x").path.as_deref(),
        Some("udp 198.18.2.2:51820"),
        "the tunnel to x runs outside itself"
    );
    let (sent, got, out) = a.ping(&["-c", "3", "-i", "0.2", "-W", "2", "10.77.0.1"]);
    assert_eq!((sent, got), (3, 3), "b's subnet goes to b:\n{out}");
    assert!(da.peer("b").counters.rx_packets >= 3);
    let (sent, got, out) = a.ping6(&fx.mesh().to_string(), 2);
    assert_eq!((sent, got), (2, 2), "x's mesh address:\n{out}");

    let (rules, table) = exit_state(&a);
    assert_eq!(rules.len(), 4, "two rules per family: {rules:#?}");
    assert!(table.contains("default dev veil0"), "{table}");

    // Stopped: nothing left, and a's own default route is back in force.
    da.stop();
    assert_eq!(exit_state(&a), (vec![], String::new()));
    let (_, got, _) = internet();
    assert_eq!(got, 0, "without the exit, 203.0.113.5 is out of reach");

    // Killed: the next start clears what the crash left and works again.
    let mut crashed = Daemon::start(&a, &fa);
    let (_, got, _) = internet();
    assert_eq!(got, 3);
    let _ = crashed.stop_hard();
    let (rules, _) = exit_state(&a);
    assert_eq!(rules.len(), 4, "a crash leaves the rules: {rules:#?}");
    let mut again = Daemon::start(&a, &fa);
    let (rules, _) = exit_state(&a);
    assert_eq!(rules.len(), 4, "no duplicates after a crash: {rules:#?}");
    let (_, got, out) = internet();
    assert_eq!(got, 3, "{out}\n{}", again.log_text());
    again.stop();
    assert_eq!(exit_state(&a), (vec![], String::new()));
}
