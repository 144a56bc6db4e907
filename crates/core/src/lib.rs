//! The sans-IO core: peers, their Noise sessions, cryptokey routing and
//! timers. It never touches a socket or a clock; the event loop hands it
//! packets and `now`, and sends what it returns.
//!
//! boringtun keeps its own monotonic clock for handshake and rekey timers;
//! everything veilmesh decides itself (timer ticks, roaming, statistics)
//! runs on the `now` passed in.

pub mod accept;
pub mod batch;
mod candidates;
mod identify;
pub mod identity;
pub mod packet;
pub mod paths;
mod peer;
pub mod peer_messages;
mod presence;
pub mod routing;
pub mod spec;
mod timers;

pub use spec::PeerSpec;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use boringtun::x25519;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use veilmesh_transport::{DatagramLimits, PeerAddr, RelayAddr, TransportKind};

use crate::identity::{PrivateKey, PublicKey};
use batch::{TunBatchOutput, TunSink, TxBatch};
use candidates::OwnEndpoints;
use identify::Gate;
use packet::{IpInfo, Unreachable};
use paths::PathStatus;
pub use peer::DEFAULT_RELAY_RATE;
use peer::{
    initiation_repeated, local_address_allowed, needs_address_check, path_allowed, Peer, PeerTable,
    Rate, SessionKeys, MAX_PEERS, REJECTIONS,
};
use peer_messages::PeerMessage;
use presence::Presence;
use timers::TimerTable;
pub use timers::{Timeout, Timer};

/// WireGuard data message overhead: 16-byte header + 16-byte tag.
pub const NOISE_OVERHEAD: usize = 32;
/// How often boringtun's timers are driven (as its own device does).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Without a live direct path, endpoints are re-announced (and so punched
/// again) this often.
const REPUNCH_INTERVAL: Duration = Duration::from_secs(30);
/// An announcement the peer did not answer (lost on a lossy path such as a
/// paced Tox TCP relay) is repeated after this long, doubling up to
/// `REPUNCH_INTERVAL`: the peer's answer is what lets our full probes go.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(2);
/// Two nodes meeting through the DHT each read the other's endpoints
/// within one poll interval of the other (see `rendezvous`); full packets
/// wait that long plus slack, so both NATs are open when they arrive.
pub const RENDEZVOUS_OPEN_DELAY: Duration = Duration::from_secs(7);
/// Handshake initiations while punching without a session, at most.
const PUNCH_HANDSHAKE_SPACING: Duration = Duration::from_millis(500);
/// Default TTL of the opening punch probe: enough to leave one NAT
/// gateway (the first hop), not enough to cross the next router and reach
/// the peer's NAT.
pub const DEFAULT_PUNCH_TTL: u8 = 2;
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
    /// Decrypted packets to one of our addresses the peer may not reach
    /// (an anonymous peer reaches our mesh address only).
    #[serde(default)]
    pub refused_destination: u64,
    /// Packets to the peer from one of our addresses it may not see.
    #[serde(default)]
    pub refused_source: u64,
    /// Decrypted packets its accept rules refused (and answered with an
    /// ICMP "administratively prohibited", rate limited).
    #[serde(default)]
    pub not_accepted: u64,
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
    /// Handshake messages dropped because they arrived too fast.
    #[serde(default)]
    pub rate_limited: u64,
    /// Datagrams over Tox or I2P from an identity no peer has there.
    #[serde(default)]
    pub unknown_sender: u64,
    /// Datagrams the transport refused (queue full, socket error).
    pub send_errors: u64,
    /// Datagrams forwarded between two of our peers (we are their relay).
    #[serde(default)]
    pub relayed: u64,
    /// Relay requests refused (no relay offered, an anonymous peer, over
    /// the rate, unknown or unreachable target), and relay paths that had
    /// no way to the relay.
    #[serde(default)]
    pub relay_refused: u64,
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
    /// To or from one of our addresses the peer may not reach or see.
    RefusedAddress,
    /// Refused by the peer's accept rules.
    NotAccepted,
    RateLimited,
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

/// What `Node::receive` made of a datagram.
enum Received {
    /// The decrypted packet for the TUN is `out[range]`.
    ToTun(std::ops::Range<usize>),
    Consumed,
    Dropped(DropReason),
    /// A relay handed us this datagram of another peer's.
    Relayed(PeerAddr, Vec<u8>),
}

/// What the daemon should do besides sending datagrams, from
/// [`Node::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Re-create our presence on this transport (same identity): peers do
    /// not hear us there.
    RenewPresence(TransportKind),
    /// What the rendezvous DHT should publish and look up changed.
    RendezvousWanted(RendezvousWanted),
    /// A probe sent by [`Node::ping`] was answered after `rtt`.
    PingAnswered { probe: u64, rtt: Duration },
}

/// A probe [`Node::ping`] sent: its id and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingProbe {
    pub probe: u64,
    pub to: PeerAddr,
}

/// How long [`Node::ping`]'s probes are watched for an answer.
pub const PING_WATCH: Duration = Duration::from_secs(10);

/// What the rendezvous DHT should do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RendezvousWanted {
    /// Our UDP endpoints, published for every peer in `publish_to`.
    pub endpoints: Vec<SocketAddr>,
    /// The peers that may use UDP.
    pub publish_to: Vec<PublicKey>,
    /// Those of them we have no session with, whose endpoints we look up.
    pub look_up: Vec<PublicKey>,
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

