//! The configured peers: each one's WireGuard state and paths, and the
//! indexes that find a peer by key, identity, address or session index.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519;
use veilmesh_transport::{PeerAddr, TransportKind};

use crate::accept::Firewall;
use crate::paths::PathSet;
use crate::routing::RoutingTable;
use crate::{NodeError, PeerCounters, PeerId, PeerSpec, ReconfigureReport};

/// A peer whose WireGuard state was not used for this long needs no
/// timers: boringtun gave up any handshake after 90 s (REKEY_ATTEMPT_TIME)
/// and erased the session keys 540 s after the last handshake.
pub(crate) const QUIET_AFTER: Duration = Duration::from_secs(600);
/// Peer ids live in the top 24 bits of boringtun's session indices.
pub(crate) const MAX_PEERS: usize = 1 << 24;
/// A peer whose handshake initiations keep coming although we answered
/// each (this many within `REPEATED_INITIATIONS_WINDOW`) does not get our
/// answers: our own evidence that our presence needs renewing.
pub(crate) const REPEATED_INITIATIONS: u32 = 3;
const REPEATED_INITIATIONS_WINDOW: Duration = Duration::from_secs(30);

pub(crate) struct Peer {
    pub(crate) spec: PeerSpec,
    /// Its WireGuard state, made on first use (`Peer::tunn_mut`): 11 KB
    /// that most of 10,000 configured peers never need. Once made it stays
    /// (but for a keepalive change, which boringtun fixes at creation): a
    /// new one would forget the newest initiation seen, and a replayed old
    /// one could then move the peer's endpoint.
    pub(crate) tunn: Option<Box<Tunn>>,
    /// Candidate paths and the one in use.
    pub(crate) paths: PathSet,
    /// When to announce our UDP endpoints to the peer next.
    pub(crate) announce_at: Option<Instant>,
    /// How long the next announcement waits for the peer's answer before
    /// it is repeated (see `ANNOUNCE_RETRY`).
    pub(crate) announce_retry: Duration,
    /// The last handshake initiation sent to punch without a session.
    pub(crate) last_punch_handshake: Option<Instant>,
    /// Handshake initiations answered since the peer last sent data: how
    /// many, since when.
    pub(crate) initiations: Option<(u32, Instant)>,
    /// When its WireGuard state was last used (see `QUIET_AFTER`).
    pub(crate) last_active: Option<Instant>,
    /// In `Node::awake`.
    pub(crate) listed: bool,
    /// Looked up in the rendezvous DHT: it may use UDP and has no session
    /// (as last told, see `update_look_up`).
    pub(crate) looked_up: bool,
    pub(crate) counters: PeerCounters,
    /// Its accept rules and the flows we opened to it, if it has rules.
    pub(crate) firewall: Option<Firewall>,
    /// ICMP "administratively prohibited" answers it may still get.
    pub(crate) rejections: Budget,
    /// What we relay for this peer (when we are a relay).
    pub(crate) relay_budget: Budget,
}

/// How fast a `Budget` refills, and how much it saves up at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u64,
    pub burst: u64,
}

impl Rate {
    /// `per_second`, with a tenth of a second's worth (at least one 64 KB
    /// datagram) saved up at most.
    pub fn bytes_per_second(per_second: u64) -> Rate {
        Rate {
            per_second,
            burst: (per_second / 10).max(65_536),
        }
    }
}

/// A token bucket, refilled continuously: ICMP answers to refused packets
/// (a peer flooding refused ports gets no flood back), bytes relayed for a
/// peer. Past its burst it admits exactly its rate, with no pause: a relay
/// that emptied a whole second's allowance at once and then dropped
/// everything for the rest of the second made TCP through it collapse.
#[derive(Debug)]
pub(crate) struct Budget {
    left: u64,
    refilled: Instant,
}

pub(crate) const REJECTIONS: Rate = Rate {
    per_second: 10,
    burst: 10,
};
/// What a relay forwards for one peer at most, unless configured: 125 MB/s
/// (1 Gbit/s).
pub const DEFAULT_RELAY_RATE: u64 = 125_000_000;

