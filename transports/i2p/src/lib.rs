//! I2P transport: veilmesh's Noise datagrams travel as RAW I2P datagrams
//! through the SAM v3 bridge of an I2P router (i2pd or Java I2P), several
//! to a datagram when they queue up (`bundle`). A RAW datagram names no
//! sender: the transport hands it on as `PeerAddr::Unattributed`, and the
//! core attributes it by what it decrypts as.
//!
//! Three tokio tasks do the I/O; the event loop only touches the transport
//! through [`Transport`]:
//! * the supervisor holds the SAM control connection (the session lives as
//!   long as it does), re-creates the session on the next bridge when it
//!   dies, and resolves peers' `.b32.i2p` addresses with NAMING LOOKUP on
//!   the session's own connection, so the router has a peer's LeaseSet
//!   before the first datagram goes (otherwise that datagram is lost);
//! * the pacer task sends datagrams to the bridge's UDP port at the rate
//!   `pacer::Pacer` allows each destination (receipts from the receiver
//!   set it) and bundles what waits;
//! * receiving needs no task: the bridge forwards datagrams to our UDP
//!   socket, read by `poll_recv`.
//!
//! Nothing here ever sends this node's IP addresses anywhere but to the
//! configured SAM bridges. The datagram socket of a session is bound to
//! the address facing its bridge (loopback for a local router) and
//! connected to the bridge's datagram port, so nothing else can reach it.

pub mod bundle;
pub mod dest;
pub mod pacer;
pub mod sam;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use veilmesh_transport::{
    DatagramLimits, Health, I2pAddress, PeerAddr, Received, SendError, Transport, TransportKind,
};

pub use dest::{parse_peer_address, Destination, PrivateKeys};
use pacer::{Pacer, Receipts};
pub use sam::{SamError, SessionOptions};

/// Largest Noise datagram sent over I2P. I2P carries up to ~31 KB, but
/// loss grows with every 1 KB tunnel message a datagram spans; the TUN MTU
/// keeps real packets far below this.
pub const MAX_DATAGRAM: usize = 8 * 1024;
/// Datagrams held per destination while its lookup runs.
const HELD_PER_LOOKUP: usize = 16;
/// How long a NAMING LOOKUP may take (the router asks floodfills).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A destination that could not be found is not asked for again sooner.
const LOOKUP_RETRY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// i2pd answers SESSION CREATE only once tunnels are built (20 s at least
/// in 2.45.1; longer with 3-hop tunnels on the real network).
const SESSION_CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Waits between rounds over all bridges: doubling up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Notice a bridge that vanished without closing the connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_PROBES: u32 = 3;
/// i2pd deletes a closed session's destination 5 s later, even if a new
/// session took it over meanwhile (which then goes deaf): a bridge whose
/// session just ended gets the same destination only after this.
const DESTINATION_TEARDOWN: Duration = Duration::from_secs(7);
/// Renewals are at most this frequent, whatever asks (the core backs off
/// much further).
const RENEW_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Datagrams one receive call reads and discards at most (malformed ones
/// from the bridge) before it lets the event loop run its timers.
const MAX_DISCARDS_PER_CALL: usize = 64;

/// The `[i2p]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I2pConfig {
    /// SAM bridges (`host:port` of the TCP port), tried in order. The UDP
    /// port for datagrams is the TCP port minus one (7655 for 7656).
    pub bridges: Vec<String>,
    /// This node's destination with private keys; created on first contact
    /// with a bridge, then reused so the address stays the same.
    pub key_file: PathBuf,
    pub options: SessionOptions,
    /// Part of the session ID (the interface name), for the router's logs.
    pub label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum I2pError {
    #[error("{}: {source}", path.display())]
    KeyFile { path: PathBuf, source: io::Error },
    #[error("{}: not an I2P private key: {source}", path.display())]
    BadKeyFile {
        path: PathBuf,
        source: dest::DestinationError,
    },
    #[error(
        "{} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("no randomness from the system: {0}")]
    Random(io::Error),
}

/// Counters of the transport; monotonic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct I2pCounters {
    /// Datagrams sent to the bridge, and the Noise messages in them.
    pub sent: u64,
    pub messages_sent: u64,
    /// Datagrams received from the bridge, and the Noise messages in them.
    pub received: u64,
    pub messages_received: u64,
    /// Sessions created (the first, then one per failover or restart).
    pub sessions: u64,
    pub lookups: u64,
    pub lookup_failures: u64,
    /// Datagrams dropped: send queue full, or too many held for a lookup.
    pub queue_drops: u64,
    /// UDP datagrams that are not from the bridge or not SAM-framed.
    pub bad_datagrams: u64,
}

/// How a peer's destination is known to the current session.
enum Lookup {
    /// NAMING LOOKUP sent (or waiting its turn); datagrams held meanwhile.
    Pending {
        held: Vec<Vec<u8>>,
    },
    /// Base64 destination, ready to send to.
    Resolved(Arc<str>),
    Failed {
        until: Instant,
        why: String,
    },
}

