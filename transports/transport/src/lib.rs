//! The one small interface every veilmesh transport implements.
//!
//! A transport is a dumb pipe for opaque datagrams (Noise messages) between
//! this node and a peer, addressed by a typed [`PeerAddr`]. It knows nothing
//! about sessions, routing or keys: the daemon's core owns those, so a peer can
//! move between transports without a new handshake.

pub mod sockets;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};

/// What `veilmesh netcheck` reports of a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Working now: bound, connected to its network, session up.
    pub up: bool,
    /// What was found, one fact each: "bound on port 51820", "DHT
    /// connected over UDP", "STUN 198.18.0.3:3478 sees 203.0.113.5:40000".
    pub facts: Vec<String>,
}

/// The kinds of transport veilmesh knows, in the default order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportKind {
    Udp,
    Tox,
    I2p,
    /// Through another peer that forwards the sealed datagrams (the core's
    /// own; no transport of the daemon carries it, and a config cannot
    /// list it: it follows from `[[peer]] relay = true`).
    Relay,
}

impl TransportKind {
    pub const ALL: [TransportKind; 3] =
        [TransportKind::Udp, TransportKind::Tox, TransportKind::I2p];

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Udp => "udp",
            TransportKind::Tox => "tox",
            TransportKind::I2p => "i2p",
            TransportKind::Relay => "relay",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown transport `{s}` (expected one of: udp, tox, i2p)"))
    }
}

/// A path through a relay: the relay's veilmesh public key, and the key of
/// the peer at the other end.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayAddr {
    pub relay: [u8; 32],
    pub peer: [u8; 32],
}

impl fmt::Debug for RelayAddr {
    /// The relay's key, shortened (the core shows its name instead).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.relay[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// A Tox friend's long-term DHT public key (the first 32 bytes of its Tox ID).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ToxPublicKey(pub [u8; 32]);

impl fmt::Debug for ToxPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02X}")?;
        }
        f.write_str("…")
    }
}

/// A Tox ID: public key, nospam and checksum (76 hex characters), what a
/// friend request goes to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ToxId(pub [u8; TOX_ID_SIZE]);

pub const TOX_ID_SIZE: usize = 38;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ToxIdError {
    #[error("a Tox ID is 76 hex characters, this has {0}")]
    Length(usize),
    #[error("not hexadecimal")]
    Hex,
    #[error("checksum mismatch (mistyped?)")]
    Checksum,
}

impl ToxId {
    pub fn public_key(&self) -> ToxPublicKey {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&self.0[..32]);
        ToxPublicKey(pk)
    }

    /// The key and nospam, XORed in two-byte steps.
    fn checksum(bytes: &[u8]) -> [u8; 2] {
        let mut sum = [0u8; 2];
        for (i, b) in bytes.iter().enumerate() {
            sum[i % 2] ^= b;
        }
        sum
    }
}

impl std::str::FromStr for ToxId {
    type Err = ToxIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.len() != 2 * TOX_ID_SIZE {
            return Err(ToxIdError::Length(text.len()));
        }
        let decoded = data_encoding::HEXUPPER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(|_| ToxIdError::Hex)?;
        let bytes: [u8; TOX_ID_SIZE] = decoded.try_into().map_err(|_| ToxIdError::Hex)?;
        if ToxId::checksum(&bytes[..36]) != bytes[36..] {
            return Err(ToxIdError::Checksum);
        }
        Ok(ToxId(bytes))
    }
}

impl fmt::Display for ToxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXUPPER.encode(&self.0))
    }
}

impl fmt::Debug for ToxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ToxId({self})")
    }
}

/// An I2P destination named by its hash: the SHA-256 of the full
/// destination, which is what a `.b32.i2p` address encodes. The I2P transport
/// resolves it to the full destination before sending.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct I2pAddress(pub [u8; 32]);

impl I2pAddress {
    /// The 52-character base32 name, without the `.b32.i2p` suffix.
    pub fn base32(&self) -> String {
        data_encoding::BASE32_NOPAD
            .encode(&self.0)
            .to_ascii_lowercase()
    }