impl Budget {
    pub(crate) fn new(rate: Rate, now: Instant) -> Budget {
        Budget {
            left: rate.burst,
            refilled: now,
        }
    }

    /// Takes `amount` if that much is left at `rate`.
    pub(crate) fn take(&mut self, amount: u64, rate: Rate, now: Instant) -> bool {
        const NANOS: u128 = 1_000_000_000;
        // A rate lowered since the last call saves up no more than it says.
        self.left = self.left.min(rate.burst);
        let elapsed = now.saturating_duration_since(self.refilled).as_nanos();
        let earned = elapsed * u128::from(rate.per_second) / NANOS;
        if earned > 0 {
            let left = (u128::from(self.left) + earned).min(u128::from(rate.burst));
            if left == u128::from(rate.burst) {
                self.refilled = now;
            } else {
                // The part of a token not yet earned counts next time.
                let spent = earned * NANOS / u128::from(rate.per_second);
                self.refilled += Duration::from_nanos(spent.min(u128::from(u64::MAX)) as u64);
            }
            self.left = left as u64;
        }
        let granted = self.left >= amount;
        if granted {
            self.left -= amount;
        }
        granted
    }
}

impl Peer {
    pub(crate) fn new(spec: PeerSpec, now: Instant) -> Peer {
        Peer {
            paths: PathSet::new(configured_paths(&spec), now),
            announce_at: None,
            announce_retry: Duration::ZERO,
            last_punch_handshake: None,
            initiations: None,
            last_active: None,
            listed: false,
            looked_up: false,
            tunn: None,
            firewall: spec.accept.clone().map(Firewall::new),
            spec,
            counters: PeerCounters::default(),
            rejections: Budget::new(REJECTIONS, now),
            relay_budget: Budget::new(Rate::bytes_per_second(DEFAULT_RELAY_RATE), now),
        }
    }

    pub(crate) fn path(&self) -> Option<PeerAddr> {
        self.paths.in_use().cloned()
    }

    /// Brings `looked_up` up to date; true if it changed.
    pub(crate) fn update_look_up(&mut self) -> bool {
        let wanted = self.spec.allows(TransportKind::Udp) && !self.has_session();
        std::mem::replace(&mut self.looked_up, wanted) != wanted
    }

    pub(crate) fn has_session(&self) -> bool {
        self.tunn
            .as_ref()
            .is_some_and(|t| t.time_since_last_handshake().is_some())
    }

    /// Its WireGuard state, made now if it has none yet; `id` is its own.
    pub(crate) fn tunn_mut(&mut self, id: PeerId, keys: &SessionKeys) -> &mut Tunn {
        let spec = &self.spec;
        self.tunn
            .get_or_insert_with(|| Box::new(keys.tunn(spec, id)))
    }

    /// Whether its WireGuard timers can still do anything: not for a peer
    /// that is quiet (never used, or unused for `QUIET_AFTER`) and has no
    /// keepalive. Skipping those makes 10,000 idle peers cost nothing.
    pub(crate) fn needs_timers(&self, now: Instant) -> bool {
        self.spec.persistent_keepalive.is_some()
            || self
                .last_active
                .is_some_and(|t| now.saturating_duration_since(t) < QUIET_AFTER)
    }

    /// Marks its WireGuard state used now, and lists peer `id` in `awake`
    /// (`Node::awake`) unless it is there. A peer that was quiet first gets
    /// its paths brought up to date: nothing judged them meanwhile.
    pub(crate) fn wake(&mut self, id: PeerId, awake: &mut Vec<PeerId>, now: Instant) {
        if !self.needs_timers(now) {
            self.paths.prune(now);
            self.select_path(now);
        }
        self.last_active = Some(now);
        if !std::mem::replace(&mut self.listed, true) {
            awake.push(id);
        }
    }

    pub(crate) fn select_path(&mut self, now: Instant) {
        if let Some(path) = self.paths.select(now, &self.spec.transports) {
            tracing::info!(peer = %self.spec.name, %path, "path in use changed");
        }
    }
}

