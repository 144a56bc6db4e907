//! The event loop in-process and without root: two daemons, each on a
//! thread of its own, their TUNs in memory (`netdev::Tun`), UDP between
//! them over loopback. A packet written to one TUN comes out of the other;
//! an answer goes back; a packet nobody owns gets its ICMP error; `show`
//! answers on the control socket; both stop cleanly.

mod common;

use std::io;
use std::net::{Ipv6Addr, UdpSocket};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::NodeFiles;
use tokio::sync::{mpsc, oneshot};
use veilmesh::config::Config;
use veilmesh::netdev::Tun;

/// A TUN whose packets are a test's: what the test puts in, the daemon
/// reads; what the daemon writes, the test takes out.
struct MemoryTun {
    name: String,
    to_daemon: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    /// A packet `readable` took off the channel, for `try_recv`.
    waiting: Mutex<Option<Vec<u8>>>,
    from_daemon: mpsc::UnboundedSender<Vec<u8>>,
}

/// The test's side of a `MemoryTun`.
struct Host {
    to_daemon: mpsc::UnboundedSender<Vec<u8>>,
    from_daemon: mpsc::UnboundedReceiver<Vec<u8>>,
}

fn memory_tun() -> (MemoryTun, Host) {
    let (to_daemon, daemon_reads) = mpsc::unbounded_channel();
    let (daemon_writes, from_daemon) = mpsc::unbounded_channel();
    let tun = MemoryTun {
        name: "mem0".into(),
        to_daemon: tokio::sync::Mutex::new(daemon_reads),
        waiting: Mutex::new(None),
        from_daemon: daemon_writes,
    };
    (
        tun,
        Host {
            to_daemon,
            from_daemon,
        },
    )
}

impl Tun for MemoryTun {
    fn name(&self) -> &str {
        &self.name
    }

    async fn readable(&self) -> io::Result<()> {
        if self.waiting.lock().unwrap().is_some() {
            return Ok(());
        }
        // Cancel safe: a packet is either still in the channel or waiting.
        match self.to_daemon.lock().await.recv().await {
            Some(packet) => {
                *self.waiting.lock().unwrap() = Some(packet);
                Ok(())
            }
            None => std::future::pending().await,
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let packet = self.waiting.lock().unwrap().take().or_else(|| {
            let mut channel = self.to_daemon.try_lock().ok()?;
            channel.try_recv().ok()
        });
        let Some(packet) = packet else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        buf[..packet.len()].copy_from_slice(&packet);
        Ok(packet.len())
    }

    async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        let _ = self.from_daemon.send(packet.to_vec());
        Ok(packet.len())
    }

    fn sync_routes(&mut self, _wanted: Vec<ipnet::IpNet>) -> anyhow::Result<()> {
        Ok(())
    }
}

impl Host {
    /// The next packet the daemon writes, within `limit`.
    fn next(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            match self.from_daemon.try_recv() {
                Ok(packet) => return Some(packet),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A daemon on a thread of its own, on `tun`, until `stop` is sent.
struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    fn start(config: &Path, tun: MemoryTun) -> InProcess {
        let config = Config::load(config).expect("config");
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(veilmesh::daemon::run_with(config, |_, _| Ok(tun), async {
                let _ = stopped.await;
            }))
        });
        InProcess {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.thread.take().unwrap().join().expect("daemon thread")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A loopback UDP port free a moment ago.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An ICMPv6 echo request (type 128) or reply (129) with `payload` bytes.
fn echo(kind: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[58, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(&[kind, 0, 0, 0, 0x12, 0x34, 0, 1]);
    packet.extend_from_slice(payload);
    packet
}

#[test]
fn packets_cross_two_in_process_daemons_over_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    let (port_a, port_b) = (free_port(), free_port());
    fa.write_config(
        &format!("listen_port = {port_a}"),
        &fb.peer_block("b", Some(&format!("127.0.0.1:{port_b}")), &[]),
    );
    fb.write_config(
        &format!("listen_port = {port_b}"),
        &fa.peer_block("a", Some(&format!("127.0.0.1:{port_a}")), &[]),
    );
    let (tun_a, mut host_a) = memory_tun();
    let (tun_b, mut host_b) = memory_tun();
    let da = InProcess::start(&fa.config, tun_a);
    let db = InProcess::start(&fb.config, tun_b);

    // The first packet waits for the handshake, then arrives unchanged.
    let request = echo(128, fa.mesh(), fb.mesh(), b"in-process ping");
    host_a.to_daemon.send(request.clone()).unwrap();
    let got = host_b.next(Duration::from_secs(10));
    assert_eq!(got.as_deref(), Some(&request[..]), "a -> b");
    let reply = echo(129, fb.mesh(), fa.mesh(), b"in-process ping");
    host_b.to_daemon.send(reply.clone()).unwrap();
    assert_eq!(
        host_a.next(Duration::from_secs(5)).as_deref(),
        Some(&reply[..]),
        "b -> a"
    );

    // A mesh address no peer owns: ICMPv6 destination unreachable (type
    // 1) back into a's TUN, addressed to the sender.
    let nobody: Ipv6Addr = "fd60:db4d:ddb5::1234".parse().unwrap();
    host_a
        .to_daemon
        .send(echo(128, fa.mesh(), nobody, b"x"))
        .unwrap();
    let error = host_a
        .next(Duration::from_secs(5))
        .expect("an ICMPv6 error");
    assert_eq!((error[6], error[40]), (58, 1), "{error:?}");
    assert_eq!(&error[24..40], &fa.mesh().octets());

    // The control socket answers: b is reached over loopback UDP.
    let status = veilmesh::control::show(&fa.socket).expect("show");
    let b = status.node.peers.iter().find(|p| p.name == "b").unwrap();
    assert_eq!(b.path.as_deref(), Some(&*format!("udp 127.0.0.1:{port_b}")));
    assert!(
        b.counters.tx_packets >= 1 && b.counters.rx_packets >= 1,
        "{:?}",
        b.counters
    );

    da.stop().expect("a stops cleanly");
    db.stop().expect("b stops cleanly");
}
