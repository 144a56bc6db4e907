//! Two real c-toxcore instances in a private network namespace (loopback
//! only, LAN discovery off): friends by Tox ID, datagrams both ways, a
//! foreign friend request ignored, the Tox ID kept across a restart. The
//! transports run on one event loop, as in the daemon.
//! Needs root (for the namespace).

use std::path::Path;
use std::process::Command;
use std::task::Poll;
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

/// What each transport received, by position.
type Inboxes = Vec<Vec<(PeerAddr, Vec<u8>)>>;

/// The test's event loop: the transports run (toxcore iterates, on its
/// socket's readiness and its timer) only while this turns, for `d`.
async fn turn(ts: &mut [&mut ToxTransport], d: Duration) -> Inboxes {
    let mut got: Inboxes = vec![Vec::new(); ts.len()];
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let step = std::future::poll_fn(|cx| {
            for (i, t) in ts.iter_mut().enumerate() {
                if let Poll::Ready(received) = t.poll_recv(cx, &mut buf) {
                    let received = received.expect("poll_recv");
                    got[i].push((received.from, buf[..received.len].to_vec()));
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        });
        if tokio::time::timeout_at(deadline, step).await.is_err() {
            return got;
        }
    }
}

/// Turns the loop until `done` says so.
async fn wait_for(
    what: &str,
    timeout: Duration,
    ts: &mut [&mut ToxTransport],
    mut done: impl FnMut(&[&mut ToxTransport]) -> bool,
) -> Duration {
    let start = Instant::now();
    while !done(ts) {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        turn(ts, Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Sends from `ts[0]` until `ts[1]` receives (lossy packets may be lost
/// while a path settles); returns what arrived and from whom.
async fn exchange(ts: &mut [&mut ToxTransport; 2], payload: &[u8]) -> (PeerAddr, Vec<u8>) {
    let dest = PeerAddr::Tox(ts[1].info().id.public_key());
    let start = Instant::now();
    loop {
        ts[0].send(&dest, payload).expect("send");
        let mut got = turn(ts, Duration::from_millis(20)).await;
        if let Some(first) = got[1].drain(..).next() {
            return first;
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
    // One event loop for all, as in the daemon: on this thread, in the
    // private network.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(exchange_and_ignore_strangers());
}

async fn exchange_and_ignore_strangers() {
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
    wait_for(
        "friend connection",
        Duration::from_secs(60),
        &mut [&mut a, &mut b],
        |t| {
            t[0].friend_state(&pk_b) != FriendState::None
                && t[1].friend_state(&pk_a) != FriendState::None
        },
    )
    .await;
    println!(
        "friend connection after {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        a.friend_state(&pk_b)
    );

    let (from, data) = exchange(&mut [&mut a, &mut b], b"noise message a->b").await;
    assert_eq!(
        (from, data.as_slice()),
        (PeerAddr::Tox(pk_a), &b"noise message a->b"[..])
    );
    let big = vec![0x5a; veilmesh_tox::MAX_DATAGRAM];
    let (from, data) = exchange(&mut [&mut b, &mut a], &big).await;
    assert_eq!((from, data), (PeerAddr::Tox(pk_b), big));
    let too_big = vec![0u8; veilmesh_tox::MAX_DATAGRAM + 1];
    assert!(a.send(&PeerAddr::Tox(pk_b), &too_big).is_err());

    // A stranger (not configured at a) asks to be a's friend: ignored, counted.
    let mut c = start(&state_c, (33465, 33474), &[id_a], vec![node_a]);
    wait_for(
        "the stranger's request",
        Duration::from_secs(60),
        &mut [&mut a, &mut b, &mut c],
        |t| t[0].counters().ignored_friend_requests >= 1,
    )
    .await;
    assert_eq!(c.friend_state(&pk_a), FriendState::None);
    println!("{}", a.describe());

    // Once a's config lists c (a reload), c becomes a friend after all.
    let pk_c = c.info().id.public_key();
    a.reconfigure(&contacts(&[id_b, c.info().id]));
    let took = wait_for(
        "the friend added at runtime",
        Duration::from_secs(60),
        &mut [&mut a, &mut b, &mut c],
        |t| {
            t[0].friend_state(&pk_c) != FriendState::None
                && t[2].friend_state(&pk_a) != FriendState::None
        },
    )
    .await;
    println!(
        "friend added by reconfigure connected after {:.1} s",
        took.as_secs_f64()
    );

    // b leaves a's config: a deletes the friend, and nothing b sends gets
    // through any more (a friend connection shows a's IP to b).
    a.reconfigure(&contacts(&[c.info().id]));
    wait_for(
        "b's deletion",
        Duration::from_secs(5),
        &mut [&mut a, &mut b, &mut c],
        |t| t[0].counters().friends_deleted == 1,
    )
    .await;
    assert_eq!(a.friend_state(&pk_b), FriendState::None);
    let to_a = PeerAddr::Tox(pk_a);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let _ = b.send(&to_a, b"from a removed peer");
        let got = turn(&mut [&mut a, &mut b, &mut c], Duration::from_millis(20)).await;
        assert!(
            got[0].iter().all(|(from, _)| *from != PeerAddr::Tox(pk_b)),
            "a removed friend still reaches a"
        );
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