    /// Parses `<52 base32 chars>.b32.i2p` (the suffix may be left off).
    pub fn from_b32(text: &str) -> Option<I2pAddress> {
        let name = text.trim();
        let name = name.strip_suffix(".b32.i2p").unwrap_or(name);
        if name.len() != 52 {
            return None;
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(name.to_ascii_uppercase().as_bytes())
            .ok()?;
        Some(I2pAddress(bytes.try_into().ok()?))
    }
}

impl fmt::Display for I2pAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.b32.i2p", self.base32())
    }
}

impl fmt::Debug for I2pAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "I2pAddress({self})")
    }
}

/// What a transport must know of a peer before any traffic flows, for
/// [`Transport::reconfigure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact {
    /// Friend requests go to this ID; only its key may carry the peer.
    Tox(ToxId),
    I2p(I2pAddress),
}

impl Contact {
    pub fn kind(&self) -> TransportKind {
        match self {
            Contact::Tox(_) => TransportKind::Tox,
            Contact::I2p(_) => TransportKind::I2p,
        }
    }
}

/// Where a datagram goes to or came from, typed by transport.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum PeerAddr {
    Udp(SocketAddr),
    Tox(ToxPublicKey),
    I2p(I2pAddress),
    /// Through another peer, which forwards to (or from) this one.
    Relay(RelayAddr),
    /// Received over a transport that does not say who sent it (I2P RAW
    /// datagrams). Never a path: the core attributes the datagram by what
    /// it decrypts as, and answers the attributed peer's own address.
    Unattributed(TransportKind),
}

impl PeerAddr {
    pub fn kind(&self) -> TransportKind {
        match self {
            PeerAddr::Udp(_) => TransportKind::Udp,
            PeerAddr::Tox(_) => TransportKind::Tox,
            PeerAddr::I2p(_) => TransportKind::I2p,
            PeerAddr::Relay(_) => TransportKind::Relay,
            PeerAddr::Unattributed(kind) => *kind,
        }
    }

    /// The IP address the datagram came from, where the transport reveals one.
    /// Used for cookie (DoS) replies; never for anonymous transports.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            PeerAddr::Udp(sa) => Some(sa.ip()),
            PeerAddr::Tox(_)
            | PeerAddr::I2p(_)
            | PeerAddr::Relay(_)
            | PeerAddr::Unattributed(_) => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Udp(sa) => write!(f, "udp {sa}"),
            PeerAddr::Tox(pk) => write!(f, "tox {pk:?}"),
            PeerAddr::I2p(d) => write!(f, "i2p {d}"),
            PeerAddr::Relay(r) => write!(f, "relay via {r:?}"),
            PeerAddr::Unattributed(kind) => write!(f, "{kind} (sender not named)"),
        }
    }
}

/// How big a datagram a path carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatagramLimits {
    /// Largest datagram that crosses the path without being fragmented
    /// underneath. Inner packets that must not be fragmented (IPv6, IPv4 with
    /// DF) are held to this.
    pub unfragmented: usize,
    /// Largest datagram the transport accepts at all.
    pub absolute: usize,
}

/// Why a datagram could not be handed to the transport. The caller counts it;
/// nothing here is fatal for the transport.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the transport's send queue is full")]
    Backpressure,
    #[error("datagram of {len} bytes exceeds the transport maximum of {max}")]
    TooBig { len: usize, max: usize },
    #[error("address {0} belongs to another transport")]
    WrongTransport(PeerAddr),
    #[error("transport not ready: {0}")]
    NotReady(&'static str),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Datagrams received in one call: who sent them and how many bytes of
/// the buffer they fill. With receive offload (UDP GRO) several datagrams
/// of one sender come back to back, each `segment` bytes long but the
/// last, which may be shorter; otherwise `segment == len`.
#[derive(Debug)]
pub struct Received {
    pub from: PeerAddr,
    pub len: usize,
    pub segment: usize,
}

impl Received {
    /// One datagram of `len` bytes.
    pub fn one(from: PeerAddr, len: usize) -> Received {
        Received {
            from,
            len,
            segment: len,
        }
    }

    /// The datagrams in `buf` (the buffer the receive call filled).
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> std::slice::Chunks<'a, u8> {
        buf[..self.len.min(buf.len())].chunks(self.segment.max(1))
    }
}

