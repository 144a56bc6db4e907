//! Tox transport: veilmesh's Noise datagrams travel as Tox lossy custom
//! packets between Tox friends, found through the Tox DHT and onion, over
//! direct UDP or TCP relays.
//!
//! toxcore runs on the daemon's event loop, like every other socket: the
//! loop waits on toxcore's UDP socket (see `wake`) and on a timer for the
//! iterations toxcore asks for, and `tox_iterate` runs inside `poll_recv`
//! when either fires. A received packet reaches the TUN without a thread
//! hand-off, and a sent one leaves in the `send` call.

mod ffi;
mod memlock;
mod wake;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::os::raw::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
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
/// Received packets waiting for the event loop at most; one `tox_iterate`
/// reads all toxcore's socket holds, and the loop takes them before it
/// iterates again.
const INBOX_PACKETS: usize = 1024;
/// `tox_iterate` runs at least this often while packets flow and their
/// arrival cannot be waited on (a TCP-relayed friend, or toxcore's UDP
/// socket not found): they are seen only when toxcore iterates.
const BUSY_ITERATION: Duration = Duration::from_millis(1);
/// How long traffic keeps the loop in its busy period.
const BUSY_FOR: Duration = Duration::from_secs(1);
/// Iterations one `poll_recv` runs at most before it lets the event loop
/// serve the rest (a socket that stays readable cannot hold it).
const ITERATIONS_PER_POLL: usize = 4;
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
    #[error("the Tox transport runs on a tokio event loop, and none is running")]
    NoRuntime,
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

/// What toxcore's callbacks reach through `user_data`, and what the
/// transport reports: all of it lives on the event loop's thread.
struct State {
    /// Keys of the configured peers allowed Tox: only they become
    /// friends, and packets from any other are dropped.
    allowed: HashSet<[u8; 32]>,
    /// Friends connected through a TCP relay (paced), as the connection
    /// callbacks said.
    relayed: HashSet<[u8; 32]>,
    /// Our own connection to the Tox network (the DHT, or a TCP relay).
    network: Option<FriendState>,
    friends: HashMap<[u8; 32], FriendState>,
    counters: ToxCounters,
    inbox: Inbox,
    state_changed: bool,
    last_traffic: Instant,
}

impl State {
    fn friends_online(&self) -> usize {
        self.friends
            .values()
            .filter(|s| **s != FriendState::None)
            .count()
    }

    /// Makes `friends` the allowed keys; received packets of any other
    /// still waiting are dropped.
    fn allow(&mut self, friends: &[ToxId]) {
        self.allowed = friends.iter().map(|id| id.public_key().0).collect();
        let dropped = self.inbox.retain(|pk| self.allowed.contains(pk));
        self.counters.unallowed_packets += dropped as u64;
    }
}

/// Packets one or more `tox_iterate`s received, in order, back to back in
/// one buffer that is reused (no allocation per packet).
#[derive(Default)]
struct Inbox {
    bytes: Vec<u8>,
    /// Sender and end offset in `bytes` of each packet.
    packets: Vec<([u8; 32], usize)>,
    /// The next packet to deliver.
    next: usize,
}

impl Inbox {
    fn len(&self) -> usize {
        self.packets.len() - self.next
    }

    fn push(&mut self, from: [u8; 32], datagram: &[u8]) {
        self.bytes.extend_from_slice(datagram);
        self.packets.push((from, self.bytes.len()));
    }

    /// The next packet, until all were taken (then the buffer is reused).
    fn pop(&mut self) -> Option<([u8; 32], &[u8])> {
        let Some(&(from, end)) = self.packets.get(self.next) else {
            self.bytes.clear();
            self.packets.clear();
            self.next = 0;
            return None;
        };
        let start = match self.next.checked_sub(1) {
            Some(previous) => self.packets[previous].1,
            None => 0,
        };
        self.next += 1;
        Some((from, &self.bytes[start..end]))
    }

    /// Keeps the waiting packets whose sender passes `keep`; returns how
    /// many were dropped.
    fn retain(&mut self, keep: impl Fn(&[u8; 32]) -> bool) -> usize {
        let mut kept = Inbox::default();
        let mut dropped = 0;
        while let Some((from, datagram)) = self.pop() {
            if keep(&from) {
                kept.push(from, datagram);
            } else {
                dropped += 1;
            }
        }
        *self = kept;
        dropped
    }
}

/// toxcore's UDP socket, as the event loop's reactor watches it. Never
/// closed here: toxcore owns it until `tox_kill`.
struct ToxcoreSocket(RawFd);

