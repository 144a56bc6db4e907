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