/// The session datagrams currently go through.
#[derive(Clone)]
struct Live {
    bridge: String,
    /// Bound to the address facing the bridge, connected to its datagram
    /// port: it sends ours and receives what the bridge forwards.
    socket: Arc<UdpSocket>,
    id: String,
}

#[derive(Default)]
struct Shared {
    live: Option<Live>,
    address: Option<I2pAddress>,
    /// What the supervisor is doing, for `veilmesh show`.
    state: String,
    lookups: HashMap<I2pAddress, Lookup>,
    counters: I2pCounters,
    /// When a renewal last re-created the session.
    renewed_at: Option<Instant>,
    /// The receive call waiting for a session's socket.
    receiver: Option<std::task::Waker>,
}

/// Where a datagram goes: the SAM header naming the session and the
/// destination, and that session's socket. One pacer flow per route.
#[derive(Clone)]
struct Route {
    socket: Arc<UdpSocket>,
    header: Arc<str>,
}

impl PartialEq for Route {
    fn eq(&self, other: &Route) -> bool {
        Arc::ptr_eq(&self.socket, &other.socket) && self.header == other.header
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.header.hash(state);
    }
}

/// Everything the tasks and the transport share. Lock order: `shared`,
/// then `pacer`.
struct Inner {
    shared: Mutex<Shared>,
    pacer: Mutex<Pacer<Route>>,
    /// Wakes the pacer task: something was queued.
    pacer_wake: tokio::sync::Notify,
    lookup_requests: mpsc::UnboundedSender<I2pAddress>,
    renew_requests: mpsc::UnboundedSender<()>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pacer(&self) -> MutexGuard<'_, Pacer<Route>> {
        self.pacer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a datagram for a resolved destination of the live session.
    fn queue(&self, shared: &Shared, live: &Live, dest: &str, datagram: &[u8]) -> bool {
        let Some(from) = shared.address else {
            return false;
        };
        let queued =
            self.pacer()
                .push(route(live, dest), from.0, datagram.to_vec(), Instant::now());
        // A refusal is counted by the pacer (`full_drops`).
        if queued {
            self.pacer_wake.notify_one();
        }
        queued
    }

    /// Answers a flow from `from` with `receipt`, if `from` is a
    /// destination we send to (never one a datagram merely claims).
    fn send_receipt(&self, shared: &Shared, from: I2pAddress, receipt: &bundle::Receipt) {
        let (Some(live), Some(Lookup::Resolved(dest))) = (&shared.live, shared.lookups.get(&from))
        else {
            return;
        };
        let mut payload = Vec::with_capacity(bundle::RECEIPT_LEN);
        bundle::encode_receipt(receipt, &mut payload);
        self.pacer().push_control(route(live, dest), payload);
        self.pacer_wake.notify_one();
    }
}

fn route(live: &Live, dest: &str) -> Route {
    Route {
        socket: live.socket.clone(),
        header: sam::datagram_header(&live.id, dest).into(),
    }
}

pub struct I2pTransport {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
    /// Messages of a bundle not handed out yet.
    unbundled: VecDeque<Vec<u8>>,
    receipts: Receipts,
}

/// Where every received datagram comes from, as far as RAW tells.
const UNATTRIBUTED: PeerAddr = PeerAddr::Unattributed(TransportKind::I2p);