/// An opaque datagram pipe. Implementations never block: `send` queues or
/// sends at once and reports backpressure; `poll_recv` is driven by the
/// daemon's single event loop.
pub trait Transport: Send {
    fn kind(&self) -> TransportKind;

    /// Size limits of datagrams to `to`. Pure: the core asks it per packet.
    fn limits(&self, to: &PeerAddr) -> DatagramLimits;

    /// Hand one datagram to the transport.
    fn send(&mut self, to: &PeerAddr, datagram: &[u8]) -> Result<(), SendError>;

    /// Sends `datagrams` to `to`: back to back in one buffer, each
    /// `segment` bytes long but the last, which may be shorter. Transports
    /// without a batched send (the default) send them one by one; UDP hands
    /// up to 64 to the kernel in one call (GSO).
    fn send_batch(
        &mut self,
        to: &PeerAddr,
        datagrams: &[u8],
        segment: usize,
    ) -> Result<(), SendError> {
        for datagram in datagrams.chunks(segment.max(1)) {
            self.send(to, datagram)?;
        }
        Ok(())
    }

    /// `send` with this IP TTL, for the probe that opens a NAT mapping
    /// without reaching the peer's NAT. Transports without IP hops of
    /// their own send normally.
    fn send_with_ttl(&mut self, to: &PeerAddr, datagram: &[u8], ttl: u8) -> Result<(), SendError> {
        let _ = ttl;
        self.send(to, datagram)
    }

    /// Where peers may reach this node over this transport (our UDP
    /// endpoints: interface addresses, the public mapping). Empty for
    /// transports addressed by identity.
    fn local_endpoints(&self) -> Vec<PeerAddr> {
        Vec::new()
    }

    /// How many times this node's presence on the transport was created
    /// (an I2P session: the first, then one per failover or renewal). A
    /// change tells the core that peers may still send to the old one.
    /// Transports addressed by something that never moves stay at 0.
    fn generation(&self) -> u64 {
        0
    }

    /// Re-create this node's presence, same identity: a peer asked,
    /// because what carries its traffic to us still points at an old one
    /// (an I2P router's ratchet session with our previous router). Rate
    /// limited by the transport; a no-op where there is nothing to renew.
    fn renew(&mut self) {}

    /// The peers allowed on this transport changed (a reload): `contacts`
    /// are all of them now, those of this transport's kind. A transport
    /// that keeps state per peer (Tox's friend list) adds the new ones and
    /// forgets the rest. Never blocks the event loop.
    fn reconfigure(&mut self, contacts: &[Contact]) {
        let _ = contacts;
    }

    /// Receive one datagram into `buf`. Datagrams longer than `buf` are
    /// dropped by the transport (the daemon's buffer fits every legal one).
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>>;

    /// Non-blocking receive; `Ok(None)` when nothing is waiting. Lets the
    /// event loop drain a batch after one wake-up.
    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>>;

    /// One-line human description of the transport's own state (bound port,
    /// session, ...), for `veilmesh show`.
    fn describe(&self) -> String;

    /// Whether the transport works right now, and what says so, for
    /// `veilmesh netcheck`.
    fn health(&self) -> Health;

    /// The transport's view of one path, e.g. a Tox friend's connection
    /// state; None where it has nothing to add.
    fn path_state(&self, _to: &PeerAddr) -> Option<String> {
        None
    }
}

