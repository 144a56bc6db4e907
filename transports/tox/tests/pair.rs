//! Two real c-toxcore instances in a private network namespace (loopback
//! only, LAN discovery off): friends by Tox ID, datagrams both ways, a
//! foreign friend request ignored, the Tox ID kept across a restart.
//! Needs root (for the namespace).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use veilmesh_tox::{FriendState, ToxConfig, ToxId, ToxTransport};
use veilmesh_transport::{Contact, PeerAddr, Transport};

/// Moves this test's thread (and the threads it starts) into a fresh
/// network namespace with only loopback up. It vanishes with the thread.
fn private_network() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root for a network namespace"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(up.success());
}

/// A Tox transport with `state`, befriending `friends`.
fn start(
    state: &Path,
    ports: (u16, u16),
    friends: &[ToxId],
    bootstrap: Vec<veilmesh_tox::ToxNode>,
) -> ToxTransport {
    let config = ToxConfig {
        state_file: state.to_owned(),
        udp: true,
        local_discovery: false,
        port_range: ports,
        relay_port: 0,
        bootstrap,
        tcp_relays: vec![],
    };
    ToxTransport::start(config, &contacts(friends)).unwrap()
}

fn contacts(friends: &[ToxId]) -> Vec<Contact> {
    friends.iter().copied().map(Contact::Tox).collect()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Sends until the other side receives (lossy packets may be lost while a
/// path settles); returns what arrived and from whom.
fn exchange(from: &mut ToxTransport, to: &mut ToxTransport, payload: &[u8]) -> (PeerAddr, Vec<u8>) {
    let dest = PeerAddr::Tox(to.info().id.public_key());
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    loop {
        from.send(&dest, payload).expect("send");
        std::thread::sleep(Duration::from_millis(20));
        if let Some(got) = to.try_recv(&mut buf).unwrap() {
            return (got.from, buf[..got.len].to_vec());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no datagram arrived"
        );
    }
}

#[test]
fn two_nodes_exchange_datagrams_and_ignore_strangers() {
    private_network();
    let dir = tempfile::tempdir().unwrap();
    let (state_a, state_b, state_c) = (
        dir.path().join("a.tox"),
        dir.path().join("b.tox"),
        dir.path().join("c.tox"),
    );

    // First runs create the identities (the configs need each other's IDs).
    let id_a = start(&state_a, (33445, 33454), &[], vec![]).info().id;
    let id_b = start(&state_b, (33455, 33464), &[], vec![]).info().id;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state_a).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let mut a = start(&state_a, (33445, 33454), &[id_b], vec![]);
    assert_eq!(a.info().id, id_a, "the Tox ID must survive a restart");
    let node_a = a.info().as_node("127.0.0.1").unwrap();
    let mut b = start(&state_b, (33455, 33464), &[id_a], vec![node_a.clone()]);
    let started = Instant::now();
    let pk_a = id_a.public_key();
    let pk_b = id_b.public_key();
    wait_for("friend connection", Duration::from_secs(60), || {
        a.friend_state(&pk_b) != FriendState::None && b.friend_state(&pk_a) != FriendState::None
    });
    println!(
        "friend connection after {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        a.friend_state(&pk_b)
    );

    let (from, data) = exchange(&mut a, &mut b, b"noise message a->b");
    assert_eq!(
        (from, data.as_slice()),
        (PeerAddr::Tox(pk_a), &b"noise message a->b"[..])
    );
    let big = vec![0x5a; veilmesh_tox::MAX_DATAGRAM];
    let (from, data) = exchange(&mut b, &mut a, &big);
    assert_eq!((from, data), (PeerAddr::Tox(pk_b), big));
    let too_big = vec![0u8; veilmesh_tox::MAX_DATAGRAM + 1];
    assert!(a.send(&PeerAddr::Tox(pk_b), &too_big).is_err());

    // A stranger (not configured at a) asks to be a's friend: ignored, counted.
    let c = start(&state_c, (33465, 33474), &[id_a], vec![node_a]);
    wait_for("the stranger's request", Duration::from_secs(60), || {
        a.counters().ignored_friend_requests >= 1
    });
    assert_eq!(c.friend_state(&pk_a), FriendState::None);
    println!("{}", a.describe());

    // Once a's config lists c (a reload), c becomes a friend after all.
    let pk_c = c.info().id.public_key();
    a.reconfigure(&contacts(&[id_b, c.info().id]));
    let took = wait_for(
        "the friend added at runtime",
        Duration::from_secs(60),
        || a.friend_state(&pk_c) != FriendState::None && c.friend_state(&pk_a) != FriendState::None,
    );
    println!(
        "friend added by reconfigure connected after {:.1} s",
        took.as_secs_f64()
    );

    // b leaves a's config: a deletes the friend, and nothing b sends gets
    // through any more (a friend connection shows a's IP to b).
    a.reconfigure(&contacts(&[c.info().id]));
    wait_for("b's deletion", Duration::from_secs(5), || {
        a.counters().friends_deleted == 1
    });
    assert_eq!(a.friend_state(&pk_b), FriendState::None);
    let to_a = PeerAddr::Tox(pk_a);
    let mut buf = vec![0u8; 2048];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let _ = b.send(&to_a, b"from a removed peer");
        std::thread::sleep(Duration::from_millis(20));
        while let Some(got) = a.try_recv(&mut buf).unwrap() {
            assert_ne!(
                got.from,
                PeerAddr::Tox(pk_b),
                "a removed friend still reaches a"
            );
        }
    }
    // The deletion was saved: a restart with the same config deletes
    // nothing; one with no peers at all deletes c from the saved state.
    drop(a);
    let a = start(&state_a, (33445, 33454), &[c.info().id], vec![]);
    assert_eq!(a.counters().friends_deleted, 0, "{}", a.describe());
    drop(a);
    let a = start(&state_a, (33445, 33454), &[], vec![]);
    assert_eq!(a.counters().friends_deleted, 1, "{}", a.describe());
    println!("{}", a.describe());
}