impl I2pTransport {
    /// Reads the key file (if there is one yet) and starts the tasks. Must
    /// run inside a tokio runtime. Never waits for a bridge: the session
    /// comes up in the background, and comes back after failures.
    pub fn start(config: I2pConfig) -> Result<I2pTransport, I2pError> {
        let keys = load_keys(&config.key_file)?;
        let mut id_key = [0; 8];
        getrandom::fill(&mut id_key)
            .map_err(|e| I2pError::Random(io::Error::other(e.to_string())))?;
        let (lookup_requests, lookup_rx) = mpsc::unbounded_channel();
        let (renew_requests, renew_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            shared: Mutex::new(Shared {
                address: keys.as_ref().map(|k| k.public().address()),
                state: "starting".into(),
                ..Shared::default()
            }),
            pacer: Mutex::new(Pacer::new(u64::from_ne_bytes(id_key), Instant::now())),
            pacer_wake: tokio::sync::Notify::new(),
            lookup_requests,
            renew_requests,
        });
        tracing::info!(
            address = ?inner.lock().address.map(|a| a.to_string()),
            bridges = ?config.bridges,
            "i2p transport starting"
        );
        let supervisor = Supervisor {
            config,
            keys,
            inner: inner.clone(),
        };
        let tasks = vec![
            tokio::spawn(supervisor.run(lookup_rx, renew_rx)),
            tokio::spawn(pace(inner.clone())),
        ];
        Ok(I2pTransport {
            inner,
            tasks,
            unbundled: VecDeque::new(),
            receipts: Receipts::default(),
        })
    }

    /// This node's `.b32.i2p` address, once it has a destination.
    pub fn address(&self) -> Option<I2pAddress> {
        self.inner.lock().address
    }

    /// The live session's socket; without one, `cx` is woken when one
    /// comes.
    fn socket(&self, cx: Option<&mut Context<'_>>) -> Option<Arc<UdpSocket>> {
        let mut shared = self.inner.lock();
        let socket = shared.live.as_ref().map(|l| l.socket.clone());
        if let Some(cx) = cx {
            shared.receiver = Some(cx.waker().clone());
        }
        socket
    }

    /// Turns one forwarded RAW datagram (the socket takes them from the
    /// bridge only) into the first of its Noise messages at the start of
    /// `buf` (the others of a bundle wait in `unbundled`), or None: a
    /// receipt (handed to the pacer) or not a well-formed datagram
    /// (counted).
    fn accept(&mut self, len: usize, buf: &mut [u8]) -> Option<Received> {
        let mut shared = self.inner.lock();
        let now = Instant::now();
        let messages = match bundle::decode(&buf[..len]) {
            Ok(bundle::Payload::Data { header, messages }) => {
                if let Some(receipt) = self.receipts.record(&header, now) {
                    self.inner
                        .send_receipt(&shared, I2pAddress(header.from), &receipt);
                }
                messages
            }
            Ok(bundle::Payload::Receipt(receipt)) => {
                self.inner.pacer().on_receipt(&receipt, now);
                return None;
            }
            Err(error) => {
                shared.counters.bad_datagrams += 1;
                tracing::debug!(%error, "bad datagram from the SAM bridge");
                return None;
            }
        };
        shared.counters.received += 1;
        shared.counters.messages_received += messages.len() as u64;
        let (first, rest) = messages.split_first()?;
        // Within `buf`: decode hands out slices of it.
        let (offset, first_len) = (first.as_ptr() as usize - buf.as_ptr() as usize, first.len());
        self.unbundled.extend(rest.iter().map(|m| m.to_vec()));
        buf.copy_within(offset..offset + first_len, 0);
        Some(Received::one(UNATTRIBUTED, first_len))
    }

    /// The next message of a bundle received earlier, into `buf`.
    fn next_unbundled(&mut self, buf: &mut [u8]) -> Option<Received> {
        let message = self.unbundled.pop_front()?;
        let target = buf.get_mut(..message.len())?;
        target.copy_from_slice(&message);
        Some(Received::one(UNATTRIBUTED, message.len()))
    }
}

impl Drop for I2pTransport {
    fn drop(&mut self) {
        // Dropping the control connection ends the session at the router.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Transport for I2pTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::I2p
    }

    fn limits(&self, _to: &PeerAddr) -> DatagramLimits {
        DatagramLimits {
            unfragmented: MAX_DATAGRAM,
            absolute: MAX_DATAGRAM,
        }
    }

    fn send(&mut self, to: &PeerAddr, datagram: &[u8]) -> Result<(), SendError> {
        let PeerAddr::I2p(address) = to else {
            return Err(SendError::WrongTransport(to.clone()));
        };
        if datagram.len() > MAX_DATAGRAM {
            return Err(SendError::TooBig {
                len: datagram.len(),
                max: MAX_DATAGRAM,
            });
        }
        let inner = &self.inner;
        let mut guard = inner.lock();
        let shared = &mut *guard;
        let Some(live) = shared.live.clone() else {
            return Err(SendError::NotReady(
                "no I2P session (SAM bridge not reached yet)",
            ));
        };
        let now = Instant::now();
        match shared.lookups.get_mut(address) {
            Some(Lookup::Resolved(dest)) => {
                let dest = dest.clone();
                if inner.queue(shared, &live, &dest, datagram) {
                    Ok(())
                } else {
                    Err(SendError::Backpressure)
                }
            }
            Some(Lookup::Pending { held }) => {
                if held.len() < HELD_PER_LOOKUP {
                    held.push(datagram.to_vec());
                    Ok(())
                } else {
                    shared.counters.queue_drops += 1;
                    Err(SendError::Backpressure)
                }
            }
            Some(Lookup::Failed { until, .. }) if now < *until => {
                Err(SendError::NotReady("I2P destination not found"))
            }
            _ => {
                shared.lookups.insert(
                    *address,
                    Lookup::Pending {
                        held: vec![datagram.to_vec()],
                    },
                );
                let _ = inner.lookup_requests.send(*address);
                Ok(())
            }
        }
    }

    fn generation(&self) -> u64 {
        self.inner.lock().counters.sessions
    }

    fn renew(&mut self) {
        let mut shared = self.inner.lock();
        // Without a live session a new one is on its way anyway.
        if shared.live.is_none()
            || shared
                .renewed_at
                .is_some_and(|t| t.elapsed() < RENEW_MIN_INTERVAL)
        {
            return;
        }
        shared.renewed_at = Some(Instant::now());
        tracing::info!("a peer does not get our datagrams: renewing the I2P session");
        let _ = self.inner.renew_requests.send(());
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        if let Some(received) = self.next_unbundled(buf) {
            return Poll::Ready(Ok(received));
        }
        let Some(socket) = self.socket(Some(cx)) else {
            return Poll::Pending;
        };
        for _ in 0..MAX_DISCARDS_PER_CALL {
            let mut read = tokio::io::ReadBuf::new(buf);
            match socket.poll_recv(cx, &mut read) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let len = read.filled().len();
            if let Some(received) = self.accept(len, buf) {
                return Poll::Ready(Ok(received));
            }
        }
        // Bad datagrams only: come back after the event loop's other work.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        if let Some(received) = self.next_unbundled(buf) {
            return Ok(Some(received));
        }
        let Some(socket) = self.socket(None) else {
            return Ok(None);
        };
        for _ in 0..MAX_DISCARDS_PER_CALL {
            let len = match socket.try_recv(buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Some(received) = self.accept(len, buf) {
                return Ok(Some(received));
            }
        }
        Ok(None)
    }