/// Writes a transport's state or key file atomically, readable by its owner
/// only; a missing directory is created private (0700). The temporary file
/// is new (O_EXCL) and named after the target, so two files saved at once
/// in one directory (the Tox state and the I2P key) never swap contents;
/// file and directory are synced, so a crash leaves the old or the new
/// file, never none.
pub fn write_private_file(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy();
    let (tmp, mut file) = loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(file) => break (tmp, file),
            // Left by a crashed process with our pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A Tox ID built by hand: key 0x01.., nospam 0xAABBCCDD, checksum XOR.
    fn sample() -> String {
        let mut bytes = vec![1u8; 32];
        bytes.extend_from_slice(&[0xAA, 0xBB, 0xCC, 0xDD]);
        let sum = ToxId::checksum(&bytes);
        bytes.extend_from_slice(&sum);
        data_encoding::HEXUPPER.encode(&bytes)
    }

    #[test]
    fn tox_ids_parse_and_print() {
        let text = sample();
        let id: ToxId = text.parse().unwrap();
        assert_eq!(id.to_string(), text);
        assert_eq!(id.public_key().0, [1u8; 32]);
        assert_eq!(text.to_lowercase().parse::<ToxId>().unwrap(), id);
    }

    #[test]
    fn bad_tox_ids_say_why() {
        let text = sample();
        assert_eq!("abc".parse::<ToxId>(), Err(ToxIdError::Length(3)));
        assert_eq!(
            format!("{}ZZ", &text[..74]).parse::<ToxId>(),
            Err(ToxIdError::Hex)
        );
        let mut flipped = text.clone();
        flipped.replace_range(0..2, "02");
        assert_eq!(flipped.parse::<ToxId>(), Err(ToxIdError::Checksum));
    }

    #[test]
    fn i2p_addresses_print_and_parse_as_b32() {
        let addr = I2pAddress([0xAB; 32]);
        let text = addr.to_string();
        assert_eq!(text.len(), 52 + ".b32.i2p".len());
        assert_eq!(I2pAddress::from_b32(&text), Some(addr));
        assert_eq!(
            I2pAddress::from_b32(&addr.base32().to_uppercase()),
            Some(addr)
        );
        assert_eq!(I2pAddress::from_b32("tooshort.b32.i2p"), None);
        assert_eq!(
            I2pAddress::from_b32(&format!("{}1.b32.i2p", &addr.base32()[..51])),
            None
        );
    }

    #[test]
    fn transport_kind_round_trips_through_its_name() {
        for k in TransportKind::ALL {
            assert_eq!(k.as_str().parse::<TransportKind>().unwrap(), k);
        }
        let err = "carrier-pigeon".parse::<TransportKind>().unwrap_err();
        assert!(err.contains("carrier-pigeon"), "{err}");
    }

    /// The Tox state and the I2P key saved at once in one directory each
    /// keep their own contents (they once shared the temporary name
    /// `veil0.tmp`, and one could end up with the other's bytes).
    #[test]
    fn files_saved_at_once_never_swap_contents() {
        let dir = tempfile::tempdir().unwrap();
        let (tox, i2p) = (dir.path().join("veil0.tox"), dir.path().join("veil0.i2p"));
        let writer = |path: std::path::PathBuf, byte: u8| {
            std::thread::spawn(move || {
                for i in 0..300 {
                    let content = vec![byte; 1000 + i];
                    write_private_file(&path, &content).unwrap();
                    let read = std::fs::read(&path).unwrap();
                    assert!(
                        read.iter().all(|b| *b == byte),
                        "{} got another file's bytes",
                        path.display()
                    );
                }
            })
        };
        let (a, b) = (writer(tox.clone(), b't'), writer(i2p.clone(), b'i'));
        a.join().unwrap();
        b.join().unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "temporary files left: {left:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&tox).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn only_udp_addresses_reveal_an_ip() {
        let udp = PeerAddr::Udp("198.18.0.1:51820".parse().unwrap());
        assert_eq!(udp.ip(), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(PeerAddr::Tox(ToxPublicKey([7; 32])).ip(), None);
        assert_eq!(PeerAddr::I2p(I2pAddress([1; 32])).ip(), None);
    }
}
