//! `veilmesh netcheck` on a node whose I2P router is not there. Needs root.

mod common;

use common::*;

#[test]
fn netcheck_says_what_works_and_fails_when_a_transport_is_down() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = veth_pair("nck");
    let fa = NodeFiles::new(dir.path(), "a");
    // Nothing listens on the SAM port: the daemon runs, I2P stays down.
    let i2p = format!(
        "[i2p]\nenabled = true\nsam = [\"127.0.0.1:7656\"]\nkey_file = \"{}\"\n",
        fa.dir.join("veil0.i2p").display()
    );
    // A UDP peer, so the node binds its UDP socket.
    let fb = NodeFiles::new(dir.path(), "b");
    let udp_peer = fb.peer_block("b", Some("198.18.0.2:51820"), &[]);
    fa.write_config("listen_port = 51820", &(udp_peer + &i2p));
    let _da = Daemon::start(&a, &fa);
    let socket = fa.socket.to_str().unwrap();

    let out = run(&[BIN, "netcheck", "--socket", socket]);
    let (_, text) = success_and_text(&out);
    assert_eq!(out.status.code(), Some(1), "a transport is down:\n{text}");
    assert!(
        text.contains("udp: up\n  bound on 0.0.0.0:51820")
            || text.contains("udp: up\n  bound on [::]:51820"),
        "{text}"
    );
    assert!(text.contains("i2p: DOWN\n"), "{text}");
    assert!(
        text.contains("127.0.0.1:7656"),
        "the facts name the bridge:\n{text}"
    );

    let out = run(&[BIN, "netcheck", "--socket", socket, "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("netcheck --json");
    let up: Vec<(String, bool)> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["transport"].as_str().unwrap().to_owned(),
                c["up"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(up, [("udp".to_owned(), true), ("i2p".to_owned(), false)]);
}