/// One node's side of the mesh: the state machine the daemon's event loop
/// drives. It reads no clock and touches no socket.
///
/// Inputs, each with `now` (monotonic, never earlier than the last one):
/// - [`Node::handle_tun_packet`]: an IP packet read from the TUN;
/// - [`Node::handle_datagram`]: a datagram a transport received, with its
///   typed sender (or none, for I2P RAW);
/// - [`Node::handle_timeout`]: the instant [`Node::poll_timeout`] named;
/// - news: [`Node::reconfigure`] (the config), [`Node::set_local_candidates`]
///   (our UDP endpoints), [`Node::rendezvous`] (a peer's endpoints from the
///   DHT), [`Node::transport_rehomed`] (our presence on a transport moved).
///
/// Outputs: the two per-packet inputs answer for that packet at once
/// ([`FromTun`], [`FromNetwork`]: send this, write this to the TUN, or why
/// it was dropped), in the caller's `out` buffer, so the data path does
/// not allocate. The rest waits in queues, drained after every input in
/// this order: [`Node::poll_transmit`] until `None` (handshakes, keepalives,
/// probes, cookies, packets released by a handshake), then
/// [`Node::poll_event`] until `None` (presence to renew, rendezvous
/// wanted), then [`Node::poll_timeout`] to re-arm the one timer.
pub struct Node {
    keys: SessionKeys,
    public: x25519::PublicKey,
    mesh_address: Ipv6Addr,
    /// Our addresses on the TUN: the mesh address and the interface's own.
    tunnel_addresses: Vec<IpAddr>,
    peers: PeerTable,
    /// Who sent a datagram: rate limits, cookies, initiators' keys.
    gate: Gate,
    probe_ids: ProbeIds,
    counters: NodeCounters,
    transmits: VecDeque<Transmit>,
    timers: TimerTable,
    /// Our UDP endpoints, announced to peers that may use UDP.
    own: OwnEndpoints,
    punch_ttl: u8,
    /// When our presence on a transport should be re-created.
    presence: Presence,
    /// What the rendezvous DHT should do changed since the last
    /// `Event::RendezvousWanted`.
    rendezvous_changed: bool,
    /// Probes of `veilmesh ping` awaiting an answer: when each was sent.
    pings: HashMap<u64, Instant>,
    pings_answered: VecDeque<(u64, Duration)>,
    /// The latest `now` handed in, for the per-packet calls that take none.
    last_now: Instant,
    scratch: Vec<u8>,
    message_buf: Vec<u8>,
    /// We forward between our peers (`[interface] relay`), at most this
    /// for each sender.
    relay_service: Option<Rate>,
}

/// Room for the largest datagram any transport carries plus Noise overhead.
/// What carrying a datagram through a relay adds: the relay message (an
/// IPv6 header, its own header, the target's key, a length) and the
/// session with the relay.
pub const RELAY_OVERHEAD: usize = 40 + 4 + 32 + 2 + NOISE_OVERHEAD;
pub const BUFFER_SIZE: usize = 65_536 + NOISE_OVERHEAD + 64;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("too many peers: {0} (at most {MAX_PEERS})")]
    TooManyPeers(usize),
}

impl Node {
    pub fn new(
        private_key: &PrivateKey,
        peers: Vec<PeerSpec>,
        now: Instant,
    ) -> Result<Node, NodeError> {
        if peers.len() >= MAX_PEERS {
            return Err(NodeError::TooManyPeers(peers.len()));
        }
        let private = private_key.to_x25519();
        let public = x25519::PublicKey::from(&private);
        let mesh_address = PublicKey(public.to_bytes()).mesh_address();
        let mut node = Node {
            mesh_address,
            tunnel_addresses: vec![IpAddr::V6(mesh_address)],
            peers: PeerTable::default(),
            gate: Gate::new(private.clone(), now),
            probe_ids: ProbeIds::new(),
            keys: SessionKeys {
                limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
                private,
            },
            public,
            counters: NodeCounters::default(),
            transmits: VecDeque::new(),
            timers: TimerTable::default(),
            own: OwnEndpoints::default(),
            punch_ttl: DEFAULT_PUNCH_TTL,
            presence: Presence::default(),
            rendezvous_changed: true,
            pings: HashMap::new(),
            pings_answered: VecDeque::new(),
            last_now: now,
            scratch: vec![0u8; BUFFER_SIZE],
            message_buf: Vec::with_capacity(512),
            relay_service: None,
        };
        node.timers.set(Timer::Tick, Some(now));
        node.timers.set(Timer::Paths, Some(now));
        node.reconfigure(peers, now)?;
        Ok(node)
    }

