//! The sans-IO core: peers, their Noise sessions, cryptokey routing and
//! timers. It never touches a socket or a clock; the event loop hands it
//! packets and `now`, and sends what it returns.
//!
//! boringtun keeps its own monotonic clock for handshake and rekey timers;
//! everything veilmesh decides itself (timer ticks, roaming, statistics)
//! runs on the `now` passed in.

pub mod packet;
pub mod paths;
pub mod peer_messages;
pub mod routing;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use veilmesh_transport::{DatagramLimits, PeerAddr, TransportKind};

use crate::config::PeerConfig;
use crate::identity::{PrivateKey, PublicKey};
use packet::{IpInfo, Unreachable};
use paths::{PathSet, PathStatus};
use peer_messages::PeerMessage;
use routing::RoutingTable;

/// WireGuard data message overhead: 16-byte header + 16-byte tag.
pub const NOISE_OVERHEAD: usize = 32;
/// How often boringtun's timers are driven (as its own device does).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake initiations accepted per second before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Peer ids live in the top 24 bits of boringtun's session indices.
const MAX_PEERS: usize = 1 << 24;
/// Without a live direct path, endpoints are re-announced (and so punched
/// again) this often.
const REPUNCH_INTERVAL: Duration = Duration::from_secs(30);
/// Two nodes meeting through the DHT each read the other's endpoints
/// within one poll interval of the other (see `rendezvous`); full packets
/// wait that long plus slack, so both NATs are open when they arrive.
pub const RENDEZVOUS_OPEN_DELAY: Duration = Duration::from_secs(7);
/// Handshake initiations while punching without a session, at most.
const PUNCH_HANDSHAKE_SPACING: Duration = Duration::from_millis(500);
/// Endpoints peers saw us at (from probe replies), kept as candidates.
const MAX_OBSERVED_SELF: usize = 4;
/// Default TTL of the opening punch probe: enough to leave one NAT
/// gateway (the first hop), not enough to cross the next router and reach
/// the peer's NAT.
pub const DEFAULT_PUNCH_TTL: u8 = 2;
/// A peer's requests to renew our presence on a transport are acted on at
/// most once per this long (it asks for `paths::RENEW_ASK_WINDOW`).
const RENEW_COOLDOWN: Duration = Duration::from_secs(60);
/// A peer whose handshake initiations keep coming although we answered
/// each (this many within `REPEATED_INITIATIONS_WINDOW`) does not get our
/// answers: it cannot ask us to renew (that needs a session), so this asks.
const REPEATED_INITIATIONS: u32 = 3;
const REPEATED_INITIATIONS_WINDOW: Duration = Duration::from_secs(30);
/// A re-created presence this soon after a peer asked for it is the
/// answer: peers are contacted but not asked to renew in turn.
const RENEW_ANSWER_TIME: Duration = Duration::from_secs(300);

pub type PeerId = usize;

/// Counters kept per peer; all monotonic.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerCounters {
    /// Decrypted packets whose source is not among the peer's allowed IPs.
    pub spoofed_source: u64,
    /// Packets for this peer while no path to it is known.
    pub no_route: u64,
    /// Packets larger than the path in use carries.
    pub oversize: u64,
    /// Datagrams from this peer that failed to authenticate or parse.
    pub bad_packet: u64,
    /// Datagrams claiming this peer over a path it may not use: a transport
    /// outside its `transports`, or a Tox key / I2P destination not its own.
    #[serde(default)]
    pub wrong_path: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Noise handshakes completed (either side initiating).
    pub handshakes: u64,
}

/// Counters for what cannot be pinned on a configured peer.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeCounters {
    /// Handshakes from keys not in the config.
    pub unknown_peer_handshakes: u64,
    /// Datagrams that are not WireGuard messages, or name no session of ours.
    pub bad_packet: u64,
    /// TUN packets to an address no peer owns.
    pub no_route: u64,
    /// Unparseable packets read from the TUN.
    pub bad_tun_packet: u64,
    /// Multicast/broadcast from the kernel (router solicitations, MLD, ...).
    pub multicast_ignored: u64,
    /// Cookie replies sent because handshakes arrived too fast.
    pub cookies_sent: u64,
    /// Datagrams the transport refused (queue full, socket error).
    pub send_errors: u64,
}

/// Why a packet went nowhere; each is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    BadPacket,
    Multicast,
    NoRoute,
    Oversize,
    Spoofed,
    UnknownPeer,
    WrongPath,
    Queued,
}

/// What to do with a packet read from the TUN.
#[derive(Debug)]
pub enum FromTun<'a> {
    /// Send this datagram on the path to the peer.
    Send { to: PeerAddr, datagram: &'a [u8] },
    /// Write this (ICMP) packet back to the TUN.
    Reply(&'a [u8]),
    /// Nothing to do now; `Queued` means held until the handshake completes.
    Done(DropReason),
}

/// What to do with a datagram from a transport.
#[derive(Debug)]
pub enum FromNetwork<'a> {
    /// Write this decrypted IP packet to the TUN.
    ToTun(&'a [u8]),
    /// Nothing for the TUN (handshake, keepalive, or a counted drop); check
    /// `poll_transmit` for replies.
    Consumed,
    Dropped(DropReason),
}

/// A datagram the core wants sent, outside the per-packet fast path
/// (handshakes, keepalives, cookies, packets flushed after a handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: PeerAddr,
    pub payload: Vec<u8>,
    /// Send with this IP TTL instead of the default (punch probes).
    pub ttl: Option<u8>,
}