/// What every peer's WireGuard state is made with.
pub(crate) struct SessionKeys {
    pub(crate) private: x25519::StaticSecret,
    /// Given to every session: it checks MACs but never limits, as each
    /// handshake was already counted once by the transport's limiter.
    pub(crate) limiter: Arc<RateLimiter>,
}

impl SessionKeys {
    /// Peer `id`'s state: its session indices carry the id (`peer_of_index`).
    pub(crate) fn tunn(&self, spec: &PeerSpec, id: PeerId) -> Tunn {
        Tunn::new(
            self.private.clone(),
            spec.public_key.to_x25519(),
            None,
            spec.persistent_keepalive,
            id as u32,
            Some(self.limiter.clone()),
        )
    }
}

/// The peers, indexed by id. Ids are never reused: they live on in
/// session indices of messages still in flight after a peer is removed.
#[derive(Default)]
pub(crate) struct PeerTable {
    pub(crate) slots: Vec<Option<Peer>>,
    /// The peers whose timers, probes and punches are driven: those not
    /// quiet (`Peer::needs_timers`). The others cost nothing per tick.
    pub(crate) awake: Vec<PeerId>,
    pub(crate) by_key: HashMap<[u8; 32], PeerId>,
    /// The Tox keys and I2P destinations of the peers allowed them: over
    /// those transports nobody else gets any work done for them.
    pub(crate) by_identity: HashMap<PeerAddr, PeerId>,
    pub(crate) routes: RoutingTable<PeerId>,
}

impl PeerTable {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.slots.iter().flatten()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.slots.iter_mut().flatten()
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
        let mut report = ReconfigureReport::default();
        let mut wanted: HashMap<[u8; 32], PeerSpec> =
            peers.into_iter().map(|p| (p.public_key.0, p)).collect();
        for slot in &mut self.slots {
            let Some(peer) = slot else { continue };
            match wanted.remove(&peer.spec.public_key.0) {
                None => {
                    report.removed.push(peer.spec.name.clone());
                    *slot = None;
                }
                Some(spec) if spec == peer.spec => report.unchanged.push(spec.name),
                Some(spec) => {
                    report.changed.push(spec.name.clone());
                    let paths_changed =
                        spec.paths != peer.spec.paths || spec.transports != peer.spec.transports;
                    if paths_changed {
                        peer.paths
                            .set_configured(configured_paths(&spec), now, |p| {
                                path_allowed(&spec, p)
                            });
                    }
                    if spec.accept != peer.spec.accept {
                        peer.firewall = spec.accept.clone().map(Firewall::new);
                    }
                    peer.spec = spec;
                    peer.select_path(now);
                }
            }
        }
        for peer in self.slots.iter_mut().flatten() {
            let keepalive = peer.tunn.as_ref().map(|t| t.persistent_keepalive());
            if keepalive.is_some_and(|k| k != peer.spec.persistent_keepalive) {
                peer.tunn = None;
            }
        }
        let mut added: Vec<PeerSpec> = wanted.into_values().collect();
        added.sort_by(|a, b| a.name.cmp(&b.name));
        if self.slots.len() + added.len() >= MAX_PEERS {
            return Err(NodeError::TooManyPeers(self.slots.len() + added.len()));
        }
        for spec in added {
            report.added.push(spec.name.clone());
            let mut peer = Peer::new(spec, now);
            peer.select_path(now);
            self.slots.push(Some(peer));
        }
        self.rebuild_indexes(now);
        Ok(report)
    }

    pub(crate) fn rebuild_indexes(&mut self, now: Instant) {
        self.routes = RoutingTable::default();
        self.by_key.clear();
        self.by_identity.clear();
        self.awake.clear();
        for (id, peer) in self.slots.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            peer.listed = peer.needs_timers(now);
            peer.update_look_up();
            if peer.listed {
                self.awake.push(id);
            }
            for net in peer.spec.all_allowed_ips() {
                self.routes.insert(net, id);
            }
            self.by_key.insert(peer.spec.public_key.0, id);
            for path in configured_paths(&peer.spec) {
                if path.kind() != TransportKind::Udp {
                    self.by_identity.insert(path, id);
                }
            }
        }
    }

    /// Drops the peers that went quiet (or were removed) from `awake`,
    /// which stays in id order (`Peer::listed` keeps it free of repeats).
    pub(crate) fn refresh_awake(&mut self, now: Instant) {
        let peers = &mut self.slots;
        self.awake.sort_unstable();
        self.awake.retain(|&id| match peers[id].as_mut() {
            Some(peer) if peer.needs_timers(now) => true,
            Some(peer) => {
                peer.listed = false;
                false
            }
            None => false,
        });
    }
}