    fn health(&self) -> Health {
        let shared = self.inner.lock();
        let mut facts = vec![shared.state.clone()];
        if let Some(address) = shared.address {
            facts.push(format!("destination {address}"));
        }
        // i2pd answers SESSION CREATE once the session's tunnels are built
        // and its LeaseSet is published: a live session is reachable.
        Health {
            up: shared.live.is_some(),
            facts,
        }
    }

    fn describe(&self) -> String {
        let shared = self.inner.lock();
        let c = &shared.counters;
        let (pacer, rates) = {
            let pacer = self.inner.pacer();
            (pacer.counters, pacer.rates())
        };
        let rates: Vec<String> = rates
            .iter()
            .map(|(bytes, datagrams)| format!("{:.1} Mbit/s {datagrams:.0}/s", bytes * 8.0 / 1e6))
            .collect();
        format!(
            "i2p {} ({}), {} sent ({} messages), {} received ({} messages), {} sessions, \
             {} lookups ({} failed), {} queue drops, {} bad datagrams, {} receipts, {} rate cuts, pacing [{}]",
            shared
                .address
                .map_or("(no destination yet)".into(), |a| a.to_string()),
            shared.state,
            c.sent,
            c.messages_sent,
            c.received,
            c.messages_received,
            c.sessions,
            c.lookups,
            c.lookup_failures,
            c.queue_drops + pacer.stale_drops + pacer.full_drops,
            c.bad_datagrams,
            pacer.receipts,
            pacer.cuts,
            rates.join(", ")
        )
    }

    fn path_state(&self, to: &PeerAddr) -> Option<String> {
        let PeerAddr::I2p(address) = to else {
            return None;
        };
        let shared = self.inner.lock();
        if shared.live.is_none() {
            return Some("no I2P session".into());
        }
        Some(match shared.lookups.get(address) {
            None => "not contacted yet".into(),
            Some(Lookup::Pending { .. }) => "looking up".into(),
            Some(Lookup::Resolved(_)) => "destination resolved".into(),
            Some(Lookup::Failed { why, .. }) => format!("lookup failed: {why}"),
        })
    }
}

/// A session's datagram socket: bound to `local` (the address our control
/// connection to the bridge comes from, so never `[::]`) on a free port,
/// and connected to the bridge's datagram port, so the kernel delivers
/// datagrams from the bridge only.
fn bind_datagram_socket(local: std::net::IpAddr, bridge: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(bridge),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    mark(socket.as_raw_fd());
    let _ = socket.set_recv_buffer_size(2 << 20);
    let _ = socket.set_send_buffer_size(2 << 20);
    socket.bind(&SocketAddr::new(local, 0).into())?;
    socket.connect(&bridge.into())?;
    UdpSocket::from_std(socket.into())
}

/// Our mark keeps the bridge connection out of an exit's tunnel (a bridge
/// on another host); without it the connection still works.
fn mark(fd: std::os::fd::RawFd) {
    if let Err(error) = veilmesh_transport::sockets::mark_new_socket(fd) {
        tracing::debug!(%error, "SAM bridge socket not marked");
    }
}

/// This node's I2P address as the key file has it: None until the first
/// bridge generated the destination (the daemon does on its first start).
pub fn address_in_key_file(path: &Path) -> Result<Option<I2pAddress>, I2pError> {
    Ok(load_keys(path)?.map(|keys| keys.public().address()))
}

