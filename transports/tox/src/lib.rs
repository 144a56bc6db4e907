//! Tox transport: veilmesh's Noise datagrams travel as Tox lossy custom
//! packets between Tox friends, found through the Tox DHT and onion, over
//! direct UDP or TCP relays.
//!
//! A `Tox` instance must not be used from two threads: one dedicated thread
//! owns it, calls `tox_iterate` as soon as a packet reaches toxcore's UDP
//! socket (see `wake`) and when toxcore asks, and talks to the event loop
//! through bounded channels.

mod ffi;
mod memlock;
mod wake;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::raw::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self as std_mpsc, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tokio_mpsc;
use veilmesh_transport::{
    Contact, DatagramLimits, Health, PeerAddr, Received, SendError, ToxPublicKey, Transport,
    TransportKind,
};
pub use veilmesh_transport::{ToxId, ToxIdError};

const _: () = assert!(ffi::ADDRESS_SIZE == veilmesh_transport::TOX_ID_SIZE);

/// The UDP ports toxcore may bind (its own default range), the first
/// free one taken.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (33445, 33545);

/// The shipped list of public bootstrap nodes (bootstrap-nodes.txt), in
/// the format of a `bootstrap_nodes_file`.
pub const DEFAULT_BOOTSTRAP_NODES: &str = include_str!("../bootstrap-nodes.txt");

/// Lines of a bootstrap nodes file, without blanks and comments.
pub fn node_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// First byte of every veilmesh packet (Tox lossy custom ids are 200-254).
pub const PACKET_ID: u8 = 211;
/// Largest Noise datagram a Tox packet carries: the custom packet limit
/// minus the id byte.
pub const MAX_DATAGRAM: usize = ffi::MAX_CUSTOM_PACKET_SIZE - 1;
/// Datagrams waiting for the Tox thread before the sender sees backpressure.
const QUEUE: usize = 1024;
/// Received packets go to the event loop in batches (one wake-up per
/// `tox_iterate`, not per packet) of at most this many; `QUEUE` packets
/// wait at most, however they are batched.
const MAX_BATCH: usize = 64;

/// A Tox friend's key and one datagram.
type Packet = ([u8; 32], Vec<u8>);
/// `tox_iterate` period while packets flow and the thread cannot wait on
/// where they arrive (a TCP-relayed friend, or toxcore's UDP socket not
/// found): it sees them only when it iterates.
const BUSY_ITERATION: Duration = Duration::from_millis(1);
/// How long traffic keeps the loop in its busy period.
const BUSY_FOR: Duration = Duration::from_secs(1);
const FRIEND_REQUEST_MESSAGE: &[u8] = b"veilmesh";
/// Over a TCP relay, unpaced lossy packets fill the relay connection and
/// toxcore drops the friend: at most this many packets per second...
const TCP_PACKETS_PER_SECOND: f64 = 2000.0;
/// ...with bursts of this many.
const TCP_BURST: f64 = 64.0;
/// After a refused send, skip that friend for a while, doubling up to the
/// maximum; the first successful send resets it.
const BACKOFF_MIN: Duration = Duration::from_millis(2);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// Packets one receive call discards at most (from friends no longer
/// allowed) before it lets the event loop run its timers.
const MAX_DISCARDS_PER_CALL: usize = 64;

/// Pacing and back-off for one friend.
struct Pacer {
    tokens: f64,
    refilled: Instant,
    backoff: Duration,
    paused_until: Instant,
}

impl Pacer {
    fn new(now: Instant) -> Pacer {
        Pacer {
            tokens: TCP_BURST,
            refilled: now,
            backoff: Duration::ZERO,
            paused_until: now,
        }
    }