impl Transmit {
    fn new(to: PeerAddr, payload: &[u8]) -> Transmit {
        Transmit {
            to,
            payload: payload.to_vec(),
            ttl: None,
        }
    }
}

struct Peer {
    config: PeerConfig,
    tunn: Tunn,
    /// Candidate paths and the one in use.
    paths: PathSet,
    /// When to announce our UDP endpoints to the peer next.
    announce_at: Option<Instant>,
    /// The last handshake initiation sent to punch without a session.
    last_punch_handshake: Option<Instant>,
    /// When the peer last made us renew our presence on a transport.
    renew_asked: Option<Instant>,
    /// Handshake initiations answered since the peer last sent data: how
    /// many, since when.
    initiations: Option<(u32, Instant)>,
    counters: PeerCounters,
}

impl Peer {
    fn path(&self) -> Option<PeerAddr> {
        self.paths.in_use().cloned()
    }

    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    fn select_path(&mut self, now: Instant) {
        if let Some(path) = self.paths.select(now, &self.config.transports) {
            tracing::info!(peer = %self.config.name, %path, "path in use changed");
        }
    }
}

pub struct Node {
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    mesh_address: Ipv6Addr,
    /// Indexed by peer id. Ids are never reused: they live on in session
    /// indices of messages still in flight after a peer is removed.
    peers: Vec<Option<Peer>>,
    by_key: HashMap<[u8; 32], PeerId>,
    routes: RoutingTable<PeerId>,
    rate_limiter: Arc<RateLimiter>,
    counters: NodeCounters,
    transmits: VecDeque<Transmit>,
    next_tick: Instant,
    next_rate_limit_reset: Instant,
    /// When some peer's probes or announcement are due.
    next_probe_due: Instant,
    /// Our UDP endpoints (interface addresses, STUN mappings), announced
    /// to peers that may use UDP.
    local_candidates: Vec<SocketAddr>,
    /// Where peers saw our probes come from: our NAT's mappings.
    observed_self: VecDeque<SocketAddr>,
    punch_ttl: u8,
    /// Transports whose presence peers asked us to re-create, for the
    /// daemon to act on.
    renewals: VecDeque<TransportKind>,
    /// The last renewal a peer asked for, and when.
    renewing: Option<(TransportKind, Instant)>,
    /// Our presence on a transport moved at this time: if no peer gets
    /// through, our own router may hold stale routes to them (LeaseSets of
    /// tunnels that died with the old router, or that its cache kept).
    moved: Option<(TransportKind, Instant)>,
    /// We renewed our own presence on this transport (once per move).
    renewed_self: Option<TransportKind>,
    /// The latest `now` handed in, for the per-packet calls that take none.
    last_now: Instant,
    scratch: Vec<u8>,
    message_buf: Vec<u8>,
}

/// Room for the largest datagram any transport carries plus Noise overhead.
pub const BUFFER_SIZE: usize = 65_536 + NOISE_OVERHEAD + 64;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("too many peers: {0} (at most {MAX_PEERS})")]
    TooManyPeers(usize),
}

impl Node {
    pub fn new(
        private_key: &PrivateKey,
        peers: Vec<PeerConfig>,
        now: Instant,
    ) -> Result<Node, NodeError> {
        if peers.len() >= MAX_PEERS {
            return Err(NodeError::TooManyPeers(peers.len()));
        }
        let private = private_key.to_x25519();
        let public = x25519::PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let mut node = Node {
            mesh_address: PublicKey(public.to_bytes()).mesh_address(),
            private,
            public,
            peers: Vec::with_capacity(peers.len()),
            by_key: HashMap::new(),
            routes: RoutingTable::default(),
            rate_limiter,
            counters: NodeCounters::default(),
            transmits: VecDeque::new(),
            next_tick: now,
            next_rate_limit_reset: now + Duration::from_secs(1),
            next_probe_due: now,
            local_candidates: Vec::new(),
            observed_self: VecDeque::new(),
            punch_ttl: DEFAULT_PUNCH_TTL,
            renewals: VecDeque::new(),
            renewing: None,
            moved: None,
            renewed_self: None,
            last_now: now,
            scratch: vec![0u8; BUFFER_SIZE],
            message_buf: Vec::with_capacity(512),
        };
        node.reconfigure(peers, now)?;
        Ok(node)
    }

    fn new_peer(&self, id: PeerId, config: PeerConfig, now: Instant) -> Peer {
        let tunn = Tunn::new(
            self.private.clone(),
            config.public_key.to_x25519(),
            None,
            config.persistent_keepalive,
            id as u32,
            Some(self.rate_limiter.clone()),
        );
        Peer {
            paths: PathSet::new(configured_paths(&config), now),
            announce_at: None,
            last_punch_handshake: None,
            renew_asked: None,
            initiations: None,
            tunn,
            config,
            counters: PeerCounters::default(),
        }
    }