/// The key file: None until the first bridge generated one. Never read
/// through a symbolic link.
fn load_keys(path: &Path) -> Result<Option<PrivateKeys>, I2pError> {
    use std::os::unix::fs::PermissionsExt;
    let read = {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut file| {
                let mut text = String::new();
                file.read_to_string(&mut text).map(|_| text)
            })
    };
    let text = match read {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(I2pError::KeyFile {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if mode & 0o077 != 0 {
        return Err(I2pError::KeyFileMode {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    PrivateKeys::from_base64(&text)
        .map(Some)
        .map_err(|source| I2pError::BadKeyFile {
            path: path.to_owned(),
            source,
        })
}

/// Sends what the pacer hands out to the bridge, and sleeps until it has
/// more or something is queued.
async fn pace(inner: Arc<Inner>) {
    let mut payload = Vec::new();
    let mut datagram = Vec::new();
    loop {
        // Created before asking, so a push meanwhile is not missed.
        let woken = inner.pacer_wake.notified();
        let (transmit, timeout) = {
            let mut pacer = inner.pacer();
            match pacer.poll_transmit(Instant::now(), &mut payload) {
                Some(transmit) => (Some(transmit), None),
                None => (None, pacer.poll_timeout()),
            }
        };
        let Some(transmit) = transmit else {
            match timeout {
                Some(at) => {
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => woken.await,
            }
            continue;
        };
        datagram.clear();
        datagram.extend_from_slice(transmit.route.header.as_bytes());
        datagram.extend_from_slice(&payload);
        match transmit.route.socket.send(&datagram).await {
            Ok(_) => {
                let mut shared = inner.lock();
                shared.counters.sent += 1;
                shared.counters.messages_sent += transmit.messages as u64;
            }
            Err(error) => tracing::debug!(%error, "datagram to the SAM bridge failed"),
        }
    }
}

/// Why a session attempt or a running session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Sam(#[from] SamError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the bridge closed the connection")]
    Closed,
    #[error(
        "the bridge closed the connection instead of answering SESSION CREATE: it may refuse \
         the session options (emissary, for one, builds no tunnels of length 0)"
    )]
    ClosedOnCreate,
    #[error("cannot resolve `{0}`")]
    Resolve(String),
    #[error("the bridge created a session for another destination")]
    WrongDestination,
    #[error("a new session was asked for")]
    Renew,
    #[error("cannot save the new I2P destination to {path}: {error}")]
    KeySave { path: String, error: io::Error },
}

/// A SAM control connection after HELLO.
struct Control {
    lines: LineReader,
    writer: OwnedWriteHalf,
    peer: SocketAddr,
    local: SocketAddr,
}

/// Reads the bridge's reply lines. Cancel safe: bytes of a line that has
/// not fully arrived stay in `partial` when a `select!` drops the read, so
/// a reply split across TCP segments is never lost.
struct LineReader {
    read: OwnedReadHalf,
    partial: Vec<u8>,
}

impl LineReader {
    /// One line from the bridge, at most `sam::MAX_LINE` long.
    async fn next_line(&mut self) -> Result<String, SessionError> {
        loop {
            if let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.partial[..end]).into_owned();
                self.partial.drain(..=end);
                return Ok(line);
            }
            if self.partial.len() > sam::MAX_LINE {
                return Err(SamError::Malformed("reply line too long".into()).into());
            }
            let mut chunk = [0u8; 4096];
            // `read` is cancel safe: it either returns bytes or takes none.
            let n = self.read.read(&mut chunk).await?;
            if n == 0 {
                return Err(SessionError::Closed);
            }
            self.partial.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Control {
    async fn connect(bridge: &str) -> Result<Control, SessionError> {
        let addr = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(bridge))
            .await
            .map_err(|_| SessionError::Timeout("name resolution"))??
            .next()
            .ok_or_else(|| SessionError::Resolve(bridge.to_owned()))?;
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        mark(socket.as_raw_fd());
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| SessionError::Timeout("the TCP connection"))??;
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        let (peer, local) = (stream.peer_addr()?, stream.local_addr()?);
        let (read, writer) = stream.into_split();
        let mut control = Control {
            lines: LineReader {
                read,
                partial: Vec::new(),
            },
            writer,
            peer,
            local,
        };
        let hello = control
            .ask(&sam::hello(), REPLY_TIMEOUT, "HELLO REPLY")
            .await?;
        tracing::debug!(bridge, version = ?hello.get("VERSION"), "SAM bridge answered");
        Ok(control)
    }

    async fn ask(
        &mut self,
        command: &str,
        timeout: Duration,
        expected: &'static str,
    ) -> Result<sam::Reply, SessionError> {
        self.writer.write_all(command.as_bytes()).await?;
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .map_err(|_| SessionError::Timeout(expected))??;
        Ok(sam::Reply::parse(&line)?.expect_ok(expected)?)
    }
}

struct Supervisor {
    config: I2pConfig,
    keys: Option<PrivateKeys>,
    inner: Arc<Inner>,
}

impl Supervisor {
    fn set_state(&self, state: String) {
        self.inner.lock().state = state;
    }

    async fn run(
        mut self,
        mut lookups: mpsc::UnboundedReceiver<I2pAddress>,
        mut renewals: mpsc::UnboundedReceiver<()>,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut next = 0;
        // The bridge whose session ended last, and when.
        let mut ended: Option<(usize, tokio::time::Instant)> = None;
        loop {
            let mut errors = Vec::new();
            let mut lost_session = false;
            let count = self.config.bridges.len();
            for i in 0..count {
                let index = (next + i) % count;
                let bridge = self.config.bridges[index].clone();
                if let Some((_, at)) = ended.filter(|(i, _)| *i == index) {
                    self.set_state(format!(
                        "waiting for SAM bridge {bridge} to drop the old session"
                    ));
                    tokio::time::sleep_until(at + DESTINATION_TEARDOWN).await;
                }
                self.set_state(format!("creating a session on SAM bridge {bridge}"));
                match self.open(&bridge).await {
                    Ok((control, live)) => {
                        backoff = BACKOFF_MIN;
                        let why = self.serve(control, live, &mut lookups, &mut renewals).await;
                        ended = Some((index, tokio::time::Instant::now()));
                        lost_session = true;
                        if matches!(why, SessionError::Renew) {
                            tracing::info!(%bridge, "re-creating the I2P session: a peer cannot reach us");
                            next = index;
                        } else {
                            tracing::warn!(%bridge, "I2P session lost: {why}; re-creating it");
                            // Fail over: the next attempt starts with the following bridge.
                            next = index + 1;
                        }
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%bridge, "cannot create an I2P session: {error}");
                        errors.push(format!("{bridge}: {error}"));
                    }
                }
            }
            if lost_session {
                continue;
            }
            self.set_state(format!(
                "no SAM bridge reachable ({}); retrying in {} s",
                errors.join("; "),
                backoff.as_secs()
            ));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// HELLO, the destination (generated on first use), SESSION CREATE.
    async fn open(&mut self, bridge: &str) -> Result<(Control, Live), SessionError> {
        let mut control = Control::connect(bridge).await?;
        let keys = match &self.keys {
            Some(keys) => keys.clone(),
            None => {
                let reply = control
                    .ask(&sam::dest_generate(), REPLY_TIMEOUT, "DEST REPLY")
                    .await?;
                let keys = PrivateKeys::from_base64(reply.require("PRIV")?).map_err(|e| {
                    SamError::Malformed(format!("DEST REPLY PRIV is not a private key: {e}"))
                })?;
                // Unsaved, the address would change at the next start and
                // every peer would lose us: not used until saved.
                let path = &self.config.key_file;
                veilmesh_transport::write_private_file(path, keys.base64().as_bytes()).map_err(
                    |error| SessionError::KeySave {
                        path: path.display().to_string(),
                        error,
                    },
                )?;
                tracing::info!(path = %path.display(), "new I2P destination saved");
                self.inner.lock().address = Some(keys.public().address());
                self.keys = Some(keys.clone());
                keys
            }
        };
        let id = session_id(&self.config.label);
        // The bridge forwards datagrams to the address it sees us on.
        let bridge_udp = SocketAddr::new(control.peer.ip(), control.peer.port().saturating_sub(1));
        let socket = Arc::new(bind_datagram_socket(control.local.ip(), bridge_udp)?);
        let forward = socket.local_addr()?;
        let command = sam::session_create(
            &id,
            keys.base64(),
            &forward.ip().to_canonical().to_string(),
            forward.port(),
            &self.config.options,
        );
        let started = Instant::now();
        let reply = control
            .ask(&command, SESSION_CREATE_TIMEOUT, "SESSION STATUS")
            .await
            .map_err(|error| match error {
                SessionError::Closed => SessionError::ClosedOnCreate,
                other => other,
            })?;
        // i2pd echoes the private keys back: they must be ours.
        if let Some(echo) = reply.get("DESTINATION") {
            let same = PrivateKeys::from_base64(echo)
                .map(|k| k.public().address() == keys.public().address())
                .unwrap_or(false);
            if !same {
                return Err(SessionError::WrongDestination);
            }
        }
        tracing::info!(
            %bridge,
            address = %keys.public().address(),
            seconds = started.elapsed().as_secs_f32(),
            "I2P session created"
        );
        Ok((
            control,
            Live {
                bridge: bridge.to_owned(),
                socket,
                id,
            },
        ))
    }

    /// Runs a created session until its control connection ends: answers
    /// lookups one at a time (i2pd reads one command per read and drops the
    /// rest), never sends anything else (an unknown command makes i2pd
    /// close the session).
    async fn serve(
        &self,
        mut control: Control,
        live: Live,
        requests: &mut mpsc::UnboundedReceiver<I2pAddress>,
        renewals: &mut mpsc::UnboundedReceiver<()>,
    ) -> SessionError {
        {
            let mut shared = self.inner.lock();
            // LeaseSets a previous session looked up are not this session's.
            shared.lookups.clear();
            shared.live = Some(live.clone());
            shared.counters.sessions += 1;
            shared.state = format!("session up on SAM bridge {}", live.bridge);
            if let Some(receiver) = shared.receiver.take() {
                receiver.wake();
            }
        }
        while requests.try_recv().is_ok() {}
        while renewals.try_recv().is_ok() {}
        let result = self.serve_lookups(&mut control, requests, renewals).await;
        let mut shared = self.inner.lock();
        shared.live = None;
        shared.lookups.clear();
        shared.state = format!("session on {} lost", live.bridge);
        result
    }

    async fn serve_lookups(
        &self,
        control: &mut Control,
        requests: &mut mpsc::UnboundedReceiver<I2pAddress>,
        renewals: &mut mpsc::UnboundedReceiver<()>,
    ) -> SessionError {
        let mut waiting: VecDeque<I2pAddress> = VecDeque::new();
        let mut asked: Option<(I2pAddress, tokio::time::Instant)> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            if asked.is_none() {
                if let Some(address) = waiting.pop_front() {
                    let name = address.to_string();
                    if let Err(e) = control
                        .writer
                        .write_all(sam::naming_lookup(&name).as_bytes())
                        .await
                    {
                        return e.into();
                    }
                    self.inner.lock().counters.lookups += 1;
                    tracing::debug!(%address, "looking up I2P destination");
                    asked = Some((address, tokio::time::Instant::now()));
                }
            }
            tokio::select! {
                line = control.lines.next_line() => {
                    let line = match line {
                        Ok(line) => line,
                        Err(error) => return error,
                    };
                    match sam::Reply::parse(&line) {
                        Ok(reply) if reply.topic == "NAMING" && reply.kind == "REPLY" => {
                            let name = reply.get("NAME").unwrap_or_default();
                            if let Some((address, _)) = asked.filter(|(a, _)| I2pAddress::from_b32(name) == Some(*a)) {
                                asked = None;
                                self.finish_lookup(address, reply);
                            } else {
                                tracing::debug!(name, "NAMING REPLY for nothing we asked");
                            }
                        }
                        Ok(reply) => tracing::debug!(topic = %reply.topic, kind = %reply.kind, "unexpected SAM message ignored"),
                        Err(error) => tracing::debug!(%error, "unparseable SAM message ignored"),
                    }
                }
                Some(()) = renewals.recv() => return SessionError::Renew,
                Some(address) = requests.recv() => {
                    if asked.map(|(a, _)| a) != Some(address) && !waiting.contains(&address) {
                        waiting.push_back(address);
                    }
                }
                _ = tick.tick() => {
                    if let Some((address, since)) = asked {
                        if since.elapsed() > LOOKUP_TIMEOUT {
                            // A late reply is ignored: it names what it answers.
                            asked = None;
                            self.fail_lookup(address, "timed out".into());
                        }
                    }
                }
            }
        }
    }

    fn finish_lookup(&self, address: I2pAddress, reply: sam::Reply) {
        let result = reply
            .expect_ok("NAMING REPLY")
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let value = r.require("VALUE").map_err(|e| e.to_string())?;
                let dest = Destination::from_base64(value).map_err(|e| e.to_string())?;
                // The bridge must answer with the destination the hash names.
                if dest.address() != address {
                    return Err("the bridge returned another destination".into());
                }
                Ok(dest)
            });
        match result {
            Ok(dest) => {
                let dest: Arc<str> = dest.to_base64().into();
                let mut guard = self.inner.lock();
                let shared = &mut *guard;
                let held = match shared
                    .lookups
                    .insert(address, Lookup::Resolved(dest.clone()))
                {
                    Some(Lookup::Pending { held }) => held,
                    _ => Vec::new(),
                };
                tracing::debug!(%address, held = held.len(), "I2P destination resolved");
                if let Some(live) = shared.live.clone() {
                    for datagram in held {
                        self.inner.queue(shared, &live, &dest, &datagram);
                    }
                }
            }
            Err(why) => self.fail_lookup(address, why),
        }
    }

    fn fail_lookup(&self, address: I2pAddress, why: String) {
        tracing::info!(%address, %why, "I2P destination lookup failed");
        let mut shared = self.inner.lock();
        shared.counters.lookup_failures += 1;
        shared.lookups.insert(
            address,
            Lookup::Failed {
                until: Instant::now() + LOOKUP_RETRY,
                why,
            },
        );
    }
}