/// Counts one more handshake initiation answered since the peer last sent
/// data; true when they repeat enough to say our answers are lost.
pub(crate) fn initiation_repeated(initiations: &mut Option<(u32, Instant)>, now: Instant) -> bool {
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
/// One path per transport the peer may use, in its order, but every relay
/// it may be reached through.
pub(crate) fn configured_paths(spec: &PeerSpec) -> Vec<PeerAddr> {
    let mut paths = Vec::new();
    for &kind in &spec.transports {
        if kind == TransportKind::Relay {
            paths.extend(spec.paths.iter().filter(|p| p.kind() == kind).cloned());
        } else {
            paths.extend(spec.path(kind).cloned());
        }
    }
    paths
}

/// Does this peer's traffic need its addresses checked (see
/// `local_address_allowed`)? Most peers' does not, which keeps the check
/// off their per-packet path.
pub(crate) fn needs_address_check(spec: &PeerSpec) -> bool {
    spec.is_anonymous() || spec.allowed_destinations.is_some()
}

/// May the peer reach (and see) this address of ours? Our addresses on
/// the TUN (the mesh address and the interface's own) always: they say
/// nothing of where this node is. Besides them, its
/// `allowed_destinations`, or, without that setting, anything unless the
/// peer is anonymous: an I2P-only peer that could ping our LAN or public
/// address would learn it from the answer.
pub(crate) fn local_address_allowed(
    spec: &PeerSpec,
    tunnel_addresses: &[IpAddr],
    addr: IpAddr,
) -> bool {
    tunnel_addresses.contains(&addr)
        || match &spec.allowed_destinations {
            Some(nets) => nets.iter().any(|net| net.contains(&addr)),
            None => !spec.is_anonymous(),
        }
}

/// May this path carry the peer's session? Only over its allowed
/// transports (an I2P-only peer must never learn our IP), and over Tox or
/// I2P only from its own configured identity there: a Tox friendship or an
/// I2P datagram grants nothing by itself. UDP endpoints roam freely, as in
/// WireGuard.
pub(crate) fn path_allowed(spec: &PeerSpec, path: &PeerAddr) -> bool {
    spec.allows(path.kind())
        && match path {
            PeerAddr::Udp(_) => true,
            PeerAddr::Tox(_) | PeerAddr::I2p(_) | PeerAddr::Relay(_) => spec.paths.contains(path),
            PeerAddr::Unattributed(_) => false,
        }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn a_budget_refills_continuously_up_to_its_burst() {
        let rate = Rate {
            per_second: 1000,
            burst: 100,
        };
        let start = Instant::now();
        let mut budget = Budget::new(rate, start);
        assert!(budget.take(100, rate, start));
        assert!(!budget.take(1, rate, start));
        // No pause until the next second: 10 ms earn 10.
        let at = start + Duration::from_millis(10);
        assert!(budget.take(10, rate, at));
        assert!(!budget.take(1, rate, at));
        // Fractions are kept: four half-tokens are two.
        let mut at = at;
        let mut got = 0;
        for _ in 0..4 {
            at += Duration::from_micros(500);
            got += (0..3).filter(|_| budget.take(1, rate, at)).count();
        }
        assert_eq!(got, 2);
        // An hour idle saves up the burst, no more.
        let later = at + Duration::from_secs(3600);
        assert!(budget.take(100, rate, later));
        assert!(!budget.take(1, rate, later));
        // A lower rate caps what was saved.
        let later = later + Duration::from_secs(10);
        let lower = Rate {
            per_second: 10,
            burst: 5,
        };
        assert!(!budget.take(6, lower, later));
        assert!(budget.take(5, lower, later));
    }
}