    /// Applies a new peer list (a config reload). Peers whose configuration
    /// is unchanged keep their session, path and counters; a changed peer
    /// keeps its session too, unless its keepalive changed (boringtun fixes
    /// that at creation). Removed peers are forgotten.
    pub fn reconfigure(
        &mut self,
        peers: Vec<PeerSpec>,
        now: Instant,
    ) -> Result<ReconfigureReport, NodeError> {
        self.last_now = now;
        self.rendezvous_changed = true;
        self.peers.reconfigure(peers, now)
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
        now: Instant,
    ) -> FromTun<'a> {
        self.last_now = now;
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
        let Some(&id) = self.peers.routes.route(info.dst) else {
            self.counters.no_route += 1;
            tracing::trace!(dst = %info.dst, "no peer owns the destination");
            return self.unreachable(packet, &info, Unreachable::NoRoute, out);
        };
        let Some(peer) = self.peers.slots[id].as_mut() else {
            self.counters.no_route += 1;
            return FromTun::Done(DropReason::NoRoute);
        };
        if !local_address_allowed(&peer.spec, &self.tunnel_addresses, info.src) {
            peer.counters.refused_source += 1;
            tracing::trace!(peer = %peer.spec.name, src = %info.src, "source the peer may not see");
            return FromTun::Done(DropReason::RefusedAddress);
        }
        if let Some(firewall) = peer.firewall.as_mut() {
            firewall.outbound(packet, now);
        }
        peer.wake(id, &mut self.peers.awake, now);
        if peer.paths.traffic(now) {
            self.timers.fire_by(Timer::Paths, now);
        }
        let Some(path) = peer.path() else {
            peer.counters.no_route += 1;
            tracing::trace!(peer = %peer.spec.name, "no path to peer");
            return self.unreachable(packet, &info, Unreachable::NoPath, out);
        };
        let Some(limits) = self.limits_of(&path, &limits) else {
            return self.unreachable(packet, &info, Unreachable::NoPath, out);
        };
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return FromTun::Done(DropReason::NoRoute);
        };
        let may_fragment_below = matches!(info.dst, IpAddr::V4(_)) && !info.dont_fragment;
        let carried = if may_fragment_below {
            limits.absolute
        } else {
            limits.unfragmented
        };
        if packet.len() + NOISE_OVERHEAD > carried {
            peer.counters.oversize += 1;
            let mtu = limits.unfragmented.saturating_sub(NOISE_OVERHEAD);
            tracing::trace!(peer = %peer.spec.name, len = packet.len(), mtu, "packet too big for path");
            return match packet::packet_too_big(packet, &info, mtu, self.mesh_address, out) {
                Some(n) => FromTun::Reply(&out[..n]),
                None => FromTun::Done(DropReason::Oversize),
            };
        }
        if let PeerAddr::Relay(via) = path {
            return self.tun_packet_through_relay(id, via, packet, out, now);
        }
        match peer.tunn_mut(id, &self.keys).encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                if message_type(datagram) == Some(HANDSHAKE_INIT) {
                    // No session yet: the packet waits in boringtun, and the
                    // initiation tries every path that may carry it.
                    for to in peer.paths.handshake_targets(now) {
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
                tracing::debug!(peer = %peer.spec.name, ?error, "encapsulate failed");
                FromTun::Done(DropReason::BadPacket)
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                FromTun::Done(DropReason::BadPacket)
            }
        }
    }

    /// A batch of packets read from the TUN (one read, or several: the
    /// open run carries over). Each is sealed straight into `tx`, where
    /// datagrams to one path gather in runs; a run goes to `output.send`
    /// when the next datagram cannot join it, and the last stays open for
    /// the next batch or `flush_tun_batch`. Send failures are counted
    /// (`send_errors`). The same as `handle_tun_packet` one by one, in
    /// fewer sends.
    pub fn handle_tun_batch<'p>(
        &mut self,
        packets: impl IntoIterator<Item = &'p [u8]>,
        tx: &mut TxBatch,
        output: &mut impl TunBatchOutput,
        now: Instant,
    ) {
        for packet in packets {
            if !tx.has_room() {
                self.flush_tun_batch(tx, output);
            }
            let limits = |to: &PeerAddr| output.limits(to);
            match self.handle_tun_packet(packet, limits, tx.space(), now) {
                FromTun::Send { to, datagram } => {
                    let len = datagram.len();
                    if !tx.joins(&to, len) {
                        self.flush_tun_batch(tx, output);
                    }
                    tx.add(&to, len);
                }
                FromTun::Reply(packet) => output.reply(packet),
                FromTun::Done(_) => {}
            }
        }
    }

    /// Sends the open run of `tx`, if any.
    pub fn flush_tun_batch(&mut self, tx: &mut TxBatch, output: &mut impl TunBatchOutput) {
        let Some(run) = tx.take() else { return };
        let count = run.count as u64;
        if !output.send(run) {
            self.counters.send_errors += count;
        }
    }

    /// The datagrams of one receive call from `from`, each decrypted
    /// straight into `sink`. Stops when the sink is full: true when every
    /// datagram was taken, false when some wait in `datagrams` (write the
    /// sink out, then call again).
    pub fn handle_datagram_batch<'d>(
        &mut self,
        from: &PeerAddr,
        datagrams: &mut impl Iterator<Item = &'d [u8]>,
        sink: &mut impl TunSink,
        now: Instant,
    ) -> bool {
        loop {
            let Some(space) = sink.space() else {
                return false;
            };
            let Some(datagram) = datagrams.next() else {
                return true;
            };
            let start = space.as_ptr() as usize;
            let at = match self.handle_datagram(from, datagram, space, now) {
                FromNetwork::ToTun(packet) => (packet.as_ptr() as usize - start, packet.len()),
                _ => continue,
            };
            // boringtun decrypts to the start; should that change, move it.
            if let (offset @ 1.., len) = at {
                if let Some(space) = sink.space() {
                    space.copy_within(offset..offset + len, 0);
                }
            }
            sink.commit(at.1);
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

    /// Handles one datagram from a transport; `out` must hold `BUFFER_SIZE`.
    ///
    /// First the gate (`identify.rs`) finds which configured peer it
    /// belongs to. Over Tox and I2P, whose senders the transport
    /// authenticates, only the identities of configured peers get that far.
    /// Handshakes pass their transport's rate limit; under load over UDP, a
    /// cookie goes only to a peer that may use UDP (anyone who knows our
    /// public key could otherwise confirm a guessed IP address with a
    /// flood).
    pub fn handle_datagram<'a>(
        &mut self,
        from: &PeerAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        now: Instant,
    ) -> FromNetwork<'a> {
        match self.receive(from, datagram, out, now) {
            Received::ToTun(range) => FromNetwork::ToTun(&out[range]),
            // The relay's message carried a datagram of another peer's.
            Received::Relayed(via, inner) => self.handle_datagram(&via, &inner, out, now),
            Received::Consumed => FromNetwork::Consumed,
            Received::Dropped(why) => FromNetwork::Dropped(why),
        }
    }

    /// `handle_datagram`, saying where in `out` a packet for the TUN is
    /// (which lets a relayed datagram reuse `out`).
    fn receive(
        &mut self,
        from: &PeerAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Received {
        let out_start = out.as_ptr() as usize;
        self.last_now = now;
        let identified = self.gate.identify(
            from,
            datagram,
            &mut self.peers,
            &mut self.counters,
            &mut self.transmits,
        );
        let id = match identified {
            Ok(id) => id,
            Err(drop) => return Received::Dropped(drop),
        };
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return Received::Dropped(DropReason::UnknownPeer);
        };
        // A datagram whose transport names no sender belongs to the peer
        // it names inside (session index, initiator's key), over that
        // peer's own configured address there, or to nobody: whatever it
        // claims, answers go only where the config says the peer is.
        let attributed;
        let from = match from {
            PeerAddr::Unattributed(kind) => {
                // No allocation: this runs for every RAW I2P datagram.
                let Some(own) = peer.spec.path(*kind).cloned() else {
                    peer.counters.wrong_path += 1;
                    return Received::Dropped(DropReason::WrongPath);
                };
                attributed = own;
                &attributed
            }
            named => named,
        };
        if !path_allowed(&peer.spec, from) {
            peer.counters.wrong_path += 1;
            tracing::debug!(peer = %peer.spec.name, %from, "datagram over a path this peer may not use");
            return Received::Dropped(DropReason::WrongPath);
        }
        let result = peer
            .tunn_mut(id, &self.keys)
            .decapsulate(from.ip(), datagram, out);
        // Only what authenticates wakes a quiet peer: forged datagrams
        // must not make idle peers cost timers again.
        if !matches!(result, TunnResult::Err(_)) {
            peer.wake(id, &mut self.peers.awake, now);
            // Without a session, any packet may be the one that makes it.
            if peer.looked_up && peer.update_look_up() {
                self.rendezvous_changed = true;
            }
        }
        let (packet, src) = match result {
            TunnResult::WriteToTunnelV4(packet, src) => (packet, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(packet, src) => (packet, IpAddr::V6(src)),
            TunnResult::WriteToNetwork(reply) => {
                // The session's limiter never limits: no cookie replies
                // here, only handshake responses and queued data.
                match message_type(datagram) {
                    Some(HANDSHAKE_RESPONSE) => peer.paths.answered(from, now),
                    _ => Self::heard(peer, from, now, &mut self.timers, &self.own),
                }
                let not_heard = message_type(datagram) == Some(HANDSHAKE_INIT)
                    && initiation_repeated(&mut peer.initiations, now);
                if matches!(
                    message_type(datagram),
                    Some(HANDSHAKE_INIT | HANDSHAKE_RESPONSE)
                ) {
                    peer.counters.handshakes += 1;
                    // A fresh session: measure every path, swap endpoints.
                    peer.paths.probe_all_now(now);
                    peer.announce_at = Some(now);
                    peer.announce_retry = ANNOUNCE_RETRY;
                    self.timers.fire_by(Timer::Paths, now);
                }
                peer.select_path(now);
                if not_heard {
                    let name = peer.spec.name.clone();
                    self.presence.request(
                        from.kind(),
                        now,
                        &name,
                        "the peer keeps re-initiating: our answers do not reach it",
                    );
                }
                self.transmits.push_back(Transmit::new(from.clone(), reply));
                self.flush_queued(id);
                return Received::Consumed;
            }
            TunnResult::Done => {
                // A keepalive or cookie; only data messages authenticate the sender.
                if message_type(datagram) == Some(DATA) {
                    peer.initiations = None;
                    Self::heard(peer, from, now, &mut self.timers, &self.own);
                }
                return Received::Consumed;
            }
            TunnResult::Err(error) => {
                peer.counters.bad_packet += 1;
                log_decapsulate_error(&peer.spec.name, from, &error);
                return Received::Dropped(DropReason::BadPacket);
            }
        };
        // Authenticated: the peer may have moved, whatever the payload says.
        peer.initiations = None;
        Self::heard(peer, from, now, &mut self.timers, &self.own);
        if self.peers.routes.route(src) != Some(&id) {
            peer.counters.spoofed_source += 1;
            tracing::debug!(peer = %peer.spec.name, %src, "dropped packet with a source outside the peer's allowed IPs");
            return Received::Dropped(DropReason::Spoofed);
        }
        if peer_messages::is_peer_message(packet) {
            let message = peer_messages::parse_packet(packet);
            let from_mesh =
                peer_messages::source(packet) == Some(peer.spec.public_key.mesh_address());
            match message {
                // Not through a relay again: one hop, and no loops.
                Ok(PeerMessage::Relayed {
                    from: origin,
                    datagram,
                }) if from_mesh && peer.spec.relay && from.kind() != TransportKind::Relay => {
                    let via = PeerAddr::Relay(RelayAddr {
                        relay: peer.spec.public_key.0,
                        peer: origin,
                    });
                    return Received::Relayed(via, datagram);
                }
                Ok(message) if from_mesh => self.handle_peer_message(id, from, message, now),
                Ok(_) => {
                    peer.counters.spoofed_source += 1;
                    return Received::Dropped(DropReason::Spoofed);
                }
                Err(error) => {
                    peer.counters.bad_packet += 1;
                    tracing::debug!(peer = %peer.spec.name, %error, "bad peer message");
                    return Received::Dropped(DropReason::BadPacket);
                }
            }
            return Received::Consumed;
        }
        if needs_address_check(&peer.spec) {
            let dst = packet::parse(packet).ok().map(|info| info.dst);
            if !dst.is_some_and(|d| local_address_allowed(&peer.spec, &self.tunnel_addresses, d)) {
                peer.counters.refused_destination += 1;
                tracing::debug!(peer = %peer.spec.name, ?dst, "packet to an address of ours the peer may not reach");
                return Received::Dropped(DropReason::RefusedAddress);
            }
        }
        let verdict = peer.firewall.as_mut().map(|f| f.inbound(packet, now));
        if let Some(refused @ (accept::Verdict::Reject | accept::Verdict::Drop)) = verdict {
            peer.counters.not_accepted += 1;
            tracing::trace!(peer = %peer.spec.name, "packet refused by the peer's accept rules");
            if refused == accept::Verdict::Reject && peer.rejections.take(1, REJECTIONS, now) {
                let to = from.clone();
                self.answer_prohibited(id, to, packet);
            }
            return Received::Dropped(DropReason::NotAccepted);
        }
        peer.counters.rx_packets += 1;
        if peer.paths.traffic(now) {
            self.timers.fire_by(Timer::Paths, now);
        }
        let offset = packet.as_ptr() as usize - out_start;
        Received::ToTun(offset..offset + packet.len())
    }

    /// Authenticated traffic over `from`: a new path is probed at once, and
    /// with nothing verified yet it carries the replies (roaming). Runs per
    /// packet: traffic over the path in use cannot change the choice (that
    /// takes a reply, a new path, or time), so only other paths re-choose.
    /// Endpoints that may not be used (loopback, link-local, our own) are
    /// not learned from.
    fn heard(
        peer: &mut Peer,
        from: &PeerAddr,
        now: Instant,
        timers: &mut TimerTable,
        own: &OwnEndpoints,
    ) {
        if let PeerAddr::Udp(sa) = from {
            if !own.usable_for_peer(sa) && !peer.paths.is_configured(from) {
                return;
            }
        }
        if peer.paths.heard(from, now) {
            peer.paths.probe_all_now(now);
            timers.fire_by(Timer::Paths, now);
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
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return;
        };
        peer.paths.spoke();
        match message {
            PeerMessage::Relay { to, datagram } if from.kind() != TransportKind::Relay => {
                self.forward_relayed(id, to, &datagram, now);
            }
            // From a peer we do not relay through, or through a relay.
            PeerMessage::Relay { .. } | PeerMessage::Relayed { .. } => {
                peer.counters.wrong_path += 1;
                tracing::debug!(peer = %peer.spec.name, "relay message the peer may not send");
            }
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
                if !peer.paths.pong(probe, from, now) {
                    tracing::trace!(peer = %peer.spec.name, probe, "stale probe reply");
                    return;
                }
                if let Some(sent) = self.pings.remove(&probe) {
                    self.pings_answered
                        .push_back((probe, now.saturating_duration_since(sent)));
                }
                peer.select_path(now);
                if let (PeerAddr::Udp(_), Some(sa)) = (from, observed) {
                    self.observed(sa, now);
                }
            }
            PeerMessage::Candidates { endpoints, reply } => {
                if !peer.spec.allows(TransportKind::Udp) {
                    // Its config may allow us UDP; ours does not allow it.
                    tracing::debug!(peer = %peer.spec.name, "ignored endpoints of a peer not allowed UDP");
                    return;
                }
                let usable = self
                    .own
                    .usable_peer_endpoints(&self.peers.routes, &endpoints);
                tracing::debug!(peer = %peer.spec.name, ?usable, reply, "peer announced endpoints");
                // An answer to our announcement comes after the peer's
                // short-TTL probes: its NAT is open to us.
                peer.paths.announced(&usable, now, !reply);
                if !reply {
                    // Answered: no more retries; the next punch, if this
                    // one fails, comes at the usual interval.
                    peer.announce_retry = ANNOUNCE_RETRY;
                    if peer.announce_at.is_some() {
                        peer.announce_at = Some(now + REPUNCH_INTERVAL);
                    }
                }
                // Open our NAT now, before answering: our answer tells the
                // peer it may probe in full.
                self.send_probes(id, now);
                if reply {
                    self.announce(id, false, now);
                }
                self.timers.fire_by(Timer::Paths, now);
            }
        }
    }

    /// Our presence on `kind` was re-created (a new I2P session): peers'
    /// routers may still send to the old one. Every peer reachable over it
    /// hears from us at once, which carries our new whereabouts to its
    /// router (a handshake where there is no session), and is probed fast
    /// until heard: a peer that hears us but stays unheard renews its side
    /// on its own evidence.
    pub fn transport_rehomed(&mut self, kind: TransportKind, now: Instant) {
        let mut has_peers = false;
        for (id, peer) in self.peers.slots.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            if !peer.paths.rehomed(kind, now) {
                continue;
            }
            has_peers = true;
            if peer.has_session() {
                continue;
            }
            peer.wake(id, &mut self.peers.awake, now);
            if let TunnResult::WriteToNetwork(init) = peer
                .tunn_mut(id, &self.keys)
                .format_handshake_initiation(&mut self.scratch, false)
            {
                for to in peer.paths.of_kind(kind) {
                    self.transmits.push_back(Transmit::new(to, init));
                }
            }
        }
        self.presence.rehomed(kind, has_peers, now);
        self.timers.set(Timer::Move, self.presence.next_judgement());
        self.timers.fire_by(Timer::Paths, now);
    }

    /// Once peers had their chance to answer after we moved (and to renew
    /// their side): if not one got through, renew our own presence, once.
    fn check_moved(&mut self, now: Instant) {
        let Some((kind, at)) = self.presence.move_to_judge(now) else {
            return;
        };
        if self.peers.iter().any(|p| p.paths.heard_since(kind, at)) {
            return;
        }
        self.presence
            .request(kind, now, "", "no peer got through since we moved");
    }

    /// Peers heard over a path that does not carry our answers back.
    fn check_one_way(&mut self, now: Instant) {
        let one_way: Vec<(TransportKind, String)> = self
            .peers
            .awake
            .iter()
            .filter_map(|&id| {
                let p = self.peers.slots[id].as_ref()?;
                Some((p.paths.one_way(now)?, p.spec.name.clone()))
            })
            .collect();
        for (kind, name) in one_way {
            self.presence
                .request(kind, now, &name, "the peer is heard but does not hear us");
        }
    }

    /// What the daemon should do besides sending: see [`Event`].
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(kind) = self.presence.poll_renewal() {
            return Some(Event::RenewPresence(kind));
        }
        if std::mem::take(&mut self.rendezvous_changed) {
            return Some(Event::RendezvousWanted(self.rendezvous_wanted()));
        }
        if let Some((probe, rtt)) = self.pings_answered.pop_front() {
            return Some(Event::PingAnswered { probe, rtt });
        }
        None
    }

    /// The peer named `who` (its name, public key or mesh address).
    pub fn find_peer(&self, who: &str) -> Option<PeerId> {
        if let Ok(address) = who.parse::<Ipv6Addr>() {
            // Its mesh /128 routes to it.
            let id = *self.peers.routes.route(IpAddr::V6(address))?;
            return self.peers.slots[id]
                .as_ref()
                .filter(|p| p.spec.public_key.mesh_address() == address)
                .map(|_| id);
        }
        if let Ok(key) = PublicKey::parse(who) {
            return self.peers.by_key.get(&key.0).copied();
        }
        self.peers
            .slots
            .iter()
            .position(|slot| slot.as_ref().is_some_and(|p| p.spec.name == who))
    }

    /// Probes peer `id` now over the path in use, or over every path it
    /// has (`all`), for `veilmesh ping`. Answers come as
    /// [`Event::PingAnswered`] within [`PING_WATCH`]. Returns the probes
    /// sent: none if the peer has no path (yet).
    pub fn ping(&mut self, id: PeerId, all: bool, now: Instant) -> Vec<PingProbe> {
        self.last_now = now;
        self.pings
            .retain(|_, sent| now.saturating_duration_since(*sent) < PING_WATCH);
        let Some(peer) = self.peers.slots.get_mut(id).and_then(Option::as_mut) else {
            return Vec::new();
        };
        let mut targets = peer.paths.addresses();
        if !all {
            targets.truncate(1);
        }
        let mut sent = Vec::new();
        for to in targets {
            let probe = self.probe_ids.next();
            let Some(peer) = self.peers.slots[id].as_mut() else {
                break;
            };
            if !peer.paths.probe_now(&to, probe, now) {
                continue;
            }
            self.pings.insert(probe, now);
            self.send_peer_message(id, to.clone(), &PeerMessage::Probe { id: probe }, None);
            sent.push(PingProbe { probe, to });
        }
        sent
    }

    /// Whom the rendezvous DHT publishes our endpoints for (the peers
    /// that may use UDP), and whom it looks up (those without a session).
    fn rendezvous_wanted(&self) -> RendezvousWanted {
        let mut wanted = RendezvousWanted {
            endpoints: self.own.announced(),
            ..RendezvousWanted::default()
        };
        for peer in self.peers.iter() {
            if peer.spec.allows(TransportKind::Udp) {
                wanted.publish_to.push(peer.spec.public_key);
            }
            if peer.looked_up {
                wanted.look_up.push(peer.spec.public_key);
            }
        }
        wanted
    }

    /// A peer saw our probe come from `sa`: one of our NAT's mappings.
    fn observed(&mut self, sa: SocketAddr, now: Instant) {
        if self.own.observed(sa) {
            self.rendezvous_changed = true;
            self.announce_to_all(now);
        }
    }

    /// Our UDP endpoints (interface addresses with the port, STUN
    /// mappings). A change is announced to every peer that may use UDP.
    pub fn set_local_candidates(&mut self, endpoints: Vec<SocketAddr>, now: Instant) {
        if self.own.set_local(endpoints) {
            self.rendezvous_changed = true;
            self.announce_to_all(now);
        }
    }

    /// The TUN's own addresses besides the mesh address (`[interface]
    /// addresses`): anonymous peers may reach them too.
    pub fn set_tunnel_addresses(&mut self, addresses: impl IntoIterator<Item = IpAddr>) {
        self.tunnel_addresses = std::iter::once(IpAddr::V6(self.mesh_address))
            .chain(addresses)
            .collect();
    }

    /// The TTL of the opening punch probe.
    pub fn set_punch_ttl(&mut self, ttl: u8) {
        self.punch_ttl = ttl.max(1);
    }

    fn announce_to_all(&mut self, now: Instant) {
        for peer in self.peers.iter_mut() {
            peer.announce_at = Some(now);
        }
        self.timers.fire_by(Timer::Paths, now);
    }

    /// Sends our UDP endpoints to a peer, never to one restricted away
    /// from UDP: they carry our IP addresses. `reply`: the peer is asked
    /// to answer, and is asked again (sooner than the next punch) until it
    /// does; an answer to the peer's announcement changes no schedule.
    fn announce(&mut self, id: PeerId, reply: bool, now: Instant) {
        let endpoints = self.own.announced();
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return;
        };
        if reply {
            peer.announce_at = None;
        }
        if !peer.spec.allows(TransportKind::Udp) || endpoints.is_empty() {
            return;
        }
        let Some(path) = peer.path() else { return };
        if reply && !peer.paths.has_live(TransportKind::Udp, now) {
            let wait = peer.announce_retry.clamp(ANNOUNCE_RETRY, REPUNCH_INTERVAL);
            peer.announce_retry = (wait * 2).min(REPUNCH_INTERVAL);
            peer.announce_at = Some(now + wait);
        }
        tracing::debug!(peer = %peer.spec.name, %path, count = endpoints.len(), "announcing endpoints");
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
        let Some(peer) = self.peers.slots[id].as_ref() else {
            return;
        };
        let peer_mesh = peer.spec.public_key.mesh_address();
        peer_messages::encode_packet(message, self.mesh_address, peer_mesh, &mut self.message_buf);
        self.send_message_buf(id, to, ttl);
    }

    /// Seals the IP packet in `message_buf` for peer `id` and queues it to
    /// `to` (with `ttl`, if given); false if nothing was queued (boringtun
    /// holds it until a handshake completes).
    fn send_message_buf(&mut self, id: PeerId, to: PeerAddr, ttl: Option<u8>) -> bool {
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return false;
        };
        peer.wake(id, &mut self.peers.awake, self.last_now);
        let TunnResult::WriteToNetwork(datagram) = peer
            .tunn_mut(id, &self.keys)
            .encapsulate(&self.message_buf, &mut self.scratch)
        else {
            return false;
        };
        let mut transmit = Transmit::new(to, datagram);
        transmit.ttl = ttl;
        self.transmits.push_back(transmit);
        true
    }

    /// Answers a packet the peer's accept rules refused with an ICMP
    /// "administratively prohibited" through the tunnel, from the address
    /// it was sent to, so the application fails at once.
    fn answer_prohibited(&mut self, id: PeerId, to: PeerAddr, refused: &[u8]) {
        let Ok(info) = packet::parse(refused) else {
            return;
        };
        // ICMPv4 errors come from the original destination anyway.
        let local_v6 = match info.dst {
            IpAddr::V6(dst) => dst,
            IpAddr::V4(_) => self.mesh_address,
        };
        // Room for the largest ICMP error (IPv6: the minimum MTU).
        self.message_buf.resize(1280, 0);
        let Some(len) =
            packet::administratively_prohibited(refused, &info, local_v6, &mut self.message_buf)
        else {
            return;
        };
        self.message_buf.truncate(len);
        if self.send_message_buf(id, to, None) {
            if let Some(peer) = self.peers.slots[id].as_mut() {
                peer.counters.tx_packets += 1;
            }
        }
    }

    /// After a handshake, boringtun releases the packets it held.
    fn flush_queued(&mut self, id: PeerId) {
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return;
        };
        let Some(path) = peer.path() else {
            return;
        };
        let Some(tunn) = peer.tunn.as_mut() else {
            return;
        };
        while let TunnResult::WriteToNetwork(datagram) =
            tunn.decapsulate(None, &[], &mut self.scratch)
        {
            peer.counters.tx_packets += 1;
            self.transmits
                .push_back(Transmit::new(path.clone(), datagram));
        }
    }

    /// Runs the timers that are due (see [`Timer`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Tick => {
                    self.timers.set(Timer::Tick, Some(now + TIMER_TICK));
                    self.gate.tick(now);
                    self.drive_session_timers(now);
                    self.check_one_way(now);
                }
                Timer::Paths => self.drive_paths(now),
                Timer::Move => self.check_moved(now),
            }
        }
    }

    fn drive_session_timers(&mut self, now: Instant) {
        self.peers.refresh_awake(now);
        for &id in &self.peers.awake {
            let Some(peer) = self.peers.slots[id].as_mut() else {
                continue;
            };
            let result = if let Some(tunn) = peer.tunn.as_mut() {
                tunn.update_timers(&mut self.scratch)
            } else if peer.spec.persistent_keepalive.is_some() {
                // As WireGuard does when a keepalive is configured: a
                // session at once, kept up from then on.
                peer.tunn_mut(id, &self.keys)
                    .format_handshake_initiation(&mut self.scratch, false)
            } else {
                // A state never made has no timers to run.
                TunnResult::Done
            };
            match result {
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
                    tracing::debug!(peer = %peer.spec.name, ?error, "timer error");
                }
                _ => {}
            }
            peer.paths.prune(now);
            peer.select_path(now);
            // Sessions expire in boringtun's timers.
            if peer.update_look_up() {
                self.rendezvous_changed = true;
            }
        }
    }

    fn send_probes(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return;
        };
        let ids = &mut self.probe_ids;
        for probe in peer.paths.poll_probes(now, || ids.next()) {
            let ttl = probe.short_ttl.then_some(self.punch_ttl);
            tracing::trace!(%probe.to, ?ttl, "probe");
            self.send_peer_message(id, probe.to, &PeerMessage::Probe { id: probe.id }, ttl);
        }
    }

    /// Punching a peer we have no session with (its endpoints came from the
    /// DHT): handshake initiations stand in for probes, the first with the
    /// short TTL. At most one new initiation per `PUNCH_HANDSHAKE_SPACING`.
    fn send_punch_handshakes(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return;
        };
        let due = peer.paths.poll_punches(now);
        let spaced = peer
            .last_punch_handshake
            .is_none_or(|t| now.saturating_duration_since(t) >= PUNCH_HANDSHAKE_SPACING);
        if due.is_empty() || !(spaced || due.iter().any(|(_, short_ttl)| *short_ttl)) {
            return;
        }
        peer.wake(id, &mut self.peers.awake, now);
        let TunnResult::WriteToNetwork(init) = peer
            .tunn_mut(id, &self.keys)
            .format_handshake_initiation(&mut self.scratch, true)
        else {
            return;
        };
        peer.last_punch_handshake = Some(now);
        for (to, short_ttl) in due {
            let mut transmit = Transmit::new(to, init);
            transmit.ttl = short_ttl.then_some(self.punch_ttl);
            self.transmits.push_back(transmit);
        }
    }

    /// A peer's UDP endpoints, read from the rendezvous DHT. Used only for
    /// a peer that may use UDP and has no session yet (with a session, the
    /// peers swap endpoints inside it).
    pub fn rendezvous(&mut self, peer: &PublicKey, endpoints: &[SocketAddr], now: Instant) {
        let Some(&id) = self.peers.by_key.get(&peer.0) else {
            return;
        };
        let Some(peer) = self.peers.slots[id].as_mut() else {
            return;
        };
        if !peer.spec.allows(TransportKind::Udp) || peer.has_session() {
            return;
        }
        let usable = self
            .own
            .usable_peer_endpoints(&self.peers.routes, endpoints);
        tracing::info!(peer = %peer.spec.name, ?usable, "endpoints found in the DHT");
        // Punching is driven like timers: a quiet peer would never start.
        peer.wake(id, &mut self.peers.awake, now);
        peer.paths.rendezvous(&usable, now, RENDEZVOUS_OPEN_DELAY);
        self.timers.fire_by(Timer::Paths, now);
    }

    /// Sends due probes and announcements of peers with a session, and
    /// works out when the next are due.
    fn drive_paths(&mut self, now: Instant) {
        let mut next = now + TIMER_TICK;
        // Only awake peers: a quiet one has no session (its keys are gone)
        // and nothing to punch.
        let awake = std::mem::take(&mut self.peers.awake);
        for &id in &awake {
            let Some(peer) = self.peers.slots[id].as_mut() else {
                continue;
            };
            if !peer.has_session() {
                self.send_punch_handshakes(id, now);
                if let Some(due) = self.peers.slots[id]
                    .as_ref()
                    .and_then(|p| p.paths.next_punch())
                {
                    next = next.min(due.max(now + Duration::from_millis(1)));
                }
                continue;
            }
            let announce_due = peer.announce_at.is_some_and(|t| t <= now);
            self.send_probes(id, now);
            if announce_due {
                self.announce(id, true, now);
            }
            let Some(peer) = self.peers.slots[id].as_mut() else {
                continue;
            };
            for due in [peer.paths.next_probe(), peer.announce_at]
                .into_iter()
                .flatten()
            {
                next = next.min(due.max(now + Duration::from_millis(1)));
            }
        }
        // Peers woken meanwhile joined the (taken) list.
        let woken = std::mem::replace(&mut self.peers.awake, awake);
        self.peers.awake.extend(woken);
        self.timers.set(Timer::Paths, Some(next));
    }

    /// When `handle_timeout` wants to run next, and for which timer.
    pub fn poll_timeout(&self) -> Timeout {
        // The tick is always armed: it re-arms itself.
        self.timers.next().unwrap_or(Timeout {
            at: self.last_now,
            timer: Timer::Tick,
        })
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        loop {
            let transmit = self.transmits.pop_front()?;
            let PeerAddr::Relay(via) = transmit.to else {
                return Some(transmit);
            };
            // Sealed for the relay and queued to its path (at the back).
            self.send_through_relay(via, &transmit.payload);
        }
    }

    /// Offers to relay between our peers, at most `bytes_per_second` for
    /// each sender; None: stops offering it.
    pub fn set_relay_service(&mut self, bytes_per_second: Option<u64>) {
        self.relay_service = bytes_per_second.map(Rate::bytes_per_second);
    }

    /// What a path carries: a relay path, what the relay's own path
    /// carries less the relay message around the datagram. None: the relay
    /// has no path (or is reached through a relay itself).
    fn limits_of(
        &self,
        path: &PeerAddr,
        limits: &impl Fn(&PeerAddr) -> DatagramLimits,
    ) -> Option<DatagramLimits> {
        let PeerAddr::Relay(via) = path else {
            return Some(limits(path));
        };
        let relay_path = self.relay_path(via)?.1;
        let outer = limits(&relay_path);
        Some(DatagramLimits {
            unfragmented: outer.unfragmented.saturating_sub(RELAY_OVERHEAD),
            absolute: outer.absolute.saturating_sub(RELAY_OVERHEAD),
        })
    }

    /// The relay of `via` and its path, if it has a direct one.
    fn relay_path(&self, via: &RelayAddr) -> Option<(PeerId, PeerAddr)> {
        let id = *self.peers.by_key.get(&via.relay)?;
        let relay = self.peers.slots[id].as_ref()?;
        let path = relay.path().filter(|p| p.kind() != TransportKind::Relay)?;
        relay.spec.relay.then_some((id, path))
    }

    /// Sends `datagram` (sealed for `via.peer`) to `via.relay`, inside our
    /// session with the relay.
    fn send_through_relay(&mut self, via: RelayAddr, datagram: &[u8]) {
        if let Some((relay, path)) = self.relay_message(&via, datagram) {
            self.send_message_buf(relay, path, None);
        }
    }

    /// Puts the relay message carrying `datagram` to `via.peer` in
    /// `message_buf`; the relay and its path, if it has one.
    fn relay_message(&mut self, via: &RelayAddr, datagram: &[u8]) -> Option<(PeerId, PeerAddr)> {
        let Some((relay, path)) = self.relay_path(via) else {
            self.counters.relay_refused += 1;
            return None;
        };
        let dst = self.peers.slots[relay]
            .as_ref()?
            .spec
            .public_key
            .mesh_address();
        peer_messages::encode_relay(
            &via.peer,
            datagram,
            self.mesh_address,
            dst,
            &mut self.message_buf,
        );
        Some((relay, path))
    }

    /// The data path to a peer reached through a relay: sealed for the
    /// peer (into `scratch`), then for the relay (into `out`), and sent to
    /// the relay's path like any datagram (so runs to it batch), without
    /// allocating. A packet that starts a handshake goes the slow way.
    fn tun_packet_through_relay<'a>(
        &mut self,
        id: PeerId,
        via: RelayAddr,
        packet: &[u8],
        out: &'a mut [u8],
        now: Instant,
    ) -> FromTun<'a> {
        let mut sealed = std::mem::take(&mut self.scratch);
        let inner = self.seal_for(id, packet, &mut sealed, now);
        let result = match inner {
            Some(range) => self.seal_for_relay(&via, &sealed[range], out),
            None => FromTun::Done(DropReason::Queued),
        };
        self.scratch = sealed;
        result
    }

    /// Seals `packet` for peer `id` into `buf`: where the data message is,
    /// or None when boringtun held it (its handshake initiation is queued
    /// to every path that may carry it).
    fn seal_for(
        &mut self,
        id: PeerId,
        packet: &[u8],
        buf: &mut [u8],
        now: Instant,
    ) -> Option<std::ops::Range<usize>> {
        let start = buf.as_ptr() as usize;
        let peer = self.peers.slots[id].as_mut()?;
        let TunnResult::WriteToNetwork(datagram) =
            peer.tunn_mut(id, &self.keys).encapsulate(packet, buf)
        else {
            return None;
        };
        if message_type(datagram) == Some(HANDSHAKE_INIT) {
            for to in peer.paths.handshake_targets(now) {
                self.transmits.push_back(Transmit::new(to, datagram));
            }
            return None;
        }
        peer.counters.tx_packets += 1;
        let offset = datagram.as_ptr() as usize - start;
        Some(offset..offset + datagram.len())
    }

    /// Seals the relay message carrying `datagram` to `via.peer` for the
    /// relay, into `out`.
    fn seal_for_relay<'a>(
        &mut self,
        via: &RelayAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> FromTun<'a> {
        let Some((relay, path)) = self.relay_message(via, datagram) else {
            return FromTun::Done(DropReason::NoRoute);
        };
        let Some(peer) = self.peers.slots[relay].as_mut() else {
            return FromTun::Done(DropReason::NoRoute);
        };
        peer.wake(relay, &mut self.peers.awake, self.last_now);
        match peer
            .tunn_mut(relay, &self.keys)
            .encapsulate(&self.message_buf, out)
        {
            // Data, or the relay session's initiation (the message waits).
            TunnResult::WriteToNetwork(datagram) => FromTun::Send { to: path, datagram },
            _ => FromTun::Done(DropReason::Queued),
        }
    }

    /// We are the relay: peer `from_id` asks us to forward `datagram` to
    /// our peer `to`. Only between configured peers that may use UDP, only
    /// to a peer we reach directly, at most the configured rate per sender.
    fn forward_relayed(&mut self, from_id: PeerId, to: [u8; 32], datagram: &[u8], now: Instant) {
        let refuse = |counters: &mut NodeCounters, why: &str| {
            counters.relay_refused += 1;
            tracing::trace!(why, "relay request refused");
        };
        let Some(rate) = self.relay_service else {
            return refuse(&mut self.counters, "this node offers no relay");
        };
        let Some(origin) = self.peers.slots[from_id].as_mut() else {
            return;
        };
        if origin.spec.is_anonymous() {
            return refuse(&mut self.counters, "the sender is anonymous");
        }
        if !origin.relay_budget.take(datagram.len() as u64, rate, now) {
            return refuse(&mut self.counters, "the sender's relay rate is used up");
        }
        let origin_key = origin.spec.public_key.0;
        let Some(&target) = self.peers.by_key.get(&to) else {
            return refuse(&mut self.counters, "no such peer");
        };
        let Some(target_peer) = self.peers.slots[target].as_ref() else {
            return;
        };
        let path = target_peer
            .path()
            .filter(|p| p.kind() != TransportKind::Relay);
        let (Some(path), false, false) = (path, target_peer.spec.is_anonymous(), target == from_id)
        else {
            return refuse(
                &mut self.counters,
                "the target is anonymous, the sender, or unreachable",
            );
        };
        let dst = target_peer.spec.public_key.mesh_address();
        let message = PeerMessage::Relayed {
            from: origin_key,
            datagram: datagram.to_vec(),
        };
        peer_messages::encode_packet(&message, self.mesh_address, dst, &mut self.message_buf);
        if self.send_message_buf(target, path, None) {
            self.counters.relayed += 1;
        }
    }

    pub fn status(&self, now: Instant) -> NodeStatus {
        self.status_with(now, |_| None)
    }

    /// `status`, with each path described further by `path_state` (the
    /// transports' view, e.g. a Tox friend's connection).
    /// A path as `show` names it: a relay by its peer's name.
    pub fn describe_path(&self, addr: &PeerAddr) -> String {
        let PeerAddr::Relay(via) = addr else {
            return addr.to_string();
        };
        let relay = self.peers.by_key.get(&via.relay);
        match relay.and_then(|&id| self.peers.slots[id].as_ref()) {
            Some(relay) => format!("relay via {}", relay.spec.name),
            None => addr.to_string(),
        }
    }

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
                .map(|p| {
                    let (since_handshake, tx_bytes, rx_bytes, _loss, _rtt) = p
                        .tunn
                        .as_ref()
                        .map_or((None, 0, 0, 0.0, None), |t| t.stats());
                    PeerStatus {
                        name: p.spec.name.clone(),
                        public_key: p.spec.public_key.to_base64(),
                        mesh_address: p.spec.public_key.mesh_address(),
                        allowed_ips: p.spec.all_allowed_ips().collect(),
                        path: p.paths.in_use().map(|a| self.describe_path(a)),
                        path_state: p.paths.in_use().and_then(&path_state),
                        paths: p.paths.status(now, |a| self.describe_path(a)),
                        seconds_since_handshake: since_handshake.map(|d| d.as_secs()),
                        rx_bytes: rx_bytes as u64,
                        tx_bytes: tx_bytes as u64,
                        transports: p
                            .spec
                            .transports
                            .iter()
                            .map(|k| k.as_str().to_owned())
                            .collect(),
                        accept: p
                            .spec
                            .accept
                            .as_ref()
                            .map(|rules| rules.iter().map(|r| r.to_string()).collect()),
                        counters: p.counters.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// Per-transport tables (rate limiters, presence) are indexed by this.
pub(crate) fn transport_index(kind: TransportKind) -> usize {
    match kind {
        TransportKind::Udp => 0,
        TransportKind::Tox => 1,
        TransportKind::I2p => 2,
        TransportKind::Relay => 3,
    }
}

/// Probe ids no peer can guess: a keyed hash of a counter.
struct ProbeIds {
    key: [u8; 32],
    counter: u64,
}

impl ProbeIds {
    fn new() -> ProbeIds {
        let mut key = [0u8; 32];
        // Without OS randomness the ids are only as good as the counter's
        // secrecy; nothing else depends on it.
        let _ = getrandom::fill(&mut key);
        ProbeIds { key, counter: 0 }
    }

    fn next(&mut self) -> u64 {
        use sha2::{Digest, Sha256};
        self.counter += 1;
        let digest = Sha256::new()
            .chain_update(self.key)
            .chain_update(self.counter.to_le_bytes())
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(id)
    }
}

const HANDSHAKE_INIT: u32 = 1;
const HANDSHAKE_RESPONSE: u32 = 2;
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
    /// The transports it may use, in order of preference.
    #[serde(default)]
    pub transports: Vec<String>,
    /// What it may open towards us; absent: anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<Vec<String>>,
    pub counters: PeerCounters,
}

#[cfg(test)]
mod tests;
