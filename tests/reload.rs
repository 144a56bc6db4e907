//! Config reload while traffic flows. Needs root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};

#[test]
fn reload_adds_and_removes_peers_without_disturbing_the_others() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let mut br = Bridge::new("rl-br");
    let (a, b, c) = (Netns::new("rl-a"), Netns::new("rl-b"), Netns::new("rl-c"));
    br.attach(&a, "198.18.0.1/24");
    br.attach(&b, "198.18.0.2/24");
    br.attach(&c, "198.18.0.3/24");
    let (fa, fb, fc) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
        NodeFiles::new(dir.path(), "c"),
    );
    let a_with_b = fb.peer_block("b", Some("198.18.0.2:51820"), &[]);
    fa.write_config("", &a_with_b);
    fb.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));
    fc.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));
    let da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);
    let _dc = Daemon::start(&c, &fc);

    let b_mesh = fb.mesh().to_string();
    let (_, got, out) = a.ping(&["-6", "-c", "1", "-W", "2", &b_mesh]);
    assert_eq!(got, 1, "a -> b before reload:\n{out}");
    // Before the reload a does not know c.
    let (_, got, _) = a.ping(&["-6", "-c", "1", "-W", "1", &fc.mesh().to_string()]);
    assert_eq!(got, 0);

    // 80 pings over 4 s to b, while c is added, a bad config is refused and
    // c is removed again.
    let ping_b = a.spawn(&[
        "ping", "-n", "-6", "-c", "80", "-i", "0.05", "-W", "2", &b_mesh,
    ]);
    std::thread::sleep(Duration::from_millis(500));

    fa.write_config(
        "",
        &(a_with_b.clone() + &fc.peer_block("c", Some("198.18.0.3:51820"), &[])),
    );
    let out = run(&[BIN, "reload", "--socket", fa.socket.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("1 added"),
        "reload: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent, got, out) = a.ping6(&fc.mesh().to_string(), 3);
    assert_eq!((sent, got), (3, 3), "a -> c after reload:\n{out}");

    std::fs::write(&fa.config, "[interface]\nprivate_key = \"garbage\"\n").unwrap();
    let out = run(&[BIN, "reload", "--socket", fa.socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: interface.private_key", fa.config.display())),
        "{err}"
    );
    assert_eq!(
        da.show().node.peers.len(),
        2,
        "a refused config must leave the running one"
    );

    // SIGHUP does the same as `veilmesh reload`: c goes away.
    fa.write_config("", &a_with_b);
    kill(da.pid(), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while da.show().node.peers.len() != 1 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not remove c:\n{}",
            da.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, got, _) = a.ping(&["-6", "-c", "1", "-W", "1", &fc.mesh().to_string()]);
    assert_eq!(got, 0, "c is still reachable after its removal");

    let (sent, got, out) = ping_result(ping_b.wait_with_output().unwrap());
    assert_eq!(
        (sent, got),
        (80, 80),
        "pings to b lost during reloads:\n{out}"
    );
    println!("ping a -> b during three reloads: {got}/{sent}");
}

/// Host names in a reloaded config are resolved off the event loop: a DNS
/// server that never answers holds up the reload, not the traffic.
#[test]
fn a_name_that_takes_long_to_resolve_does_not_stall_traffic() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = veth_pair("dn");
    // a's resolver: an address on its own link where nothing answers.
    let hosts_a = NetnsHosts::new(&a);
    let resolv = hosts_a.file.with_file_name("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 198.18.0.99\noptions timeout:5 attempts:1\n",
    )
    .unwrap();
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    let a_with_b = fb.peer_block("b", Some("198.18.0.2:51820"), &[]);
    fa.write_config("", &a_with_b);
    fb.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));
    let da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);
    let b_mesh = fb.mesh().to_string();
    let (_, got, out) = a.ping6(&b_mesh, 1);
    assert_eq!(got, 1, "{out}");

    let stranger = NodeFiles::new(dir.path(), "c").public();
    fa.write_config(
        "",
        &format!(
            "{a_with_b}[[peer]]\nname = \"c\"\npublic_key = \"{stranger}\"\nendpoint = \"c.slow.invalid:51820\"\n"
        ),
    );
    let pings = a.spawn(&[
        "ping", "-n", "-6", "-c", "25", "-i", "0.2", "-W", "1", &b_mesh,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    // The client reads the file itself: no name is resolved on its side.
    let out = reload_config(&fa.config, &fa.socket);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("resolve"), "{err}");
    let (sent, got, text) = ping_result(pings.wait_with_output().unwrap());
    let max_ms: f64 = text
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::MAX);
    println!(
        "reload with an unresolvable name took {:.1} s; pings meanwhile {got}/{sent}, max RTT {max_ms} ms",
        took.as_secs_f64()
    );
    assert!(
        took >= Duration::from_secs(2),
        "the name was not slow: {took:?}"
    );
    assert_eq!((sent, got), (25, 25), "{text}\n{}", da.log_text());
    assert!(max_ms < 500.0, "the event loop stalled: {text}");
}