impl std::os::fd::AsRawFd for ToxcoreSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub struct ToxTransport {
    /// Used only from the thread that owns the transport, one call at a
    /// time (`&mut self`); killed in `Drop`.
    tox: *mut ffi::Tox,
    /// Boxed: toxcore's callbacks get its address for `tox_iterate`.
    state: Box<State>,
    /// Readable when a packet reached toxcore: iterate at once. None where
    /// the socket was not found (or UDP is off): the timer alone drives it.
    udp: Option<AsyncFd<ToxcoreSocket>>,
    /// When toxcore wants its next iteration.
    next_iteration: Pin<Box<tokio::time::Sleep>>,
    friend_numbers: HashMap<[u8; 32], u32>,
    pacers: HashMap<[u8; 32], Pacer>,
    /// A packet being built: the id byte, then the datagram.
    packet: Box<[u8; ffi::MAX_CUSTOM_PACKET_SIZE]>,
    state_file: PathBuf,
    info: ToxInfo,
}

// SAFETY: toxcore may be used from any thread as long as calls do not
// overlap; every call goes through `&mut self` (or `&self` for reads of
// our own fields), so moving the transport to another thread is sound.
unsafe impl Send for ToxTransport {}

impl ToxTransport {
    /// Starts Tox, bootstraps and befriends the Tox IDs among `contacts`
    /// (deleting any other friend). Call it inside the event loop's tokio
    /// runtime, with I/O and time enabled: the transport registers
    /// toxcore's socket and a timer there.
    pub fn start(config: ToxConfig, contacts: &[Contact]) -> Result<ToxTransport, ToxError> {
        tokio::runtime::Handle::try_current().map_err(|_| ToxError::NoRuntime)?;
        let friends = friends_of(contacts);
        let state = read_state(&config.state_file)?;
        if memlock::in_effect() {
            tracing::debug!("toxcore's per-packet memory locking reaches veilmesh's stand-ins");
        } else {
            tracing::debug!(
                "this binary does not export sodium_mlock: toxcore's calls fail at once instead"
            );
            forgo_memory_locking();
        }
        let tox = new_tox(&config, state.as_deref())?;
        let info = self_info(tox);
        let udp_socket = info.udp_port.and_then(wake::find_udp_socket);
        // Before the first packet: our mark keeps it out of an exit's tunnel.
        if let Some(Err(error)) = udp_socket.map(veilmesh_transport::sockets::mark_new_socket) {
            tracing::debug!(%error, "toxcore's UDP socket not marked");
        }
        let udp = match (info.udp_port, udp_socket) {
            (Some(port), None) => {
                tracing::warn!(
                    port,
                    "toxcore's UDP socket not found: packets are seen every {} ms while they flow",
                    BUSY_ITERATION.as_millis()
                );
                None
            }
            // SAFETY: toxcore keeps the socket open until `tox_kill`, and
            // Drop takes it out of the reactor before that.
            (Some(port), Some(fd)) => match unsafe {
                AsyncFd::register_with_interest(ToxcoreSocket(fd), tokio::io::Interest::READABLE)
            } {
                Ok(udp) => {
                    tracing::debug!(port, "waiting on toxcore's UDP socket");
                    Some(udp)
                }
                Err(error) => {
                    tracing::warn!(
                        port,
                        %error,
                        "cannot wait on toxcore's UDP socket: packets are seen every {} ms while they flow",
                        BUSY_ITERATION.as_millis()
                    );
                    None
                }
            },
            (None, _) => None,
        };
        let mut transport = ToxTransport {
            tox,
            state: Box::new(State {
                allowed: HashSet::new(),
                relayed: HashSet::new(),
                network: None,
                friends: HashMap::new(),
                counters: ToxCounters::default(),
                inbox: Inbox::default(),
                state_changed: true,
                last_traffic: Instant::now() - BUSY_FOR,
            }),
            udp,
            next_iteration: Box::pin(tokio::time::sleep(Duration::ZERO)),
            friend_numbers: HashMap::new(),
            pacers: HashMap::new(),
            packet: Box::new([0u8; ffi::MAX_CUSTOM_PACKET_SIZE]),
            state_file: config.state_file.clone(),
            info,
        };
        // SAFETY: `tox` is live until Drop; the callbacks' user_data is
        // always `state` (see `iterate`).
        unsafe {
            ffi::tox_callback_friend_request(tox, on_friend_request);
            ffi::tox_callback_friend_connection_status(tox, on_friend_connection);
            ffi::tox_callback_friend_lossy_packet(tox, on_lossy_packet);
            ffi::tox_callback_self_connection_status(tox, on_self_connection);
        }
        bootstrap(tox, &config);
        transport.befriend(&friends);
        tracing::info!(tox_id = %transport.info.id, udp_port = ?transport.info.udp_port, "tox transport running");
        Ok(transport)
    }