    /// Applies a new peer list (a config reload). Peers whose configuration
    /// is unchanged keep their session, path and counters; a changed peer
    /// keeps its session too, unless its keepalive changed (boringtun fixes
    /// that at creation). Removed peers are forgotten.
    pub fn reconfigure(
        &mut self,
        peers: Vec<PeerConfig>,
        now: Instant,
    ) -> Result<ReconfigureReport, NodeError> {
        let mut report = ReconfigureReport::default();
        let mut wanted: HashMap<[u8; 32], PeerConfig> =
            peers.into_iter().map(|p| (p.public_key.0, p)).collect();
        for slot in &mut self.peers {
            let Some(peer) = slot else { continue };
            match wanted.remove(&peer.config.public_key.0) {
                None => {
                    report.removed.push(peer.config.name.clone());
                    *slot = None;
                }
                Some(config) if config == peer.config => report.unchanged.push(config.name),
                Some(config) => {
                    report.changed.push(config.name.clone());
                    let paths_changed = config.endpoint != peer.config.endpoint
                        || config.tox != peer.config.tox
                        || config.i2p != peer.config.i2p
                        || config.transports != peer.config.transports;
                    if paths_changed {
                        peer.paths
                            .set_configured(configured_paths(&config), now, |p| {
                                path_allowed(&config, p)
                            });
                    }
                    peer.config = config;
                    peer.select_path(now);
                }
            }
        }
        let keepalive_changed: Vec<PeerId> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(id, p)| {
                let p = p.as_ref()?;
                (p.tunn.persistent_keepalive() != p.config.persistent_keepalive).then_some(id)
            })
            .collect();
        for id in keepalive_changed {
            if let Some(old) = self.peers[id].take() {
                let mut fresh = self.new_peer(id, old.config, now);
                fresh.paths = old.paths;
                fresh.counters = old.counters;
                self.peers[id] = Some(fresh);
            }
        }
        let mut added: Vec<PeerConfig> = wanted.into_values().collect();
        added.sort_by(|a, b| a.name.cmp(&b.name));
        if self.peers.len() + added.len() >= MAX_PEERS {
            return Err(NodeError::TooManyPeers(self.peers.len() + added.len()));
        }
        for config in added {
            report.added.push(config.name.clone());
            let id = self.peers.len();
            let mut peer = self.new_peer(id, config, now);
            peer.select_path(now);
            self.peers.push(Some(peer));
        }
        self.rebuild_indexes();
        Ok(report)
    }

    fn rebuild_indexes(&mut self) {
        self.routes = RoutingTable::default();
        self.by_key.clear();
        for (id, peer) in self.peers.iter().enumerate() {
            let Some(peer) = peer else { continue };
            for net in peer.config.all_allowed_ips() {
                self.routes.insert(net, id);
            }
            self.by_key.insert(peer.config.public_key.0, id);
        }
    }

    pub fn mesh_address(&self) -> Ipv6Addr {
        self.mesh_address
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    pub fn counters(&self) -> &NodeCounters {
        &self.counters
    }

    pub fn record_send_error(&mut self) {
        self.counters.send_errors += 1;
    }

    /// Handles one IP packet read from the TUN. `limits` tells how large a
    /// datagram the path carries; `out` must hold `BUFFER_SIZE` bytes.
    pub fn handle_tun_packet<'a>(
        &mut self,
        packet: &[u8],
        limits: impl Fn(&PeerAddr) -> DatagramLimits,
        out: &'a mut [u8],
    ) -> FromTun<'a> {
        let info = match packet::parse(packet) {
            Ok(info) => info,
            Err(error) => {
                self.counters.bad_tun_packet += 1;
                tracing::trace!(%error, "unparseable packet from the TUN");
                return FromTun::Done(DropReason::BadPacket);
            }
        };
        let packet = &packet[..info.total_len];
        if peer_messages::is_peer_message(packet) {
            // Only cores write these; the kernel (a raw socket) may not.
            self.counters.bad_tun_packet += 1;
            return FromTun::Done(DropReason::BadPacket);
        }
        if packet::is_multicast_or_broadcast(&info.dst) {
            self.counters.multicast_ignored += 1;
            return FromTun::Done(DropReason::Multicast);
        }
        let Some(&id) = self.routes.lookup(info.dst) else {
            self.counters.no_route += 1;
            tracing::trace!(dst = %info.dst, "no peer owns the destination");
            return self.unreachable(packet, &info, Unreachable::NoRoute, out);
        };
        let Some(peer) = self.peers[id].as_mut() else {
            self.counters.no_route += 1;
            return FromTun::Done(DropReason::NoRoute);
        };
        let Some(path) = peer.path() else {
            peer.counters.no_route += 1;
            tracing::trace!(peer = %peer.config.name, "no path to peer");
            return self.unreachable(packet, &info, Unreachable::NoPath, out);
        };
        let limits = limits(&path);
        let may_fragment_below = matches!(info.dst, IpAddr::V4(_)) && !info.dont_fragment;
        let carried = if may_fragment_below {
            limits.absolute
        } else {
            limits.unfragmented
        };
        if packet.len() + NOISE_OVERHEAD > carried {
            peer.counters.oversize += 1;
            let mtu = limits.unfragmented.saturating_sub(NOISE_OVERHEAD);
            tracing::trace!(peer = %peer.config.name, len = packet.len(), mtu, "packet too big for path");
            return match packet::packet_too_big(packet, &info, mtu, self.mesh_address, out) {
                Some(n) => FromTun::Reply(&out[..n]),
                None => FromTun::Done(DropReason::Oversize),
            };
        }
        match peer.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                if message_type(datagram) == Some(HANDSHAKE_INIT) {
                    // No session yet: the packet waits in boringtun, and the
                    // initiation tries every path that may carry it.
                    for to in peer.paths.handshake_targets(self.last_now) {
                        if to != path {
                            self.transmits.push_back(Transmit::new(to, datagram));
                        }
                    }
                } else {
                    peer.counters.tx_packets += 1;
                }
                FromTun::Send { to: path, datagram }
            }
            TunnResult::Done => FromTun::Done(DropReason::Queued),
            TunnResult::Err(error) => {
                tracing::debug!(peer = %peer.config.name, ?error, "encapsulate failed");
                FromTun::Done(DropReason::BadPacket)
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                FromTun::Done(DropReason::BadPacket)
            }
        }
    }

    fn unreachable<'a>(
        &self,
        packet: &[u8],
        info: &IpInfo,
        why: Unreachable,
        out: &'a mut [u8],
    ) -> FromTun<'a> {
        match packet::destination_unreachable(packet, info, why, self.mesh_address, out) {
            Some(n) => FromTun::Reply(&out[..n]),
            None => FromTun::Done(DropReason::NoRoute),
        }
    }

    /// Which configured peer a WireGuard message belongs to, or the drop.
    fn identify_sender(&mut self, from: &PeerAddr, datagram: &[u8]) -> Result<PeerId, DropReason> {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.counters.bad_packet += 1;
                return Err(DropReason::BadPacket);
            }
        };
        let receiver_idx = match parsed {
            Packet::HandshakeInit(_) => return self.identify_initiator(from, datagram),
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        let id = (receiver_idx >> 8) as usize;
        if matches!(self.peers.get(id), Some(Some(_))) {
            Ok(id)
        } else {
            self.counters.bad_packet += 1;
            Err(DropReason::BadPacket)
        }
    }

    /// A handshake initiation names its sender only inside the encrypted
    /// static key: check the MAC (and the rate limit) first, then decrypt it.
    fn identify_initiator(
        &mut self,
        from: &PeerAddr,
        datagram: &[u8],
    ) -> Result<PeerId, DropReason> {
        let verified = self
            .rate_limiter
            .verify_packet(from.ip(), datagram, &mut self.scratch);
        let init = match verified {
            Ok(Packet::HandshakeInit(init)) => init,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.counters.cookies_sent += 1;
                self.transmits
                    .push_back(Transmit::new(from.clone(), cookie));
                return Err(DropReason::UnknownPeer);
            }
            _ => {
                self.counters.bad_packet += 1;
                return Err(DropReason::BadPacket);
            }
        };
        let half = parse_handshake_anon(&self.private, &self.public, &init).map_err(|_| {
            self.counters.bad_packet += 1;
            DropReason::BadPacket
        })?;
        match self.by_key.get(&half.peer_static_public) {
            Some(&id) => Ok(id),
            None => {
                self.counters.unknown_peer_handshakes += 1;
                tracing::debug!(%from, "handshake from a key not in the config");
                Err(DropReason::UnknownPeer)
            }
        }
    }

    /// Handles one datagram from a transport; `out` must hold `BUFFER_SIZE`.
    pub fn handle_datagram<'a>(
        &mut self,
        from: &PeerAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        now: Instant,
    ) -> FromNetwork<'a> {
        self.last_now = now;
        let id = match self.identify_sender(from, datagram) {
            Ok(id) => id,
            Err(drop) => return FromNetwork::Dropped(drop),
        };
        let Some(peer) = self.peers[id].as_mut() else {
            return FromNetwork::Dropped(DropReason::UnknownPeer);
        };
        if !path_allowed(&peer.config, from) {
            peer.counters.wrong_path += 1;
            tracing::debug!(peer = %peer.config.name, %from, "datagram over a path this peer may not use");
            return FromNetwork::Dropped(DropReason::WrongPath);
        }
        let (packet, src) = match peer.tunn.decapsulate(from.ip(), datagram, out) {
            TunnResult::WriteToTunnelV4(packet, src) => (packet, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(packet, src) => (packet, IpAddr::V6(src)),
            TunnResult::WriteToNetwork(reply) => {
                // Cookie replies answer unauthenticated packets: no roaming on those.
                if message_type(reply) != Some(COOKIE_REPLY) {
                    match message_type(datagram) {
                        Some(HANDSHAKE_RESPONSE) => peer.paths.answered(from, now),
                        _ => Self::heard(peer, from, now, &mut self.next_probe_due),
                    }
                    let renew = message_type(datagram) == Some(HANDSHAKE_INIT)
                        && initiation_repeated(&mut peer.initiations, now);
                    if matches!(
                        message_type(datagram),
                        Some(HANDSHAKE_INIT | HANDSHAKE_RESPONSE)
                    ) {
                        peer.counters.handshakes += 1;
                        // A fresh session: measure every path, swap endpoints.
                        peer.paths.probe_all_now(now);
                        peer.announce_at = Some(now);
                        self.next_probe_due = now;
                    }
                    peer.select_path(now);
                    if renew {
                        self.renew_for(
                            id,
                            from.kind(),
                            now,
                            "the peer keeps re-initiating: our answers do not reach it",
                        );
                    }
                }
                self.transmits.push_back(Transmit::new(from.clone(), reply));
                self.flush_queued(id);
                return FromNetwork::Consumed;
            }
            TunnResult::Done => {
                // A keepalive or cookie; only data messages authenticate the sender.
                if message_type(datagram) == Some(DATA) {
                    peer.initiations = None;
                    Self::heard(peer, from, now, &mut self.next_probe_due);
                }
                return FromNetwork::Consumed;
            }
            TunnResult::Err(error) => {
                peer.counters.bad_packet += 1;
                log_decapsulate_error(&peer.config.name, from, &error);
                return FromNetwork::Dropped(DropReason::BadPacket);
            }
        };
        // Authenticated: the peer may have moved, whatever the payload says.
        peer.initiations = None;
        Self::heard(peer, from, now, &mut self.next_probe_due);
        if self.routes.lookup(src) != Some(&id) {
            peer.counters.spoofed_source += 1;
            tracing::debug!(peer = %peer.config.name, %src, "dropped packet with a source outside the peer's allowed IPs");
            return FromNetwork::Dropped(DropReason::Spoofed);
        }
        if peer_messages::is_peer_message(packet) {
            let message = peer_messages::parse_packet(packet);
            let from_mesh =
                peer_messages::source(packet) == Some(peer.config.public_key.mesh_address());
            match message {
                Ok(message) if from_mesh => self.handle_peer_message(id, from, message, now),
                Ok(_) => {
                    peer.counters.spoofed_source += 1;
                    return FromNetwork::Dropped(DropReason::Spoofed);
                }
                Err(error) => {
                    peer.counters.bad_packet += 1;
                    tracing::debug!(peer = %peer.config.name, %error, "bad peer message");
                    return FromNetwork::Dropped(DropReason::BadPacket);
                }
            }
            return FromNetwork::Consumed;
        }
        peer.counters.rx_packets += 1;
        FromNetwork::ToTun(packet)
    }

    /// Authenticated traffic over `from`: a new path is probed at once, and
    /// with nothing verified yet it carries the replies (roaming). Runs per
    /// packet: traffic over the path in use cannot change the choice (that
    /// takes a reply, a new path, or time), so only other paths re-choose.
    fn heard(peer: &mut Peer, from: &PeerAddr, now: Instant, next_probe_due: &mut Instant) {
        if peer.paths.heard(from, now) {
            peer.paths.probe_all_now(now);
            *next_probe_due = now;
        }
        if peer.paths.in_use() != Some(from) {
            peer.select_path(now);
        }
    }

    fn handle_peer_message(
        &mut self,
        id: PeerId,
        from: &PeerAddr,
        message: PeerMessage,
        now: Instant,
    ) {
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        match message {
            PeerMessage::Probe { id: probe } => {
                let observed = match from {
                    PeerAddr::Udp(sa) => Some(*sa),
                    _ => None,
                };
                let reply = PeerMessage::ProbeReply {
                    id: probe,
                    observed,
                };
                self.send_peer_message(id, from.clone(), &reply, None);
            }
            PeerMessage::ProbeReply {
                id: probe,
                observed,
            } => {
                if !peer.paths.pong(probe, now) {
                    tracing::trace!(peer = %peer.config.name, probe, "stale probe reply");
                    return;
                }
                peer.select_path(now);
                if let (PeerAddr::Udp(_), Some(sa)) = (from, observed) {
                    self.observed(sa, now);
                }
            }
            PeerMessage::Candidates { endpoints, reply } => {
                if !peer.config.allows(TransportKind::Udp) {
                    // Its config may allow us UDP; ours does not allow it.
                    tracing::debug!(peer = %peer.config.name, "ignored endpoints of a peer not allowed UDP");
                    return;
                }
                let usable = usable_peer_endpoints(&self.routes, &endpoints);
                tracing::debug!(peer = %peer.config.name, ?usable, reply, "peer announced endpoints");
                // An answer to our announcement comes after the peer's
                // short-TTL probes: its NAT is open to us.
                peer.paths.announced(&usable, now, !reply);
                // Open our NAT now, before answering: our answer tells the
                // peer it may probe in full.
                self.send_probes(id, now);
                if reply {
                    self.announce(id, false, now);
                }
                self.next_probe_due = now;
            }
            PeerMessage::Renew => self.renew_for(
                id,
                from.kind(),
                now,
                "the peer does not hear us since it moved",
            ),
        }
    }

    /// Renews our presence on `kind` because of what peer `id` did (it
    /// asked, or it does not get our answers), at most once per
    /// `RENEW_COOLDOWN` per peer.
    fn renew_for(&mut self, id: PeerId, kind: TransportKind, now: Instant, why: &str) {
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        if peer
            .renew_asked
            .is_some_and(|t| now.saturating_duration_since(t) < RENEW_COOLDOWN)
        {
            tracing::trace!(peer = %peer.config.name, why, "renewal asked again too soon");
            return;
        }
        peer.renew_asked = Some(now);
        // Debug: most transports have nothing to renew; those that do log it.
        tracing::debug!(peer = %peer.config.name, transport = %kind, why, "renewing our presence");
        self.renewing = Some((kind, now));
        self.queue_renewal(kind);
    }

    fn queue_renewal(&mut self, kind: TransportKind) {
        if !self.renewals.contains(&kind) {
            self.renewals.push_back(kind);
        }
    }

    /// Our presence on `kind` was re-created (a new I2P session): peers'
    /// routers may still send to the old one. Every peer reachable over it
    /// hears from us at once, which carries our new whereabouts to its
    /// router (a handshake where there is no session). A peer that stays
    /// silent is asked to renew its own presence, unless this re-creation
    /// answered such a request (which would bounce between the two).
    pub fn transport_rehomed(&mut self, kind: TransportKind, now: Instant) {
        let answered = self.renewing.is_some_and(|(k, t)| {
            k == kind && now.saturating_duration_since(t) < RENEW_ANSWER_TIME
        });
        if answered {
            self.renewing = None;
        }
        tracing::info!(transport = %kind, "our presence was re-created: contacting peers");
        let mut has_peers = false;
        for peer in self.peers.iter_mut().flatten() {
            if !peer.paths.rehomed(kind, now, !answered) {
                continue;
            }
            has_peers = true;
            if peer.has_session() {
                continue;
            }
            if let TunnResult::WriteToNetwork(init) = peer
                .tunn
                .format_handshake_initiation(&mut self.scratch, false)
            {
                for to in peer.paths.of_kind(kind) {
                    self.transmits.push_back(Transmit::new(to, init));
                }
            }
        }
        let after_own_renewal = self.renewed_self.take_if(|k| *k == kind).is_some();
        if has_peers && !after_own_renewal {
            self.moved = Some((kind, now));
        }
        self.next_probe_due = now;
    }

    /// Once peers had their chance to answer after we moved (and to renew
    /// their side): if not one got through, renew our own presence, once.
    fn check_moved(&mut self, now: Instant) {
        let Some((kind, at)) = self.moved else {
            return;
        };
        if now < at + paths::RENEW_GRACE + paths::RENEW_ASK_WINDOW {
            return;
        }
        self.moved = None;
        if self
            .peers
            .iter()
            .flatten()
            .any(|p| p.paths.heard_since(kind, at))
        {
            return;
        }
        tracing::info!(transport = %kind, "no peer got through since we moved: renewing our presence");
        self.renewed_self = Some(kind);
        self.queue_renewal(kind);
    }

    /// A transport whose presence a peer asked us to re-create.
    pub fn poll_renewal(&mut self) -> Option<TransportKind> {
        self.renewals.pop_front()
    }

    /// A peer saw our probe come from `sa`: one of our NAT's mappings.
    fn observed(&mut self, sa: SocketAddr, now: Instant) {
        if self.observed_self.contains(&sa) || self.local_candidates.contains(&sa) {
            return;
        }
        tracing::info!(endpoint = %sa, "a peer sees us at a new endpoint");
        if self.observed_self.len() == MAX_OBSERVED_SELF {
            self.observed_self.pop_front();
        }
        self.observed_self.push_back(sa);
        self.announce_to_all(now);
    }

    /// Our UDP endpoints (interface addresses with the port, STUN
    /// mappings). A change is announced to every peer that may use UDP.
    pub fn set_local_candidates(&mut self, mut endpoints: Vec<SocketAddr>, now: Instant) {
        endpoints.retain(usable_endpoint);
        endpoints.dedup();
        if endpoints != self.local_candidates {
            tracing::info!(?endpoints, "local UDP endpoints");
            self.local_candidates = endpoints;
            self.announce_to_all(now);
        }
    }

    /// The TTL of the opening punch probe.
    pub fn set_punch_ttl(&mut self, ttl: u8) {
        self.punch_ttl = ttl.max(1);
    }

    fn announce_to_all(&mut self, now: Instant) {
        for peer in self.peers.iter_mut().flatten() {
            peer.announce_at = Some(now);
        }
        self.next_probe_due = now;
    }

    /// Peers that may use UDP, and whether we have a session with each:
    /// whom the rendezvous DHT publishes our endpoints for, and looks up.
    pub fn udp_peers(&self) -> impl Iterator<Item = (PublicKey, bool)> + '_ {
        self.peers
            .iter()
            .flatten()
            .filter(|p| p.config.allows(TransportKind::Udp))
            .map(|p| (p.config.public_key, p.has_session()))
    }

    /// Our UDP endpoints as announced to peers.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut all = self.local_candidates.clone();
        for sa in &self.observed_self {
            if !all.contains(sa) {
                all.push(*sa);
            }
        }
        all.truncate(peer_messages::MAX_CANDIDATES);
        all
    }

    /// Sends our UDP endpoints to a peer, never to one restricted away
    /// from UDP: they carry our IP addresses.
    fn announce(&mut self, id: PeerId, reply: bool, now: Instant) {
        let endpoints = self.candidates();
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        peer.announce_at = None;
        if !peer.config.allows(TransportKind::Udp) || endpoints.is_empty() {
            return;
        }
        let Some(path) = peer.path() else { return };
        if !peer.paths.has_live(TransportKind::Udp, now) {
            peer.announce_at = Some(now + REPUNCH_INTERVAL);
        }
        tracing::debug!(peer = %peer.config.name, %path, count = endpoints.len(), "announcing endpoints");
        self.send_peer_message(
            id,
            path,
            &PeerMessage::Candidates { endpoints, reply },
            None,
        );
    }

    /// Encrypts a peer message in the peer's session and queues it; needs
    /// a session (callers check), else boringtun would hold it.
    fn send_peer_message(
        &mut self,
        id: PeerId,
        to: PeerAddr,
        message: &PeerMessage,
        ttl: Option<u8>,
    ) {
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        let peer_mesh = peer.config.public_key.mesh_address();
        peer_messages::encode_packet(message, self.mesh_address, peer_mesh, &mut self.message_buf);
        if let TunnResult::WriteToNetwork(datagram) =
            peer.tunn.encapsulate(&self.message_buf, &mut self.scratch)
        {
            let mut transmit = Transmit::new(to, datagram);
            transmit.ttl = ttl;
            self.transmits.push_back(transmit);
        }
    }

    /// After a handshake, boringtun releases the packets it held.
    fn flush_queued(&mut self, id: PeerId) {
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        let Some(path) = peer.path() else {
            return;
        };
        while let TunnResult::WriteToNetwork(datagram) =
            peer.tunn.decapsulate(None, &[], &mut self.scratch)
        {
            peer.counters.tx_packets += 1;
            self.transmits
                .push_back(Transmit::new(path.clone(), datagram));
        }
    }

    /// Drives timers: handshake retries, rekeys, keepalives, path probes
    /// and endpoint announcements.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        if now >= self.next_rate_limit_reset {
            self.rate_limiter.reset_count();
            self.next_rate_limit_reset = now + Duration::from_secs(1);
        }
        if now >= self.next_tick {
            self.next_tick = now + TIMER_TICK;
            self.drive_session_timers(now);
            self.check_moved(now);
        }
        if now >= self.next_probe_due {
            self.drive_paths(now);
        }
    }

    fn drive_session_timers(&mut self, now: Instant) {
        for peer in self.peers.iter_mut().flatten() {
            match peer.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(datagram) => {
                    let targets = if message_type(datagram) == Some(HANDSHAKE_INIT) {
                        peer.paths.handshake_targets(now)
                    } else {
                        peer.path().into_iter().collect()
                    };
                    if targets.is_empty() {
                        peer.counters.no_route += 1;
                    }
                    for to in targets {
                        self.transmits.push_back(Transmit::new(to, datagram));
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(error) => {
                    tracing::debug!(peer = %peer.config.name, ?error, "timer error");
                }
                _ => {}
            }
            peer.paths.prune(now);
            peer.select_path(now);
        }
    }

    fn send_probes(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        for probe in peer.paths.poll_probes(now) {
            let ttl = probe.short_ttl.then_some(self.punch_ttl);
            tracing::trace!(%probe.to, ?ttl, "probe");
            if probe.renew {
                tracing::debug!(%probe.to, "asking the peer to renew its presence");
                self.send_peer_message(id, probe.to.clone(), &PeerMessage::Renew, None);
            }
            self.send_peer_message(id, probe.to, &PeerMessage::Probe { id: probe.id }, ttl);
        }
    }

    /// Punching a peer we have no session with (its endpoints came from the
    /// DHT): handshake initiations stand in for probes, the first with the
    /// short TTL. At most one new initiation per `PUNCH_HANDSHAKE_SPACING`.
    fn send_punch_handshakes(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        let due = peer.paths.poll_punches(now);
        let spaced = peer
            .last_punch_handshake
            .is_none_or(|t| now.saturating_duration_since(t) >= PUNCH_HANDSHAKE_SPACING);
        if due.is_empty() || !(spaced || due.iter().any(|p| p.short_ttl)) {
            return;
        }
        let TunnResult::WriteToNetwork(init) = peer
            .tunn
            .format_handshake_initiation(&mut self.scratch, true)
        else {
            return;
        };
        peer.last_punch_handshake = Some(now);
        for probe in due {
            let mut transmit = Transmit::new(probe.to, init);
            transmit.ttl = probe.short_ttl.then_some(self.punch_ttl);
            self.transmits.push_back(transmit);
        }
    }

    /// A peer's UDP endpoints, read from the rendezvous DHT. Used only for
    /// a peer that may use UDP and has no session yet (with a session, the
    /// peers swap endpoints inside it).
    pub fn rendezvous(&mut self, peer: &PublicKey, endpoints: &[SocketAddr], now: Instant) {
        let Some(&id) = self.by_key.get(&peer.0) else {
            return;
        };
        let Some(peer) = self.peers[id].as_mut() else {
            return;
        };
        if !peer.config.allows(TransportKind::Udp) || peer.has_session() {
            return;
        }
        let usable = usable_peer_endpoints(&self.routes, endpoints);
        tracing::info!(peer = %peer.config.name, ?usable, "endpoints found in the DHT");
        peer.paths.rendezvous(&usable, now, RENDEZVOUS_OPEN_DELAY);
        self.next_probe_due = now;
    }

    /// Sends due probes and announcements of peers with a session, and
    /// works out when the next are due.
    fn drive_paths(&mut self, now: Instant) {
        let mut next = now + TIMER_TICK;
        for id in 0..self.peers.len() {
            let Some(peer) = self.peers[id].as_mut() else {
                continue;
            };
            if !peer.has_session() {
                self.send_punch_handshakes(id, now);
                if let Some(due) = self.peers[id].as_ref().and_then(|p| p.paths.next_punch()) {
                    next = next.min(due.max(now + Duration::from_millis(1)));
                }
                continue;
            }
            let announce_due = peer.announce_at.is_some_and(|t| t <= now);
            self.send_probes(id, now);
            if announce_due {
                self.announce(id, true, now);
            }
            let Some(peer) = self.peers[id].as_mut() else {
                continue;
            };
            for due in [peer.paths.next_probe(), peer.announce_at]
                .into_iter()
                .flatten()
            {
                next = next.min(due.max(now + Duration::from_millis(1)));
            }
        }
        self.next_probe_due = next;
    }

    /// When `handle_timeout` wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
            .min(self.next_rate_limit_reset)
            .min(self.next_probe_due)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn status(&self, now: Instant) -> NodeStatus {
        self.status_with(now, |_| None)
    }

    /// `status`, with each path described further by `path_state` (the
    /// transports' view, e.g. a Tox friend's connection).
    pub fn status_with(
        &self,
        now: Instant,
        path_state: impl Fn(&PeerAddr) -> Option<String>,
    ) -> NodeStatus {
        NodeStatus {
            public_key: self.public_key().to_base64(),
            mesh_address: self.mesh_address,
            counters: self.counters.clone(),
            peers: self
                .peers
                .iter()
                .flatten()
                .map(|p| {
                    let (since_handshake, tx_bytes, rx_bytes, _loss, _rtt) = p.tunn.stats();
                    PeerStatus {
                        name: p.config.name.clone(),
                        public_key: p.config.public_key.to_base64(),
                        mesh_address: p.config.public_key.mesh_address(),
                        allowed_ips: p.config.all_allowed_ips().collect(),
                        path: p.paths.in_use().map(|a| a.to_string()),
                        path_state: p.paths.in_use().and_then(&path_state),
                        paths: p.paths.status(now),
                        seconds_since_handshake: since_handshake.map(|d| d.as_secs()),
                        rx_bytes: rx_bytes as u64,
                        tx_bytes: tx_bytes as u64,
                        counters: p.counters.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// Counts one more handshake initiation answered since the peer last sent
/// data; true when they repeat enough to say our answers are lost.
fn initiation_repeated(initiations: &mut Option<(u32, Instant)>, now: Instant) -> bool {
    let (count, since) = match *initiations {
        Some((count, since))
            if now.saturating_duration_since(since) < REPEATED_INITIATIONS_WINDOW =>
        {
            (count + 1, since)
        }
        _ => (1, now),
    };
    *initiations = Some((count, since));
    count >= REPEATED_INITIATIONS
}

/// The paths the config gives a peer, in its transports' order: only
/// transports it allows, only where it has an address.
fn configured_paths(config: &PeerConfig) -> Vec<PeerAddr> {
    config
        .transports
        .iter()
        .filter_map(|kind| match kind {
            TransportKind::Udp => config.endpoint.map(PeerAddr::Udp),
            TransportKind::Tox => config.tox.map(|id| PeerAddr::Tox(id.public_key())),
            TransportKind::I2p => config.i2p.map(PeerAddr::I2p),
        })
        .collect()
}

/// The endpoints a peer gave us (in the session or the DHT) that may be
/// probed: usable ones, and never one our own TUN routes (a tunnel inside
/// the tunnel).
fn usable_peer_endpoints(
    routes: &RoutingTable<PeerId>,
    endpoints: &[SocketAddr],
) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .map(|sa| SocketAddr::new(sa.ip().to_canonical(), sa.port()))
        .filter(|sa| usable_endpoint(sa) && routes.lookup(sa.ip()).is_none())
        .collect()
}

/// May an endpoint be probed or announced? Never the unspecified,
/// multicast or broadcast addresses, a mesh address, nor port 0.
fn usable_endpoint(sa: &SocketAddr) -> bool {
    let ip = sa.ip().to_canonical();
    sa.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && ip != IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
        && !matches!(ip, IpAddr::V6(v6) if crate::identity::is_mesh_address(&v6))
}

/// May this path carry the peer's session? Only over its allowed
/// transports (an I2P-only peer must never learn our IP), and over Tox or
/// I2P only from its own configured identity there: a Tox friendship or an
/// I2P datagram grants nothing by itself. UDP endpoints roam freely, as in
/// WireGuard.
fn path_allowed(config: &PeerConfig, path: &PeerAddr) -> bool {
    config.allows(path.kind())
        && match path {
            PeerAddr::Udp(_) => true,
            PeerAddr::Tox(pk) => config.tox.map(|id| id.public_key()) == Some(*pk),
            PeerAddr::I2p(address) => config.i2p == Some(*address),
        }
}

const HANDSHAKE_INIT: u32 = 1;
const HANDSHAKE_RESPONSE: u32 = 2;
const COOKIE_REPLY: u32 = 3;
const DATA: u32 = 4;

fn message_type(datagram: &[u8]) -> Option<u32> {
    datagram
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn log_decapsulate_error(peer: &str, from: &PeerAddr, error: &WireGuardError) {
    match error {
        // Reordering and retransmits on a lossy path; not worth a log line.
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
            tracing::trace!(peer, %from, ?error, "stale datagram")
        }
        _ => tracing::debug!(peer, %from, ?error, "datagram failed to authenticate"),
    }
}

/// Peer names by what a reload did to them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReconfigureReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub public_key: String,
    pub mesh_address: Ipv6Addr,
    pub counters: NodeCounters,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub mesh_address: Ipv6Addr,
    pub allowed_ips: Vec<IpNet>,
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_state: Option<String>,
    /// Every candidate path, with its state and RTT.
    #[serde(default)]
    pub paths: Vec<PathStatus>,
    pub seconds_since_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub counters: PeerCounters,
}

#[cfg(test)]
mod tests;
