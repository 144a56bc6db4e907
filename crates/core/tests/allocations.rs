//! The data path allocates nothing per packet: once a session is up and
//! the buffers exist, sealing a stream of TUN packets into runs and
//! decrypting them at the peer makes no heap allocation at all. Counted
//! by a global allocator that this test binary alone installs, on the
//! test's own thread only: the test harness's thread allocates when it
//! starts waiting for the result, which may fall inside the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use veilmesh_core::batch::{Run, TunBatchOutput, TunSink, TxBatch};
use veilmesh_core::identity::PrivateKey;
use veilmesh_core::{FromNetwork, FromTun, Node, PeerSpec, BUFFER_SIZE};
use veilmesh_transport::{DatagramLimits, PeerAddr, TransportKind};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    // try_with: the allocator may run while thread-locals are torn down.
    if COUNTED_THREAD.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call goes straight to the system allocator; only a
// counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const LIMITS: DatagramLimits = DatagramLimits {
    unfragmented: 1452,
    absolute: 65_507,
};

/// Runs kept in one preallocated buffer, as a send would hand them on.
struct Wire {
    bytes: Vec<u8>,
    /// (start, end, segment) of each run in `bytes`.
    runs: Vec<(usize, usize, usize)>,
}

impl TunBatchOutput for Wire {
    fn limits(&self, _to: &PeerAddr) -> DatagramLimits {
        LIMITS
    }
    fn send(&mut self, run: Run<'_>) -> bool {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(run.datagrams);
        self.runs.push((start, self.bytes.len(), run.segment));
        true
    }
    fn reply(&mut self, _packet: &[u8]) {}
}

/// A TUN that takes packets into one reused buffer and counts them.
struct Tun {
    space: Vec<u8>,
    delivered: usize,
}

impl TunSink for Tun {
    fn space(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.space)
    }
    fn commit(&mut self, _len: usize) {
        self.delivered += 1;
    }
}

fn spec(name: &str, key: &PrivateKey, endpoint: Option<SocketAddr>) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        public_key: key.public_key(),
        allowed_ips: vec![],
        paths: endpoint.map(PeerAddr::Udp).into_iter().collect(),
        transports: vec![TransportKind::Udp],
        persistent_keepalive: None,
        allowed_destinations: None,
        accept: None,
        relay: false,
    }
}

fn echo(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 48 + payload];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    p[6] = 58;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40] = 128;
    p
}

#[test]
fn a_stream_of_packets_allocates_nothing_once_the_session_is_up() {
    let now = Instant::now();
    let (ka, kb) = (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
    );
    let (addr_a, addr_b): (SocketAddr, SocketAddr) = (
        "198.18.0.1:51820".parse().unwrap(),
        "198.18.0.2:51820".parse().unwrap(),
    );
    let mut a = Node::new(&ka, vec![spec("b", &kb, Some(addr_b))], now).unwrap();
    let mut b = Node::new(&kb, vec![spec("a", &ka, Some(addr_a))], now).unwrap();
    let (from_a, from_b) = (PeerAddr::Udp(addr_a), PeerAddr::Udp(addr_b));
    let (mesh_a, mesh_b) = (
        ka.public_key().mesh_address(),
        kb.public_key().mesh_address(),
    );
    // The handshake, and a first packet each way.
    let mut out = vec![0u8; BUFFER_SIZE];
    let mut scratch = vec![0u8; BUFFER_SIZE];
    let first = echo(mesh_a, mesh_b, 64);
    let FromTun::Send { datagram, .. } = a.handle_tun_packet(&first, |_| LIMITS, &mut out, now)
    else {
        panic!("a sends its initiation");
    };
    let init = datagram.to_vec();
    b.handle_datagram(&from_a, &init, &mut scratch, now);
    for _ in 0..10 {
        while let Some(t) = b.poll_transmit() {
            a.handle_datagram(&from_b, &t.payload, &mut scratch, now);
        }
        while let Some(t) = a.poll_transmit() {
            b.handle_datagram(&from_a, &t.payload, &mut scratch, now);
        }
    }
    // Buffers the daemon keeps for good: made once, before counting.
    // TCP-like: full-size packets, every 40th a short one.
    let packets: Vec<Vec<u8>> = (0..1000)
        .map(|i| echo(mesh_a, mesh_b, if i % 40 == 39 { 200 } else { 1340 }))
        .collect();
    let mut tx = TxBatch::new();
    let mut wire = Wire {
        bytes: Vec::with_capacity(2_000_000),
        runs: Vec::with_capacity(1000),
    };
    let mut tun = Tun {
        space: vec![0u8; BUFFER_SIZE],
        delivered: 0,
    };
    // One warm-up round: lazily made state (paths, counters) settles.
    a.handle_tun_batch(
        packets[..10].iter().map(Vec::as_slice),
        &mut tx,
        &mut wire,
        now,
    );
    a.flush_tun_batch(&mut tx, &mut wire);
    wire.bytes.clear();
    wire.runs.clear();

    COUNTED_THREAD.with(|c| c.set(true));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for chunk in packets.chunks(46) {
        a.handle_tun_batch(chunk.iter().map(Vec::as_slice), &mut tx, &mut wire, now);
    }
    a.flush_tun_batch(&mut tx, &mut wire);
    for &(start, end, segment) in &wire.runs {
        let mut datagrams = wire.bytes[start..end].chunks(segment);
        assert!(b.handle_datagram_batch(&from_a, &mut datagrams, &mut tun, now));
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    COUNTED_THREAD.with(|c| c.set(false));

    assert_eq!(tun.delivered, packets.len(), "every packet arrived");
    println!("{} packets in {} runs", packets.len(), wire.runs.len());
    assert!(
        wire.runs.len() < packets.len() / 2,
        "{} runs",
        wire.runs.len()
    );
    assert_eq!(allocated, 0, "allocations for {} packets", packets.len());
    // Keep the compiler from reasoning the work away.
    assert!(matches!(
        b.handle_datagram(&from_a, b"garbage", &mut scratch, now),
        FromNetwork::Dropped(_)
    ));
}