    pub fn info(&self) -> &ToxInfo {
        &self.info
    }

    pub fn friend_state(&self, public_key: &ToxPublicKey) -> FriendState {
        self.state
            .friends
            .get(&public_key.0)
            .copied()
            .unwrap_or(FriendState::None)
    }

    pub fn counters(&self) -> ToxCounters {
        self.state.counters.clone()
    }

    /// Makes `friends` the only friends: others are deleted (a friend
    /// connection shows the friend our IP address, and a removed peer must
    /// lose it), new ones get a friend request; the state is saved if that
    /// changed it.
    fn befriend(&mut self, friends: &[ToxId]) {
        self.state.allow(friends);
        delete_unallowed_friends(self.tox, &mut self.state);
        // Friend numbers of deleted friends are reused.
        self.friend_numbers.clear();
        let allowed = &self.state.allowed;
        self.pacers.retain(|pk, _| allowed.contains(pk));
        add_friends(self.tox, friends, &mut self.state);
        self.save_if_changed();
    }

    fn save_if_changed(&mut self) {
        if std::mem::take(&mut self.state.state_changed) {
            save(self.tox, &self.state_file);
        }
    }

    /// Runs toxcore once (what it received lands in the inbox), then sets
    /// the timer for the next iteration it asks for.
    fn iterate(&mut self) {
        let state: *mut State = &mut *self.state;
        // SAFETY: live instance; `state` outlives the call and nothing else
        // touches it meanwhile (we hold &mut self).
        unsafe { ffi::tox_iterate(self.tox, state.cast::<c_void>()) };
        self.save_if_changed();
        // SAFETY: live instance.
        let interval =
            Duration::from_millis(u64::from(unsafe { ffi::tox_iteration_interval(self.tox) }));
        let busy = self.state.last_traffic.elapsed() < BUSY_FOR;
        // Packets from a TCP-relayed friend arrive on connections the loop
        // does not wait on: while traffic flows, toxcore iterates often.
        let polling = busy && (self.udp.is_none() || !self.state.relayed.is_empty());
        let wait = if polling {
            interval.min(BUSY_ITERATION)
        } else {
            interval
        };
        // A zero interval must not spin the loop.
        let wait = wait.max(Duration::from_micros(100));
        self.next_iteration
            .as_mut()
            .reset(tokio::time::Instant::now() + wait);
    }

    /// Whether toxcore should iterate now: a packet reached its socket, or
    /// the iteration it asked for is due. Otherwise `cx` is woken for both.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        let mut due = false;
        if let Some(udp) = &self.udp {
            if let Poll::Ready(ready) = udp.poll_read_ready(cx) {
                match ready {
                    // Cleared before toxcore reads: a packet that arrives
                    // after its last read is a new readiness.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(error) => {
                        tracing::warn!(%error, "cannot wait on toxcore's UDP socket any more: polling");
                        self.udp = None;
                    }
                }
                due = true;
            }
        }
        if self.next_iteration.as_mut().poll(cx).is_ready() {
            due = true;
        }
        due
    }

    /// Whether an iteration is due, without a task to wake: the timer ran
    /// out or toxcore's socket holds a packet (one poll(2) with no wait).
    fn due_now(&self) -> bool {
        if self.next_iteration.deadline() <= tokio::time::Instant::now() {
            return true;
        }
        let Some(udp) = &self.udp else { return false };
        let mut fd = libc::pollfd {
            fd: udp.get_ref().0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        unsafe { libc::poll(&mut fd, 1, 0) == 1 && fd.revents & libc::POLLIN != 0 }
    }

    /// The next received packet into `buf`.
    fn deliver(&mut self, buf: &mut [u8]) -> Option<Received> {
        let (from, datagram) = self.state.inbox.pop()?;
        let len = datagram.len();
        // The daemon's buffer fits every legal datagram; a shorter one
        // (never the daemon's) loses the packet, not the order.
        let target = buf.get_mut(..len)?;
        target.copy_from_slice(datagram);
        Some(Received::one(PeerAddr::Tox(ToxPublicKey(from)), len))
    }

    /// Hands one datagram to toxcore, unless pacing holds it back; a
    /// refusal is counted here (lossy packets are dropped, as on a full
    /// UDP socket) and pauses that friend.
    fn send_datagram(&mut self, pk: [u8; 32], datagram: &[u8]) {
        let now = Instant::now();
        self.state.last_traffic = now;
        let relayed = self.state.relayed.contains(&pk);
        let pacer = self.pacers.entry(pk).or_insert_with(|| Pacer::new(now));
        if !pacer.admit(now, relayed) {
            self.state.counters.paced_drops += 1;
            return;
        }
        let ok = send_packet(
            self.tox,
            &mut self.friend_numbers,
            &mut self.packet,
            pk,
            datagram,
        );
        if !ok {
            self.state.counters.send_errors += 1;
        }
        pacer.sent(ok, now);
    }
}

