//! A stock WireGuard peer (Debian's wireguard-go, configured with `wg`) as
//! a UDP-only leaf of a veilmesh node, as a phone would be. Needs root.

mod common;

use std::time::Duration;

use common::*;

/// wireguard-go's interface in `ns`, killed (by PID) when dropped.
struct WireguardGo {
    _child: ChildGuard,
}

impl WireguardGo {
    fn start(ns: &Netns, name: &str) -> WireguardGo {
        let child = ChildGuard(
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns.name, "wireguard-go", "-f", name])
                .env("WG_PROCESS_FOREGROUND", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("wireguard-go (apt install wireguard-go)"),
        );
        for _ in 0..50 {
            if ns.has_link(name) {
                return WireguardGo { _child: child };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("wireguard-go made no {name}");
    }
}

#[test]
fn a_stock_wireguard_peer_is_a_udp_leaf() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (v, w) = veth_pair("wgl");
    let fv = NodeFiles::new(dir.path(), "v");
    // The leaf's key: a WireGuard key is a veilmesh key.
    let fw = NodeFiles::new(dir.path(), "w");
    let leaf = fw.peer_block("phone", None, &["10.77.0.2/32"]) + "transports = [\"udp\"]\n";
    fv.write_config("addresses = [\"10.77.0.1/24\"]", &leaf);
    let mut dv = Daemon::start(&v, &fv);

    let _wg = WireguardGo::start(&w, "wgleaf0");
    let key_file = dir.path().join("w.key");
    std::fs::write(&key_file, fw.key.to_base64()).unwrap();
    w.exec(&[
        "wg",
        "set",
        "wgleaf0",
        "private-key",
        key_file.to_str().unwrap(),
        "peer",
        &fv.public(),
        "endpoint",
        "198.18.0.1:51820",
        "allowed-ips",
        &format!("10.77.0.1/32,{}/128", fv.mesh()),
        "persistent-keepalive",
        "25",
    ]);
    let w_mesh = fw.mesh().to_string();
    w.ip(&["addr", "add", "10.77.0.2/24", "dev", "wgleaf0"]);
    w.ip(&["addr", "add", &format!("{w_mesh}/128"), "dev", "wgleaf0"]);
    w.ip(&["link", "set", "wgleaf0", "mtu", "1420", "up"]);
    w.ip(&[
        "route",
        "add",
        &format!("{}/128", fv.mesh()),
        "dev",
        "wgleaf0",
    ]);

    // The leaf reaches the node (v4 and its mesh address), and back.
    let (_, got, out) = w.ping(&["-c", "3", "-i", "0.2", "-W", "2", "10.77.0.1"]);
    assert_eq!(got, 3, "leaf -> node over IPv4:\n{out}");
    let (_, got, out) = w.ping6(&fv.mesh().to_string(), 3);
    assert_eq!(got, 3, "leaf -> node's mesh address:\n{out}");
    let (_, got, out) = v.ping(&["-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"]);
    assert_eq!(got, 3, "node -> leaf over IPv4:\n{out}");
    let (_, got, out) = v.ping6(&w_mesh, 3);
    assert_eq!(got, 3, "node -> leaf's mesh address:\n{out}");

    // Traffic keeps flowing although the leaf never answers veilmesh's
    // path probes, and they cause no warnings.
    let before = w.link_stat("wgleaf0", "rx_packets");
    let (_, got, out) = v.ping(&["-c", "40", "-i", "0.25", "-W", "2", "10.77.0.2"]);
    assert!(got >= 39, "node -> leaf over 10 s:\n{out}");
    let extra = w.link_stat("wgleaf0", "rx_packets") - before - u64::from(got);
    println!("the leaf got {extra} packets besides 40 pings in 10 s (probes, announcements)");
    // Keepalive-rate probes (every 15 s), not one a second: it never
    // answers them, and that says nothing of the path.
    assert!(extra <= 2, "{extra} extra packets to the leaf in 10 s");
    let to_leaf = dv.peer("phone");
    assert!(
        to_leaf
            .path
            .as_deref()
            .is_some_and(|p| p.starts_with("udp ")),
        "{to_leaf:?}"
    );
    assert_eq!(to_leaf.counters.bad_packet, 0, "{:?}", to_leaf.counters);
    // A stock client never answers veilmesh's probes: ping says so.
    let (ok, out) = veilmesh_ping(&fv, "phone", &["--timeout", "0.5"]);
    assert!(
        !ok && out.contains("no answer from phone over udp"),
        "{out}"
    );
    assert!(dv.stop().success());
    let log = dv.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "warnings:\n{}", warnings.join("\n"));
}