    /// May a packet go now? Only TCP-relayed friends are rate limited.
    fn admit(&mut self, now: Instant, relayed: bool) -> bool {
        if now < self.paused_until {
            return false;
        }
        if !relayed {
            return true;
        }
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * TCP_PACKETS_PER_SECOND).min(TCP_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn sent(&mut self, ok: bool, now: Instant) {
        if ok {
            self.backoff = Duration::ZERO;
        } else {
            self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            self.paused_until = now + self.backoff;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A DHT bootstrap node or TCP relay: `host:port:dht_public_key_hex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToxNode {
    pub host: String,
    pub port: u16,
    pub public_key: [u8; 32],
}

impl FromStr for ToxNode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.trim().rsplitn(3, ':');
        let (Some(key), Some(port), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("`{text}` is not HOST:PORT:DHT_PUBLIC_KEY"));
        };
        let port = port.parse().map_err(|_| format!("bad port in `{text}`"))?;
        let public_key =
            unhex(key).ok_or_else(|| format!("bad DHT key in `{text}` (64 hex characters)"))?;
        Ok(ToxNode {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            public_key,
        })
    }
}

impl fmt::Display for ToxNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.host, self.port, hex(&self.public_key))
    }
}

/// The `[tox]` settings. The friends are not among them: they come with
/// `start` and `reconfigure`, from the peers allowed Tox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToxConfig {
    /// Keys and friends; created mode 0600 on first run.
    pub state_file: PathBuf,
    pub udp: bool,
    /// LAN discovery broadcasts to 255.255.255.255: off by default.
    pub local_discovery: bool,
    pub port_range: (u16, u16),
    /// >0: also serve as a TCP relay on this port.
    pub relay_port: u16,
    pub bootstrap: Vec<ToxNode>,
    pub tcp_relays: Vec<ToxNode>,
}

/// The Tox IDs among `contacts`: friend requests go to these, and only
/// their keys are accepted as friends.
fn friends_of(contacts: &[Contact]) -> Vec<ToxId> {
    contacts
        .iter()
        .filter_map(|c| match c {
            Contact::Tox(id) => Some(*id),
            _ => None,
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ToxError {
    #[error("Tox state file {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error("cannot start Tox (tox_new error {0}; is the UDP port range free?)")]
    New(c_int),
    #[error("the Tox thread stopped during start-up")]
    ThreadDied,
    #[error("cannot create the Tox thread's eventfd: {0}")]
    EventFd(io::Error),
}

/// Friend connection state, as `veilmesh show` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FriendState {
    None,
    Tcp,
    Udp,
}

impl FriendState {
    fn from_ffi(c: ffi::Tox_Connection) -> FriendState {
        match c {
            ffi::CONNECTION_UDP => FriendState::Udp,
            ffi::CONNECTION_TCP => FriendState::Tcp,
            _ => FriendState::None,
        }
    }
}

impl fmt::Display for FriendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FriendState::None => "none",
            FriendState::Tcp => "TCP",
            FriendState::Udp => "UDP",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToxCounters {
    /// Friend requests from keys that are not configured peers.
    pub ignored_friend_requests: u64,
    /// Lossy packets with another id (not veilmesh's), dropped.
    pub foreign_packets: u64,
    /// Received packets dropped because the event loop fell behind.
    pub inbound_dropped: u64,
    /// Sends toxcore refused (friend offline, queue full).
    pub send_errors: u64,
    /// Packets held back by pacing or back-off on relayed friends.
    pub paced_drops: u64,
    /// Lossy packets from a friend that is not (any more) a configured
    /// peer allowed Tox, dropped.
    pub unallowed_packets: u64,
    /// Friends deleted from toxcore: peers removed from the config or no
    /// longer allowed Tox, also those found in the saved state.
    pub friends_deleted: u64,
}

/// This node on the Tox network.
#[derive(Clone, Debug)]
pub struct ToxInfo {
    pub id: ToxId,
    pub dht_id: [u8; 32],
    pub udp_port: Option<u16>,
    pub tcp_port: Option<u16>,
}

impl ToxInfo {
    /// This node as a bootstrap node for others, at `host`.
    pub fn as_node(&self, host: &str) -> Option<ToxNode> {
        Some(ToxNode {
            host: host.to_owned(),
            port: self.udp_port?,
            public_key: self.dht_id,
        })
    }
}

/// The state shared with the Tox thread; a panic elsewhere leaves it usable.
fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Shared {
    /// Our own connection to the Tox network (the DHT, or a TCP relay).
    network: Option<FriendState>,
    friends: HashMap<[u8; 32], FriendState>,
    /// The keys of the configured peers allowed Tox, as the Tox thread
    /// applies them: packets still on their way from another are dropped.
    allowed: HashSet<[u8; 32]>,
    counters: ToxCounters,
    /// A new friend list for the Tox thread to apply (a reload).
    new_friends: Option<Vec<ToxId>>,
}

impl Shared {
    fn friends_online(&self) -> usize {
        self.friends
            .values()
            .filter(|s| **s != FriendState::None)
            .count()
    }
}

pub struct ToxTransport {
    commands: SyncSender<([u8; 32], Vec<u8>)>,
    inbound: tokio_mpsc::UnboundedReceiver<Vec<Packet>>,
    /// The rest of the batch being delivered.
    pending: std::vec::IntoIter<Packet>,
    /// Received packets not yet delivered (bounded by `QUEUE`).
    inbound_queued: Arc<AtomicUsize>,
    shared: Arc<Mutex<Shared>>,
    /// Wakes the Tox thread when datagrams wait for it.
    bell: Arc<wake::Bell>,
    info: ToxInfo,
    thread: Option<JoinHandle<()>>,
}

impl ToxTransport {
    /// Starts Tox on its own thread and waits until it runs, befriending
    /// the Tox IDs among `contacts` (and deleting any other friend).
    pub fn start(config: ToxConfig, contacts: &[Contact]) -> Result<ToxTransport, ToxError> {
        let friends = friends_of(contacts);
        let state = read_state(&config.state_file)?;
        let (commands, command_rx) = std_mpsc::sync_channel(QUEUE);
        let (inbound_tx, inbound) = tokio_mpsc::unbounded_channel();
        let inbound_queued = Arc::new(AtomicUsize::new(0));
        let thread_queued = inbound_queued.clone();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let bell = Arc::new(wake::Bell::new().map_err(ToxError::EventFd)?);
        let thread_bell = bell.clone();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tox".into())
            .spawn(move || {
                let links = ThreadLinks {
                    commands: command_rx,
                    bell: thread_bell,
                    inbound: inbound_tx,
                    inbound_queued: thread_queued,
                    shared: thread_shared,
                    ready: ready_tx,
                };
                run_tox(config, friends, state, links)
            })
            .map_err(|_| ToxError::ThreadDied)?;
        let info = ready_rx.recv().map_err(|_| ToxError::ThreadDied)??;
        tracing::info!(tox_id = %info.id, udp_port = ?info.udp_port, "tox transport running");
        Ok(ToxTransport {
            commands,
            inbound,
            pending: Vec::new().into_iter(),
            inbound_queued,
            shared,
            bell,
            info,
            thread: Some(thread),
        })
    }

    pub fn info(&self) -> &ToxInfo {
        &self.info
    }

    pub fn friend_state(&self, public_key: &ToxPublicKey) -> FriendState {
        let shared = lock(&self.shared);
        shared
            .friends
            .get(&public_key.0)
            .copied()
            .unwrap_or(FriendState::None)
    }

    pub fn counters(&self) -> ToxCounters {
        lock(&self.shared).counters.clone()
    }
}

impl Drop for ToxTransport {
    fn drop(&mut self) {
        // Closing the command channel tells the thread to save and stop.
        let (closed, _) = std_mpsc::sync_channel(0);
        self.commands = closed;
        self.bell.ring();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Transport for ToxTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tox
    }

    fn limits(&self, _to: &PeerAddr) -> DatagramLimits {
        // Tox neither fragments nor reassembles custom packets.
        DatagramLimits {
            unfragmented: MAX_DATAGRAM,
            absolute: MAX_DATAGRAM,
        }
    }

    fn send(&mut self, to: &PeerAddr, datagram: &[u8]) -> Result<(), SendError> {
        let PeerAddr::Tox(pk) = to else {
            return Err(SendError::WrongTransport(to.clone()));
        };
        if datagram.len() > MAX_DATAGRAM {
            return Err(SendError::TooBig {
                len: datagram.len(),
                max: MAX_DATAGRAM,
            });
        }
        match self.commands.try_send((pk.0, datagram.to_vec())) {
            Ok(()) => {
                self.bell.ring();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(SendError::Backpressure),
            Err(TrySendError::Disconnected(_)) => Err(SendError::NotReady("tox thread stopped")),
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        for _ in 0..MAX_DISCARDS_PER_CALL {
            let Some((pk, data)) = self.pending.next() else {
                match self.inbound.poll_recv(cx) {
                    Poll::Ready(Some(batch)) => self.pending = batch.into_iter(),
                    // The thread is gone (logged there); nothing will come.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
                continue;
            };
            if let Some(received) = self.deliver(pk, &data, buf) {
                return Poll::Ready(Ok(received));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        for _ in 0..MAX_DISCARDS_PER_CALL {
            let Some((pk, data)) = self.pending.next() else {
                match self.inbound.try_recv() {
                    Ok(batch) => self.pending = batch.into_iter(),
                    Err(_) => break,
                }
                continue;
            };
            if let Some(received) = self.deliver(pk, &data, buf) {
                return Ok(Some(received));
            }
        }
        Ok(None)
    }

    fn path_state(&self, to: &PeerAddr) -> Option<String> {
        match to {
            PeerAddr::Tox(pk) => Some(format!("friend {}", self.friend_state(pk))),
            _ => None,
        }
    }

    /// Makes the Tox IDs among `contacts` the friends: new ones get a
    /// friend request, friends not among them are deleted (and the state
    /// saved), and only their keys are accepted from now on. The Tox
    /// thread picks the list up at its next iteration.
    fn reconfigure(&mut self, contacts: &[Contact]) {
        lock(&self.shared).new_friends = Some(friends_of(contacts));
        self.bell.ring();
    }

    fn health(&self) -> Health {
        let shared = lock(&self.shared);
        let network = shared.network.unwrap_or(FriendState::None);
        let online = shared.friends_online();
        let mut facts = vec![match network {
            FriendState::None => "not connected to the Tox network".to_owned(),
            state => format!("connected to the Tox network over {state}"),
        }];
        facts.push(format!("{online}/{} friends online", shared.friends.len()));
        if let Some(port) = self.info.udp_port {
            facts.push(format!("udp port {port}"));
        }
        Health {
            up: network != FriendState::None,
            facts,
        }
    }

    fn describe(&self) -> String {
        let shared = lock(&self.shared);
        let online = shared.friends_online();
        format!(
            "tox ID {} (udp port {}), {online}/{} friends online, {} friend requests ignored, \
             {} friends deleted, {} packets from unallowed friends, {} send errors, {} paced drops, \
             {} received dropped (event loop behind)",
            self.info.id,
            self.info.udp_port.map_or("-".into(), |p| p.to_string()),
            shared.friends.len(),
            shared.counters.ignored_friend_requests,
            shared.counters.friends_deleted,
            shared.counters.unallowed_packets,
            shared.counters.send_errors,
            shared.counters.paced_drops,
            shared.counters.inbound_dropped
        )
    }
}

impl ToxTransport {
    /// A received packet into `buf`, unless its friend is no longer
    /// allowed (deleted while the packet waited in the channel).
    fn deliver(&self, pk: [u8; 32], data: &[u8], buf: &mut [u8]) -> Option<Received> {
        self.inbound_queued.fetch_sub(1, Ordering::Relaxed);
        {
            let mut shared = lock(&self.shared);
            if !shared.allowed.contains(&pk) {
                shared.counters.unallowed_packets += 1;
                return None;
            }
        }
        let target = buf.get_mut(..data.len())?;
        target.copy_from_slice(data);
        Some(Received::one(PeerAddr::Tox(ToxPublicKey(pk)), data.len()))
    }
}

/// The saved state; never through a symbolic link (another instance's
/// user could plant one).
fn read_state(path: &Path) -> Result<Option<Vec<u8>>, ToxError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut file| {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map(|_| bytes)
        });
    match read {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ToxError::State {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What the toxcore callbacks reach through `user_data`.
struct CallbackContext {
    allowed: HashSet<[u8; 32]>,
    /// Friends connected through a TCP relay (paced), as the connection
    /// callbacks said: checked per packet without the shared lock.
    relayed: HashSet<[u8; 32]>,
    /// What this `tox_iterate` received, for the event loop.
    received: Vec<Packet>,
    /// Whether this `tox_iterate` handed a packet over yet. The first goes
    /// at once, not after toxcore's periodic work (DHT, onion, friends)
    /// that follows its reading the socket.
    handed_over: bool,
    inbound: tokio_mpsc::UnboundedSender<Vec<Packet>>,
    /// Received packets the event loop has not taken yet.
    inbound_queued: Arc<AtomicUsize>,
    shared: Arc<Mutex<Shared>>,
    state_changed: bool,
    last_traffic: Instant,
}

impl CallbackContext {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Hands what was received to the event loop in one message.
    fn flush_received(&mut self) {
        if self.received.is_empty() {
            return;
        }
        let count = self.received.len();
        if self.inbound_queued.load(Ordering::Relaxed) + count > QUEUE {
            self.received.clear();
            self.shared().counters.inbound_dropped += count as u64;
            return;
        }
        let batch = std::mem::replace(&mut self.received, Vec::with_capacity(MAX_BATCH));
        self.inbound_queued.fetch_add(count, Ordering::Relaxed);
        if self.inbound.send(batch).is_err() {
            // The transport is gone; the thread stops at its next command.
            self.inbound_queued.fetch_sub(count, Ordering::Relaxed);
        }
    }

    /// Makes `friends` the allowed keys, here and for the event loop.
    fn allow(&mut self, friends: &[ToxId]) {
        self.allowed = friends.iter().map(|id| id.public_key().0).collect();
        let allowed = self.allowed.clone();
        self.shared().allowed = allowed;
    }
}

fn friend_key(tox: *const ffi::Tox, friend: u32) -> Option<[u8; 32]> {
    let mut pk = [0u8; 32];
    let mut err = 0;
    // SAFETY: `tox` is the live instance toxcore passed to the callback; `pk`
    // has room for TOX_PUBLIC_KEY_SIZE bytes.
    let ok = unsafe { ffi::tox_friend_get_public_key(tox, friend, pk.as_mut_ptr(), &mut err) };
    ok.then_some(pk)
}

unsafe extern "C" fn on_friend_request(
    tox: *mut ffi::Tox,
    public_key: *const u8,
    _message: *const u8,
    _length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: user_data is the &mut CallbackContext given to tox_iterate, and
    // public_key points to TOX_PUBLIC_KEY_SIZE bytes (tox.h).
    let (ctx, pk) = unsafe {
        (
            &mut *(user_data as *mut CallbackContext),
            *(public_key as *const [u8; 32]),
        )
    };
    if ctx.allowed.contains(&pk) {
        let mut err = 0;
        // SAFETY: live instance, valid key pointer.
        unsafe { ffi::tox_friend_add_norequest(tox, pk.as_ptr(), &mut err) };
        tracing::info!(key = %hex(&pk[..4]), err, "accepted friend request from a configured peer");
        ctx.state_changed = true;
    } else {
        ctx.shared().counters.ignored_friend_requests += 1;
        tracing::info!(key = %hex(&pk[..4]), "ignored friend request from a key that is not a configured peer");
    }
}

unsafe extern "C" fn on_self_connection(
    _tox: *mut ffi::Tox,
    status: ffi::Tox_Connection,
    user_data: *mut c_void,
) {
    // SAFETY: see on_friend_request.
    let ctx = unsafe { &mut *(user_data as *mut CallbackContext) };
    let state = FriendState::from_ffi(status);
    tracing::info!(%state, "connection to the Tox network");
    ctx.shared().network = Some(state);
}

unsafe extern "C" fn on_friend_connection(
    tox: *mut ffi::Tox,
    friend: u32,
    status: ffi::Tox_Connection,
    user_data: *mut c_void,
) {
    // SAFETY: see on_friend_request.
    let ctx = unsafe { &mut *(user_data as *mut CallbackContext) };
    if let Some(pk) = friend_key(tox, friend) {
        let state = FriendState::from_ffi(status);
        tracing::info!(friend = %hex(&pk[..4]), %state, "tox friend connection");
        if state == FriendState::Tcp {
            ctx.relayed.insert(pk);
        } else {
            ctx.relayed.remove(&pk);
        }
        ctx.shared().friends.insert(pk, state);
    }
}

unsafe extern "C" fn on_lossy_packet(
    tox: *mut ffi::Tox,
    friend: u32,
    data: *const u8,
    length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: see on_friend_request; data points to `length` bytes.
    let (ctx, data) = unsafe {
        (
            &mut *(user_data as *mut CallbackContext),
            std::slice::from_raw_parts(data, length),
        )
    };
    let Some((&PACKET_ID, datagram)) = data.split_first() else {
        ctx.shared().counters.foreign_packets += 1;
        return;
    };
    let Some(pk) = friend_key(tox, friend) else {
        return;
    };
    if !ctx.allowed.contains(&pk) {
        // Deleted at start and on reload; a packet can still be on its way.
        ctx.shared().counters.unallowed_packets += 1;
        return;
    }
    ctx.last_traffic = Instant::now();
    ctx.received.push((pk, datagram.to_vec()));
    if !ctx.handed_over || ctx.received.len() >= MAX_BATCH {
        ctx.flush_received();
        ctx.handed_over = true;
    }
}

/// The Tox thread's ends of what ties it to the transport.
struct ThreadLinks {
    commands: std_mpsc::Receiver<([u8; 32], Vec<u8>)>,
    bell: Arc<wake::Bell>,
    inbound: tokio_mpsc::UnboundedSender<Vec<Packet>>,
    inbound_queued: Arc<AtomicUsize>,
    shared: Arc<Mutex<Shared>>,
    ready: std_mpsc::Sender<Result<ToxInfo, ToxError>>,
}

/// The fallback where the binary does not export memlock.rs's stand-ins:
/// the Tox thread gives up CAP_IPC_LOCK (its own effective set; a daemon
/// that dropped to its user has none) and the process's soft
/// RLIMIT_MEMLOCK becomes 0 (the daemon locks no memory), so toxcore's
/// per-packet mlock fails at once (it ignores that), though the madvise
/// and munlock calls around it stay.
fn forgo_memory_locking() {
    use caps::{CapSet, Capability};
    if let Err(error) = caps::drop(None, CapSet::Effective, Capability::CAP_IPC_LOCK) {
        tracing::debug!(%error, "cannot drop CAP_IPC_LOCK on the Tox thread");
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one live rlimit struct.
    let set = unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 && {
            limit.rlim_cur = 0;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) == 0
        }
    };
    if !set {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot lower RLIMIT_MEMLOCK");
    }
}

/// The Tox thread: owns the instance from `tox_new` to `tox_kill`.
fn run_tox(config: ToxConfig, friends: Vec<ToxId>, state: Option<Vec<u8>>, links: ThreadLinks) {
    let ThreadLinks {
        commands,
        bell,
        inbound,
        inbound_queued,
        shared,
        ready,
    } = links;
    if memlock::in_effect() {
        tracing::debug!("toxcore's per-packet memory locking reaches veilmesh's stand-ins");
    } else {
        tracing::debug!(
            "this binary does not export sodium_mlock: toxcore's calls fail at once instead"
        );
        forgo_memory_locking();
    }
    let tox = match new_tox(&config, state.as_deref()) {
        Ok(tox) => tox,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut ctx = CallbackContext {
        allowed: HashSet::new(),
        relayed: HashSet::new(),
        received: Vec::with_capacity(MAX_BATCH),
        handed_over: false,
        inbound,
        inbound_queued,
        shared,
        state_changed: true,
        last_traffic: Instant::now() - BUSY_FOR,
    };
    ctx.allow(&friends);
    // SAFETY: `tox` stays valid until tox_kill below, and is only used on
    // this thread.
    unsafe {
        ffi::tox_callback_friend_request(tox, on_friend_request);
        ffi::tox_callback_friend_connection_status(tox, on_friend_connection);
        ffi::tox_callback_friend_lossy_packet(tox, on_lossy_packet);
        ffi::tox_callback_self_connection_status(tox, on_self_connection);
    }
    let info = self_info(tox);
    let udp_socket = info.udp_port.and_then(wake::find_udp_socket);
    // Before the first packet: our mark keeps it out of an exit's tunnel.
    if let Some(Err(error)) = udp_socket.map(veilmesh_transport::sockets::mark_new_socket) {
        tracing::debug!(%error, "toxcore's UDP socket not marked");
    }
    connect(tox, &config, &friends, &mut ctx);
    match (info.udp_port, udp_socket) {
        (Some(port), None) => tracing::warn!(
            port,
            "toxcore's UDP socket not found: packets are seen every {} ms while they flow",
            BUSY_ITERATION.as_millis()
        ),
        (Some(port), Some(_)) => tracing::debug!(port, "waiting on toxcore's UDP socket"),
        (None, _) => {}
    }
    let _ = ready.send(Ok(info));

    let mut friend_numbers: HashMap<[u8; 32], u32> = HashMap::new();
    let mut pacers: HashMap<[u8; 32], Pacer> = HashMap::new();
    loop {
        let new_friends = ctx.shared().new_friends.take();
        if let Some(friends) = new_friends {
            ctx.allow(&friends);
            delete_unallowed_friends(tox, &mut ctx);
            // Friend numbers of deleted friends are reused.
            friend_numbers.clear();
            pacers.retain(|pk, _| ctx.allowed.contains(pk));
            add_friends(tox, &friends, &mut ctx);
        }
        ctx.handed_over = false;
        // SAFETY: as above; ctx outlives the call.
        unsafe { ffi::tox_iterate(tox, &mut ctx as *mut CallbackContext as *mut c_void) };
        ctx.flush_received();
        if ctx.state_changed {
            save(tox, &config.state_file);
            ctx.state_changed = false;
        }
        let busy = ctx.last_traffic.elapsed() < BUSY_FOR;
        // Packets from a TCP-relayed friend arrive on connections the
        // thread does not wait on: while traffic flows, it iterates often.
        let polling = busy && (udp_socket.is_none() || !ctx.relayed.is_empty());
        // SAFETY: as above.
        let interval =
            Duration::from_millis(u64::from(unsafe { ffi::tox_iteration_interval(tox) }));
        let wait = if polling {
            interval.min(BUSY_ITERATION)
        } else {
            interval
        };
        let deadline = Instant::now() + wait;
        // Send what is queued; sleep until a packet arrives (iterate at
        // once), the event loop queues more, or the next iteration is due.
        let mut next = None;
        loop {
            loop {
                let command = match next.take() {
                    Some(command) => Ok(command),
                    None => commands.try_recv(),
                };
                match command {
                    Ok((pk, datagram)) => {
                        let now = Instant::now();
                        ctx.last_traffic = now;
                        let relayed = ctx.relayed.contains(&pk);
                        let pacer = pacers.entry(pk).or_insert_with(|| Pacer::new(now));
                        if pacer.admit(now, relayed) {
                            let ok = send_packet(tox, &mut friend_numbers, &ctx, pk, &datagram);
                            pacer.sent(ok, now);
                        } else {
                            ctx.shared().counters.paced_drops += 1;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        save(tox, &config.state_file);
                        // SAFETY: last use of `tox`.
                        unsafe { ffi::tox_kill(tox) };
                        tracing::info!("tox transport stopped");
                        return;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let woken = bell.sleep(udp_socket, left, || match commands.try_recv() {
                Ok(command) => {
                    next = Some(command);
                    true
                }
                Err(TryRecvError::Empty) => false,
                Err(TryRecvError::Disconnected) => true,
            });
            if woken == wake::Woken::Packet {
                break;
            }
        }
    }
}

/// This node's Tox ID, creating the identity (and the state file) if there
/// is none yet. Opens no socket: for writing configs before the first start.
pub fn load_or_create_identity(state_file: &Path) -> Result<ToxId, ToxError> {
    let state = read_state(state_file)?;
    let offline = ToxConfig {
        state_file: state_file.to_owned(),
        udp: false,
        local_discovery: false,
        port_range: (0, 0),
        relay_port: 0,
        bootstrap: vec![],
        tcp_relays: vec![],
    };
    let tox = new_tox(&offline, state.as_deref())?;
    let id = self_info(tox).id;
    if state.is_none() {
        save(tox, state_file);
    }
    // SAFETY: created above on this thread, not used after.
    unsafe { ffi::tox_kill(tox) };
    Ok(id)
}

fn new_tox(config: &ToxConfig, state: Option<&[u8]>) -> Result<*mut ffi::Tox, ToxError> {
    // SAFETY: options are created, filled and freed here; tox_new copies
    // what it needs (including the savedata) before returning.
    unsafe {
        let mut err = 0;
        let options = ffi::tox_options_new(&mut err);
        if options.is_null() {
            return Err(ToxError::New(err));
        }
        ffi::tox_options_set_ipv6_enabled(options, false);
        ffi::tox_options_set_udp_enabled(options, config.udp);
        ffi::tox_options_set_local_discovery_enabled(options, config.local_discovery);
        ffi::tox_options_set_start_port(options, config.port_range.0);
        ffi::tox_options_set_end_port(options, config.port_range.1);
        ffi::tox_options_set_tcp_port(options, config.relay_port);
        if let Some(state) = state {
            ffi::tox_options_set_savedata_type(options, ffi::SAVEDATA_TYPE_TOX_SAVE);
            ffi::tox_options_set_savedata_data(options, state.as_ptr(), state.len());
        }
        let tox = ffi::tox_new(options, &mut err);
        ffi::tox_options_free(options);
        if tox.is_null() || err != ffi::ERR_OK {
            return Err(ToxError::New(err));
        }
        Ok(tox)
    }
}

/// Bootstrap nodes, relays and friend requests to every configured peer;
/// friends in the saved state that are not (any more) are deleted first.
fn connect(tox: *mut ffi::Tox, config: &ToxConfig, friends: &[ToxId], ctx: &mut CallbackContext) {
    bootstrap(tox, config);
    delete_unallowed_friends(tox, ctx);
    add_friends(tox, friends, ctx);
}

/// Deletes every friend whose key is not allowed: a friend connection
/// shows the friend our IP address, and a removed peer must lose it.
fn delete_unallowed_friends(tox: *mut ffi::Tox, ctx: &mut CallbackContext) {
    // SAFETY: live instance; the list has the size toxcore reports.
    let numbers = unsafe {
        let mut numbers = vec![0u32; ffi::tox_self_get_friend_list_size(tox)];
        ffi::tox_self_get_friend_list(tox, numbers.as_mut_ptr());
        numbers
    };
    for number in numbers {
        let Some(pk) = friend_key(tox, number) else {
            continue;
        };
        if ctx.allowed.contains(&pk) {
            continue;
        }
        let mut err = 0;
        // SAFETY: live instance, a friend number toxcore just listed.
        if unsafe { ffi::tox_friend_delete(tox, number, &mut err) } {
            tracing::info!(friend = %hex(&pk[..4]), "deleted a Tox friend that is not a peer allowed Tox");
            {
                ctx.relayed.remove(&pk);
                let mut shared = ctx.shared();
                shared.friends.remove(&pk);
                shared.counters.friends_deleted += 1;
            }
            ctx.state_changed = true;
        } else {
            tracing::warn!(friend = %hex(&pk[..4]), err, "tox_friend_delete failed");
        }
    }
}

fn bootstrap(tox: *mut ffi::Tox, config: &ToxConfig) {
    for (node, relay) in config
        .bootstrap
        .iter()
        .map(|n| (n, false))
        .chain(config.tcp_relays.iter().map(|n| (n, true)))
    {
        let Ok(host) = CString::new(node.host.as_str()) else {
            continue;
        };
        let mut err = 0;
        // SAFETY: live instance; host is NUL-terminated; key has 32 bytes.
        let ok = unsafe {
            if relay {
                ffi::tox_add_tcp_relay(
                    tox,
                    host.as_ptr(),
                    node.port,
                    node.public_key.as_ptr(),
                    &mut err,
                )
            } else {
                ffi::tox_bootstrap(
                    tox,
                    host.as_ptr(),
                    node.port,
                    node.public_key.as_ptr(),
                    &mut err,
                )
            }
        };
        if !ok {
            tracing::warn!(%node, relay, err, "tox bootstrap node refused");
        }
    }
}

/// A friend request to each configured peer that is not a friend yet.
fn add_friends(tox: *mut ffi::Tox, friends: &[ToxId], ctx: &mut CallbackContext) {
    for id in friends {
        let mut err = 0;
        // SAFETY: live instance; id has TOX_ADDRESS_SIZE bytes; message is valid.
        unsafe {
            ffi::tox_friend_add(
                tox,
                id.0.as_ptr(),
                FRIEND_REQUEST_MESSAGE.as_ptr(),
                FRIEND_REQUEST_MESSAGE.len(),
                &mut err,
            )
        };
        match err {
            ffi::ERR_OK => ctx.state_changed = true,
            ffi::ERR_FRIEND_ADD_ALREADY_SENT => {}
            other => tracing::warn!(friend = %id, err = other, "tox_friend_add failed"),
        }
        ctx.shared()
            .friends
            .entry(id.public_key().0)
            .or_insert(FriendState::None);
    }
}

fn self_info(tox: *mut ffi::Tox) -> ToxInfo {
    let mut id = [0u8; ffi::ADDRESS_SIZE];
    let mut dht_id = [0u8; 32];
    let (mut udp_err, mut tcp_err) = (0, 0);
    // SAFETY: live instance; buffers sized per tox.h.
    let (udp, tcp) = unsafe {
        ffi::tox_self_get_address(tox, id.as_mut_ptr());
        ffi::tox_self_get_dht_id(tox, dht_id.as_mut_ptr());
        (
            ffi::tox_self_get_udp_port(tox, &mut udp_err),
            ffi::tox_self_get_tcp_port(tox, &mut tcp_err),
        )
    };
    ToxInfo {
        id: ToxId(id),
        dht_id,
        udp_port: (udp_err == ffi::ERR_OK).then_some(udp),
        tcp_port: (tcp_err == ffi::ERR_OK).then_some(tcp),
    }
}

/// Hands one datagram to toxcore; false if it was refused.
fn send_packet(
    tox: *mut ffi::Tox,
    friend_numbers: &mut HashMap<[u8; 32], u32>,
    ctx: &CallbackContext,
    pk: [u8; 32],
    datagram: &[u8],
) -> bool {
    let friend = match friend_numbers.get(&pk) {
        Some(&n) => n,
        None => {
            let mut err = 0;
            // SAFETY: live instance, 32-byte key.
            let n = unsafe { ffi::tox_friend_by_public_key(tox, pk.as_ptr(), &mut err) };
            if err != ffi::ERR_OK {
                ctx.shared().counters.send_errors += 1;
                return false;
            }
            friend_numbers.insert(pk, n);
            n
        }
    };
    // `send` checked the size; a longer one would be refused by toxcore.
    let mut buf = [0u8; ffi::MAX_CUSTOM_PACKET_SIZE];
    let Some(packet) = buf.get_mut(..datagram.len() + 1) else {
        ctx.shared().counters.send_errors += 1;
        return false;
    };
    packet[0] = PACKET_ID;
    packet[1..].copy_from_slice(datagram);
    let mut err = 0;
    // SAFETY: live instance; packet pointer and length describe one buffer.
    let ok = unsafe {
        ffi::tox_friend_send_lossy_packet(tox, friend, packet.as_ptr(), packet.len(), &mut err)
    };
    if !ok {
        ctx.shared().counters.send_errors += 1;
        tracing::trace!(err, "tox lossy send failed");
    }
    ok
}

fn save(tox: *mut ffi::Tox, path: &Path) {
    // SAFETY: live instance; the buffer has the size toxcore asked for.
    let bytes = unsafe {
        let mut bytes = vec![0u8; ffi::tox_get_savedata_size(tox)];
        ffi::tox_get_savedata(tox, bytes.as_mut_ptr());
        bytes
    };
    if let Err(error) = veilmesh_transport::write_private_file(path, &bytes) {
        tracing::error!(path = %path.display(), %error, "cannot save Tox state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_bootstrap_list_parses() {
        let nodes: Vec<ToxNode> = node_lines(DEFAULT_BOOTSTRAP_NODES)
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(nodes.len() >= 8, "{nodes:?}");
    }

    #[test]
    fn nodes_parse() {
        let key = "AB".repeat(32);
        let node: ToxNode = format!("198.18.0.3:33445:{key}").parse().unwrap();
        assert_eq!((node.host.as_str(), node.port), ("198.18.0.3", 33445));
        assert_eq!(node.to_string(), format!("198.18.0.3:33445:{key}"));
        assert!("198.18.0.3:33445".parse::<ToxNode>().is_err());
        assert!(format!("h:99999:{key}").parse::<ToxNode>().is_err());
    }

    #[test]
    fn relayed_friends_are_paced_and_back_off_after_refusals() {
        let start = Instant::now();
        let mut p = Pacer::new(start);
        // UDP friends are not rate limited.
        assert!((0..1000).all(|_| p.admit(start, false)));
        // Relayed: a burst, then the rate.
        let admitted = (0..1000).filter(|_| p.admit(start, true)).count();
        assert_eq!(admitted, TCP_BURST as usize);
        let later = start + Duration::from_millis(10);
        let admitted = (0..1000).filter(|_| p.admit(later, true)).count();
        assert_eq!(admitted, (TCP_PACKETS_PER_SECOND * 0.010) as usize);
        // Refusals pause the friend, doubling; a success resets.
        p.sent(false, later);
        assert!(!p.admit(later + Duration::from_millis(1), false));
        assert!(p.admit(later + BACKOFF_MIN, false));
        p.sent(false, later);
        assert_eq!(p.backoff, BACKOFF_MIN * 2);
        for _ in 0..20 {
            p.sent(false, later);
        }
        assert_eq!(p.backoff, BACKOFF_MAX);
        p.sent(true, later);
        assert_eq!(p.backoff, Duration::ZERO);
    }

    #[test]
    fn abi_check_is_linked() {
        // SAFETY: a plain C function without arguments.
        assert_eq!(unsafe { ffi::veilmesh_tox_abi_checked() }, 1);
    }
}