impl Drop for ToxTransport {
    fn drop(&mut self) {
        save(self.tox, &self.state_file);
        // Out of the reactor before toxcore closes the socket.
        self.udp = None;
        // SAFETY: last use of `tox`.
        unsafe { ffi::tox_kill(self.tox) };
        tracing::info!("tox transport stopped");
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
        self.send_datagram(pk.0, datagram);
        Ok(())
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        for _ in 0..ITERATIONS_PER_POLL {
            if let Some(received) = self.deliver(buf) {
                return Poll::Ready(Ok(received));
            }
            if !self.poll_due(cx) {
                return Poll::Pending;
            }
            self.iterate();
        }
        if let Some(received) = self.deliver(buf) {
            return Poll::Ready(Ok(received));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        if self.state.inbox.len() == 0 && self.due_now() {
            // The event loop may be busy with the TUN: toxcore still
            // iterates when it asked to, and reads what arrived.
            self.iterate();
        }
        Ok(self.deliver(buf))
    }

    fn path_state(&self, to: &PeerAddr) -> Option<String> {
        match to {
            PeerAddr::Tox(pk) => Some(format!("friend {}", self.friend_state(pk))),
            _ => None,
        }
    }

    /// Makes the Tox IDs among `contacts` the friends: new ones get a
    /// friend request, friends not among them are deleted (and the state
    /// saved), and only their keys are accepted from now on.
    fn reconfigure(&mut self, contacts: &[Contact]) {
        self.befriend(&friends_of(contacts));
    }

    fn health(&self) -> Health {
        let network = self.state.network.unwrap_or(FriendState::None);
        let online = self.state.friends_online();
        let mut facts = vec![match network {
            FriendState::None => "not connected to the Tox network".to_owned(),
            state => format!("connected to the Tox network over {state}"),
        }];
        facts.push(format!(
            "{online}/{} friends online",
            self.state.friends.len()
        ));
        if let Some(port) = self.info.udp_port {
            facts.push(format!("udp port {port}"));
        }
        Health {
            up: network != FriendState::None,
            facts,
        }
    }

    fn describe(&self) -> String {
        let state = &self.state;
        let counters = &state.counters;
        format!(
            "tox ID {} (udp port {}), {}/{} friends online, {} friend requests ignored, \
             {} friends deleted, {} packets from unallowed friends, {} send errors, {} paced drops, \
             {} received dropped (event loop behind)",
            self.info.id,
            self.info.udp_port.map_or("-".into(), |p| p.to_string()),
            state.friends_online(),
            state.friends.len(),
            counters.ignored_friend_requests,
            counters.friends_deleted,
            counters.unallowed_packets,
            counters.send_errors,
            counters.paced_drops,
            counters.inbound_dropped
        )
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

fn friend_key(tox: *const ffi::Tox, friend: u32) -> Option<[u8; 32]> {
    let mut pk = [0u8; 32];
    let mut err = 0;
    // SAFETY: `tox` is the live instance toxcore passed to the callback; `pk`
    // has room for TOX_PUBLIC_KEY_SIZE bytes.
    let ok = unsafe { ffi::tox_friend_get_public_key(tox, friend, pk.as_mut_ptr(), &mut err) };
    ok.then_some(pk)
}

/// The `State` toxcore passes back to a callback.
///
/// # Safety
/// `user_data` must be the `*mut State` given to `tox_iterate`.
unsafe fn state_of<'a>(user_data: *mut c_void) -> &'a mut State {
    // SAFETY: the caller's promise; `iterate` passes nothing else.
    unsafe { &mut *(user_data as *mut State) }
}

unsafe extern "C" fn on_friend_request(
    tox: *mut ffi::Tox,
    public_key: *const u8,
    _message: *const u8,
    _length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: see state_of; public_key points to TOX_PUBLIC_KEY_SIZE bytes (tox.h).
    let (state, pk) = unsafe { (state_of(user_data), *(public_key as *const [u8; 32])) };
    if state.allowed.contains(&pk) {
        let mut err = 0;
        // SAFETY: live instance, valid key pointer.
        unsafe { ffi::tox_friend_add_norequest(tox, pk.as_ptr(), &mut err) };
        tracing::info!(key = %hex(&pk[..4]), err, "accepted friend request from a configured peer");
        state.state_changed = true;
    } else {
        state.counters.ignored_friend_requests += 1;
        tracing::info!(key = %hex(&pk[..4]), "ignored friend request from a key that is not a configured peer");
    }
}

unsafe extern "C" fn on_self_connection(
    _tox: *mut ffi::Tox,
    status: ffi::Tox_Connection,
    user_data: *mut c_void,
) {
    // SAFETY: see state_of.
    let state = unsafe { state_of(user_data) };
    let connection = FriendState::from_ffi(status);
    tracing::info!(state = %connection, "connection to the Tox network");
    state.network = Some(connection);
}

unsafe extern "C" fn on_friend_connection(
    tox: *mut ffi::Tox,
    friend: u32,
    status: ffi::Tox_Connection,
    user_data: *mut c_void,
) {
    // SAFETY: see state_of.
    let state = unsafe { state_of(user_data) };
    if let Some(pk) = friend_key(tox, friend) {
        let connection = FriendState::from_ffi(status);
        tracing::info!(friend = %hex(&pk[..4]), state = %connection, "tox friend connection");
        if connection == FriendState::Tcp {
            state.relayed.insert(pk);
        } else {
            state.relayed.remove(&pk);
        }
        state.friends.insert(pk, connection);
    }
}

unsafe extern "C" fn on_lossy_packet(
    tox: *mut ffi::Tox,
    friend: u32,
    data: *const u8,
    length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: see state_of; data points to `length` bytes.
    let (state, data) = unsafe {
        (
            state_of(user_data),
            std::slice::from_raw_parts(data, length),
        )
    };
    let Some((&PACKET_ID, datagram)) = data.split_first() else {
        state.counters.foreign_packets += 1;
        return;
    };
    let Some(pk) = friend_key(tox, friend) else {
        return;
    };
    if !state.allowed.contains(&pk) {
        // Deleted at start and on reload; a packet can still be on its way.
        state.counters.unallowed_packets += 1;
        return;
    }
    if state.inbox.len() >= INBOX_PACKETS {
        state.counters.inbound_dropped += 1;
        return;
    }
    state.last_traffic = Instant::now();
    state.inbox.push(pk, datagram);
}

/// The fallback where the binary does not export memlock.rs's stand-ins:
/// the calling thread (the event loop's) gives up CAP_IPC_LOCK (its own
/// effective set; a daemon that dropped to its user has none) and the process's soft
/// RLIMIT_MEMLOCK becomes 0 (the daemon locks no memory), so toxcore's
/// per-packet mlock fails at once (it ignores that), though the madvise
/// and munlock calls around it stay.
fn forgo_memory_locking() {
    use caps::{CapSet, Capability};
    if let Err(error) = caps::drop(None, CapSet::Effective, Capability::CAP_IPC_LOCK) {
        tracing::debug!(%error, "cannot drop CAP_IPC_LOCK on the event loop's thread");
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

/// Deletes every friend whose key is not allowed: a friend connection
/// shows the friend our IP address, and a removed peer must lose it.
fn delete_unallowed_friends(tox: *mut ffi::Tox, state: &mut State) {
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
        if state.allowed.contains(&pk) {
            continue;
        }
        let mut err = 0;
        // SAFETY: live instance, a friend number toxcore just listed.
        if unsafe { ffi::tox_friend_delete(tox, number, &mut err) } {
            tracing::info!(friend = %hex(&pk[..4]), "deleted a Tox friend that is not a peer allowed Tox");
            state.relayed.remove(&pk);
            state.friends.remove(&pk);
            state.counters.friends_deleted += 1;
            state.state_changed = true;
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
fn add_friends(tox: *mut ffi::Tox, friends: &[ToxId], state: &mut State) {
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
            ffi::ERR_OK => state.state_changed = true,
            ffi::ERR_FRIEND_ADD_ALREADY_SENT => {}
            other => tracing::warn!(friend = %id, err = other, "tox_friend_add failed"),
        }
        state
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

/// Hands one datagram to toxcore, built in `packet` behind our id byte;
/// false if it was refused (no such friend, not connected, queue full).
fn send_packet(
    tox: *mut ffi::Tox,
    friend_numbers: &mut HashMap<[u8; 32], u32>,
    packet: &mut [u8; ffi::MAX_CUSTOM_PACKET_SIZE],
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
                return false;
            }
            friend_numbers.insert(pk, n);
            n
        }
    };
    // `send` checked the size; a longer one would be refused by toxcore.
    let Some(packet) = packet.get_mut(..datagram.len() + 1) else {
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