/// Unique per attempt: a router may still hold a session of ours that it
/// has not noticed is dead, and refuses a duplicate ID.
fn session_id(label: &str) -> String {
    let mut random = [0u8; 4];
    let _ = getrandom::fill(&mut random);
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let label: String = label
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    format!("veilmesh-{label}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(bridge: &str, dir: &Path) -> I2pConfig {
        I2pConfig {
            bridges: vec![bridge.to_owned()],
            key_file: dir.join("veil0.i2p"),
            options: SessionOptions {
                inbound_length: 1,
                outbound_length: 0,
                inbound_quantity: 1,
                outbound_quantity: 1,
                encryption_types: "4".into(),
                inbound_tags: sam::DEFAULT_INBOUND_TAGS,
            },
            label: "test".into(),
        }
    }

    #[test]
    fn session_ids_are_unique_and_one_word() {
        let a = session_id("veil 0");
        let b = session_id("veil 0");
        assert_ne!(a, b);
        assert!(a.starts_with("veilmesh-veil0-") && !a.contains(' '), "{a}");
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("veil0.i2p");
        assert!(load_keys(&path).unwrap().is_none());
        let mut blob = dest::tests::sample_destination(2);
        blob.extend_from_slice(&[1; 288]);
        veilmesh_transport::write_private_file(&path, dest::I2P_BASE64.encode(&blob).as_bytes())
            .unwrap();
        let keys = load_keys(&path).unwrap().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(keys.public().address().to_string().ends_with(".b32.i2p"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_keys(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_keys(&path)
            .unwrap_err()
            .to_string()
            .contains("not an I2P private key"));
    }

    /// A bridge that is not there: the transport starts anyway, reports
    /// why, and refuses sends without panicking.
    #[tokio::test]
    async fn starts_without_a_bridge_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bridge = unused.local_addr().unwrap().to_string();
        drop(unused);
        let mut transport = I2pTransport::start(test_config(&bridge, dir.path())).unwrap();
        let to = PeerAddr::I2p(I2pAddress([7; 32]));
        assert!(matches!(
            transport.send(&to, b"x"),
            Err(SendError::NotReady(_))
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !transport.describe().contains("no SAM bridge reachable") {
            assert!(Instant::now() < deadline, "{}", transport.describe());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            transport.describe().contains(&bridge),
            "{}",
            transport.describe()
        );
        assert!(transport.address().is_none());
    }

    /// A scripted SAM bridge on loopback: it answers HELLO and SESSION
    /// CREATE, DEST GENERATE with `private_keys`, and NAMING LOOKUP with
    /// `lookup_reply` written in two pieces `pause` apart. It reports the
    /// SESSION CREATE line it got, and closes the connection instead of
    /// answering it if `refuse_sessions` (as emissary does with options it
    /// does not support).
    async fn scripted_bridge(
        private_keys: String,
        lookup_reply: String,
        pause: Duration,
        refuse_sessions: bool,
    ) -> (String, mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bridge = listener.local_addr().unwrap().to_string();
        let (created, created_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = if line.starts_with("HELLO") {
                    "HELLO REPLY RESULT=OK VERSION=3.1\n".to_owned()
                } else if line.starts_with("DEST GENERATE") {
                    format!("DEST REPLY PUB=x PRIV={private_keys}\n")
                } else if line.starts_with("SESSION CREATE") {
                    let _ = created.send(line.clone());
                    if refuse_sessions {
                        return;
                    }
                    format!("SESSION STATUS RESULT=OK DESTINATION={private_keys}\n")
                } else if line.starts_with("NAMING LOOKUP") {
                    let (first, second) = lookup_reply.split_at(lookup_reply.len() / 2);
                    let _ = write.write_all(first.as_bytes()).await;
                    tokio::time::sleep(pause).await;
                    second.to_owned()
                } else {
                    continue;
                };
                if write.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        (bridge, created_rx)
    }

    fn sample_keys() -> String {
        let mut blob = dest::tests::sample_destination(2);
        blob.extend_from_slice(&[1; 288]);
        dest::I2P_BASE64.encode(&blob)
    }

    /// A NAMING REPLY that arrives in two TCP segments 1.5 s apart (the
    /// supervisor's 1 s tick fires in between) still resolves the peer,
    /// at once rather than after the 30 s lookup timeout.
    #[tokio::test]
    async fn a_reply_split_across_segments_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let peer =
            Destination::from_base64(&dest::I2P_BASE64.encode(&dest::tests::sample_destination(8)))
                .unwrap();
        let reply = format!(
            "NAMING REPLY RESULT=OK NAME={} VALUE={}\n",
            peer.address(),
            peer.to_base64()
        );
        let (bridge, mut created) =
            scripted_bridge(sample_keys(), reply, Duration::from_millis(1500), false).await;
        let mut transport = I2pTransport::start(test_config(&bridge, dir.path())).unwrap();
        let create = tokio::time::timeout(Duration::from_secs(5), created.recv())
            .await
            .unwrap()
            .unwrap();
        // The datagram socket faces the bridge: loopback, never [::].
        assert!(create.contains(" HOST=127.0.0.1 "), "{create}");
        let to = PeerAddr::I2p(peer.address());
        let deadline = Instant::now() + Duration::from_secs(5);
        while transport.send(&to, b"first datagram").is_err() {
            assert!(Instant::now() < deadline, "{}", transport.describe());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        while transport.path_state(&to).as_deref() != Some("destination resolved") {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?} after {:?}",
                transport.path_state(&to),
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A destination the bridge made that cannot be saved is not used: the
    /// address would change at the next start and every peer lose us.
    #[tokio::test]
    async fn a_destination_that_cannot_be_saved_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (bridge, _created) =
            scripted_bridge(sample_keys(), String::new(), Duration::ZERO, false).await;
        let mut config = test_config(&bridge, dir.path());
        // Absent, so there is nothing to read, and impossible to create.
        config.key_file = "/proc/veilmesh-no-such-directory/veil0.i2p".into();
        let transport = I2pTransport::start(config).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !transport
            .describe()
            .contains("cannot save the new I2P destination")
        {
            assert!(Instant::now() < deadline, "{}", transport.describe());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(transport.address().is_none());
        assert_eq!(transport.generation(), 0, "a session was created anyway");
    }

    /// A bridge that hangs up on SESSION CREATE: the error names the
    /// command and the likely cause, not just a closed connection.
    #[tokio::test]
    async fn a_session_refused_by_hanging_up_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (bridge, _created) =
            scripted_bridge(sample_keys(), String::new(), Duration::ZERO, true).await;
        let transport = I2pTransport::start(test_config(&bridge, dir.path())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !transport
            .describe()
            .contains("closed the connection instead of answering SESSION CREATE")
        {
            assert!(Instant::now() < deadline, "{}", transport.describe());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(transport.generation(), 0);
    }

    /// A fake bridge that answers garbage: a clear error, no panic, and the
    /// transport keeps retrying.
    #[tokio::test]
    async fn garbage_from_the_bridge_is_an_error_not_a_panic() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bridge = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HELLO REPLY RESULT=OK VERSION=3.1\n\xff\xfe garbage \"\n")
                    .await;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let transport = I2pTransport::start(test_config(&bridge, dir.path())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !transport.describe().contains("malformed SAM reply") {
            assert!(Instant::now() < deadline, "{}", transport.describe());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!dir.path().join("veil0.i2p").exists());
    }
}
