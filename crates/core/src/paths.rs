//! A peer's candidate paths: which exist, which answer probes, how fast,
//! and which one carries its traffic. Pure state; the node sends the probes
//! this asks for and reports what comes back.
//!
//! A path is *live* while probes sent on it are answered (a round trip, so a
//! path that only works one way is not live). The path in use is the best
//! live one: first by the peer's transport order, then by RTT, sticking to
//! the current one among equals. With nothing live, the path last heard
//! from is used (WireGuard's roaming), else the first configured one.
//!
//! Punching (for endpoints the peer announced): the first probe leaves with
//! a short TTL, opening our NAT's mapping without reaching the peer's NAT
//! (where an unsolicited packet would leave a conntrack entry that makes
//! the peer's NAT remap its own outgoing probes). Full probes go only once
//! the peer has opened its side: it said so (its answer to our
//! announcement is sent after its own short-TTL probes), or its probes
//! reached us. So no full probe can reach a NAT that is not yet open,
//! however slow the path carrying the announcements.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use veilmesh_transport::{PeerAddr, TransportKind};

/// Probe interval for a peer with several paths while traffic flows:
/// failover must happen within 5 s of the path in use going silent.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Probe interval for a peer with one path, or an idle one: a keepalive
/// that holds NAT mappings (UDP conntrack entries last 30 s unreplied) and
/// measures RTT.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// A peer with no data to or from it for this long is idle: failover
/// matters only while packets flow, so its paths are probed at the
/// keepalive interval until traffic resumes (which probes them at once).
pub const IDLE_AFTER: Duration = Duration::from_secs(30);
/// Probe interval for a path that has not answered for a long time.
const DEAD_INTERVAL: Duration = Duration::from_secs(5);
/// A path that answered within this long is probed as if still live.
const RECENT: Duration = Duration::from_secs(60);
/// Probes during a punch go this often, for this long.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
const PUNCH_DURATION: Duration = Duration::from_secs(5);
/// Observed (peer-reflexive) and announced paths kept per peer.
const MAX_LEARNED: usize = 16;
/// Probes awaiting an answer, across all paths of a peer.
const MAX_OUTSTANDING: usize = 64;
/// Observed paths silent this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(120);
/// After our presence on a transport was re-created, its paths are probed
/// fast until the peer is heard over them, for this long at most.
const REHOME_FAST_PROBING: Duration = Duration::from_secs(60);
/// A path counts as heard while the peer's traffic came over it this
/// recently.
const HEARD_RECENTLY: Duration = Duration::from_secs(5);
/// A path is one way (we hear the peer, it does not hear us) once this
/// many probes in a row went unanswered while it was heard, the first of
/// them this long ago at least. A one-way path is probed fast.
const ONE_WAY_PROBES: u32 = 5;
const ONE_WAY_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// From the config: a static endpoint, Tox ID or I2P destination.
    Configured,
    /// An endpoint the peer announced in the session, to be punched.
    Announced,
    /// Where authenticated traffic from the peer came from.
    Observed,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Configured => "configured",
            Origin::Announced => "announced",
            Origin::Observed => "observed",
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Punch {
    /// The short-TTL probe has gone out.
    opened: bool,
    /// Full probes start here: once the peer's side is open.
    full_from: Option<Instant>,
    until: Instant,
}

#[derive(Debug, Clone)]
struct Path {
    addr: PeerAddr,
    origin: Origin,
    last_pong: Option<Instant>,
    last_rx: Option<Instant>,
    rtt: Option<Duration>,
    next_probe: Instant,
    punch: Option<Punch>,
    /// Our presence on the path's transport was re-created then: probe
    /// fast until the peer is heard over it again.
    rehomed: Option<Instant>,
    /// Probes sent since the last one answered, and when the first of
    /// them went.
    unanswered: Option<(u32, Instant)>,
}

impl Path {
    fn new(addr: PeerAddr, origin: Origin, now: Instant) -> Path {
        Path {
            addr,
            origin,
            last_pong: None,
            last_rx: None,
            rtt: None,
            next_probe: now,
            punch: None,
            rehomed: None,
            unanswered: None,
        }
    }

    fn timeout(&self, interval: Duration) -> Duration {
        2 * interval + Duration::from_secs(1) + 2 * self.rtt.unwrap_or_default()
    }

    fn is_live(&self, now: Instant, interval: Duration) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) <= self.timeout(interval))
    }

    fn recently_live(&self, now: Instant) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) <= RECENT)
    }

    fn heard_recently(&self, now: Instant) -> bool {
        self.last_rx
            .is_some_and(|t| now.saturating_duration_since(t) <= HEARD_RECENTLY)
    }

    /// Heard now, while our probes have gone unanswered for a while.
    fn suspect_one_way(&self, now: Instant) -> bool {
        self.heard_recently(now) && self.unanswered.is_some()
    }

    fn is_one_way(&self, now: Instant) -> bool {
        self.heard_recently(now)
            && self.unanswered.is_some_and(|(n, since)| {
                n >= ONE_WAY_PROBES && now.saturating_duration_since(since) >= ONE_WAY_AFTER
            })
    }
}

/// A probe the node should send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeToSend {
    pub to: PeerAddr,
    pub id: u64,
    /// Send with this IP TTL (the opening probe of a punch).
    pub short_ttl: bool,
}

/// One path as `veilmesh show` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PathStatus {
    pub address: String,
    /// Its transport: udp, tox or i2p.
    #[serde(default)]
    pub transport: String,
    pub origin: Origin,
    /// live, punching, silent (answered before, not now) or unverified.
    pub state: String,
    pub rtt_ms: Option<f64>,
    pub in_use: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PathSet {
    paths: Vec<Path>,
    in_use: Option<PeerAddr>,
    /// Probes awaiting a reply: id, the path it went on, when.
    outstanding: VecDeque<(u64, PeerAddr, Instant)>,
    /// When data last went to or came from the peer (see `IDLE_AFTER`).
    last_traffic: Option<Instant>,
    /// The peer sent a veilmesh message (a probe, a reply) at least once.
    /// Until it does it may be a stock WireGuard peer (a phone), which
    /// never answers probes: unanswered probes then say nothing of the
    /// path, and must not make it look one way (probed every second).
    speaks_veilmesh: bool,
}

impl PathSet {
    /// The peer sent a veilmesh message: unanswered probes mean something.
    pub fn spoke(&mut self) {
        self.speaks_veilmesh = true;
    }

    pub fn new(configured: Vec<PeerAddr>, now: Instant) -> PathSet {
        let mut set = PathSet::default();
        set.set_configured(configured, now, |_| true);
        set
    }

    /// The configured paths changed (a reload): keep what is still allowed,
    /// with its measurements.
    pub fn set_configured(
        &mut self,
        configured: Vec<PeerAddr>,
        now: Instant,
        allowed: impl Fn(&PeerAddr) -> bool,
    ) {
        self.paths.retain(|p| {
            allowed(&p.addr) && (p.origin != Origin::Configured || configured.contains(&p.addr))
        });
        for addr in configured {
            match self.paths.iter_mut().find(|p| p.addr == addr) {
                Some(p) => p.origin = Origin::Configured,
                None => self.paths.push(Path::new(addr, Origin::Configured, now)),
            }
        }
        if self.in_use.as_ref().is_some_and(|a| !self.contains(a)) {
            self.in_use = None;
        }
    }

    fn contains(&self, addr: &PeerAddr) -> bool {
        self.get(addr).is_some()
    }

    fn get(&self, addr: &PeerAddr) -> Option<&Path> {
        self.paths.iter().find(|p| &p.addr == addr)
    }

    /// The path in use, if it is live.
    fn live_in_use(&self, now: Instant, interval: Duration) -> Option<&Path> {
        self.get(self.in_use.as_ref()?)
            .filter(|p| p.is_live(now, interval))
    }

    /// Room for one more learned path: true if there is, or was made by
    /// forgetting the longest-silent one.
    fn make_room(&mut self) -> bool {
        self.learned_count() < MAX_LEARNED || self.evict_one()
    }

    fn get_mut(&mut self, addr: &PeerAddr) -> Option<&mut Path> {
        self.paths.iter_mut().find(|p| &p.addr == addr)
    }

    fn interval(&self, now: Instant) -> Duration {
        if self.paths.len() > 1 && !self.idle(now) {
            PROBE_INTERVAL
        } else {
            KEEPALIVE_INTERVAL
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.last_traffic
            .is_none_or(|t| now.saturating_duration_since(t) >= IDLE_AFTER)
    }

    /// Data went to or came from the peer. True when probes are due at
    /// once: it was idle, so what we know of its paths is old.
    pub fn traffic(&mut self, now: Instant) -> bool {
        let resumed = self.idle(now) && self.paths.len() > 1;
        self.last_traffic = Some(now);
        if resumed {
            self.probe_all_now(now);
        }
        resumed
    }

    /// Is `addr` one of the paths the config gives?
    pub fn is_configured(&self, addr: &PeerAddr) -> bool {
        self.get(addr)
            .is_some_and(|p| p.origin == Origin::Configured)
    }

    pub fn in_use(&self) -> Option<&PeerAddr> {
        self.in_use.as_ref()
    }

    /// Authenticated traffic arrived over `from` (already checked allowed).
    /// Returns true when probes are due at once: `from` is new, or a punch
    /// waiting for the peer's side to open now may probe in full.
    pub fn heard(&mut self, from: &PeerAddr, now: Instant) -> bool {
        let speaks = self.speaks_veilmesh;
        if let Some(path) = self.get_mut(from) {
            // Evidence of a one-way path builds up only while the peer is
            // heard: probes lost while it was silent say nothing, and would
            // make a peer we hear again look deaf before it could answer.
            if !path.heard_recently(now) {
                path.unanswered = None;
            }
            path.last_rx = Some(now);
            path.rehomed = None;
            // Heard while a probe is overdue: look closer now rather than
            // at the keepalive interval (the path may be one way).
            let overdue = speaks
                && path.unanswered.is_some_and(|(_, since)| {
                    now.saturating_duration_since(since) >= PROBE_INTERVAL
                });
            if overdue && path.next_probe > now + PROBE_INTERVAL {
                path.next_probe = now + PROBE_INTERVAL;
                return true;
            }
            if let Some(punch) = path.punch.as_mut().filter(|p| p.full_from.is_none()) {
                punch.full_from = Some(now);
                path.next_probe = now;
                return true;
            }
            return false;
        }
        if !self.make_room() {
            return false;
        }
        let mut path = Path::new(from.clone(), Origin::Observed, now);
        path.last_rx = Some(now);
        self.paths.push(path);
        true
    }

    /// A handshake response came back over `from`: a round trip.
    pub fn answered(&mut self, from: &PeerAddr, now: Instant) {
        self.heard(from, now);
        if let Some(path) = self.get_mut(from) {
            path.last_pong = Some(now);
            path.punch = None;
            path.unanswered = None;
        }
    }

    fn learned_count(&self) -> usize {
        self.paths
            .iter()
            .filter(|p| p.origin != Origin::Configured)
            .count()
    }

    /// Drops the learned path silent the longest, unless it is in use.
    fn evict_one(&mut self) -> bool {
        let in_use = self.in_use.clone();
        let victim = self
            .paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.origin != Origin::Configured && Some(&p.addr) != in_use.as_ref())
            .min_by_key(|(_, p)| p.last_pong.max(p.last_rx))
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                self.paths.remove(i);
                true
            }
            None => false,
        }
    }

    /// The peer announced its endpoints: they replace the ones it announced
    /// before (live ones stay), and those not live are punched. `peer_open`:
    /// the peer has already sent its short-TTL probes to us.
    pub fn announced(&mut self, endpoints: &[SocketAddr], now: Instant, peer_open: bool) {
        self.paths.retain(|p| {
            p.origin != Origin::Announced
                || p.recently_live(now)
                || matches!(p.addr, PeerAddr::Udp(sa) if endpoints.contains(&sa))
        });
        self.punch(endpoints, now, peer_open.then_some(now), true);
    }

    /// Endpoints of a peer we have no session with, read from the DHT.
    /// Neither side can tell the other when its NAT is open, so full
    /// packets wait `open_delay`: long enough for the peer to have read
    /// ours and sent its short-TTL packets. Known endpoints already being
    /// punched are left alone.
    pub fn rendezvous(&mut self, endpoints: &[SocketAddr], now: Instant, open_delay: Duration) {
        self.punch(endpoints, now, Some(now + open_delay), false);
    }

    /// Starts punching those of `endpoints` that are not live (adding the
    /// new ones); `restart` also restarts punches under way.
    fn punch(
        &mut self,
        endpoints: &[SocketAddr],
        now: Instant,
        full_from: Option<Instant>,
        restart: bool,
    ) {
        for sa in endpoints {
            let addr = PeerAddr::Udp(*sa);
            if !self.contains(&addr) {
                if !self.make_room() {
                    continue;
                }
                self.paths
                    .push(Path::new(addr.clone(), Origin::Announced, now));
            }
            let interval = self.interval(now);
            if let Some(path) = self.get_mut(&addr) {
                if !path.is_live(now, interval) && (restart || path.punch.is_none()) {
                    path.punch = Some(Punch {
                        opened: false,
                        full_from,
                        until: full_from.unwrap_or(now) + PUNCH_DURATION,
                    });
                    path.next_probe = now;
                }
            }
        }
    }

    /// Our presence on `kind` was re-created: probe its paths at once and
    /// fast until the peer is heard over them. False if the peer has no
    /// path of that kind.
    pub fn rehomed(&mut self, kind: TransportKind, now: Instant) -> bool {
        let mut any = false;
        for p in self.paths.iter_mut().filter(|p| p.addr.kind() == kind) {
            p.rehomed = Some(now);
            p.next_probe = now;
            // A new presence: evidence about the old one says nothing.
            p.unanswered = None;
            any = true;
        }
        any
    }

    /// A transport over which the peer is heard but does not hear us: our
    /// own evidence that our presence there needs renewing (an I2P router
    /// that still sends our replies to where the peer used to be).
    pub fn one_way(&self, now: Instant) -> Option<TransportKind> {
        if !self.speaks_veilmesh {
            return None;
        }
        self.paths
            .iter()
            .find(|p| p.is_one_way(now))
            .map(|p| p.addr.kind())
    }

    /// Has the peer been heard over `kind` since `t`?
    pub fn heard_since(&self, kind: TransportKind, t: Instant) -> bool {
        self.paths
            .iter()
            .any(|p| p.addr.kind() == kind && p.last_rx.is_some_and(|rx| rx >= t))
    }

    /// The paths over `kind`.
    pub fn of_kind(&self, kind: TransportKind) -> Vec<PeerAddr> {
        self.paths
            .iter()
            .filter(|p| p.addr.kind() == kind)
            .map(|p| p.addr.clone())
            .collect()
    }

    /// Probe every path at once (after a handshake, or a new path).
    pub fn probe_all_now(&mut self, now: Instant) {
        for p in &mut self.paths {
            p.next_probe = p.next_probe.min(now);
        }
    }

    /// The probes due now; each is remembered, with its path, to match its
    /// reply. `new_id` gives unpredictable probe ids: a reply counts only
    /// if it names one.
    pub fn poll_probes(
        &mut self,
        now: Instant,
        mut new_id: impl FnMut() -> u64,
    ) -> Vec<ProbeToSend> {
        let due = self.poll(now, false);
        due.into_iter()
            .map(|(to, short_ttl)| {
                let id = new_id();
                self.await_reply(id, &to, now);
                if let Some(path) = self.get_mut(&to) {
                    let (count, since) = path.unanswered.unwrap_or((0, now));
                    path.unanswered = Some((count + 1, since));
                }
                ProbeToSend { to, id, short_ttl }
            })
            .collect()
    }

    /// A probe `id` going to `to` now, outside the schedule (`veilmesh
    /// ping`): its reply counts as any other. False if `to` is no path.
    pub fn probe_now(&mut self, to: &PeerAddr, id: u64, now: Instant) -> bool {
        if self.get(to).is_none() {
            return false;
        }
        self.await_reply(id, to, now);
        true
    }

    /// Probe `id` went to `to` now: its reply counts (the oldest
    /// outstanding probe is forgotten beyond `MAX_OUTSTANDING`).
    fn await_reply(&mut self, id: u64, to: &PeerAddr, now: Instant) {
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((id, to.clone(), now));
    }

    /// Every path, the one in use first.
    pub fn addresses(&self) -> Vec<PeerAddr> {
        let mut all: Vec<PeerAddr> = self.in_use.iter().cloned().collect();
        all.extend(
            self.paths
                .iter()
                .map(|p| p.addr.clone())
                .filter(|a| Some(a) != self.in_use.as_ref()),
        );
        all
    }

    /// Like `poll_probes`, for paths being punched only: without a session
    /// the node sends handshake initiations there instead of probes. The
    /// second field: with the short TTL.
    pub fn poll_punches(&mut self, now: Instant) -> Vec<(PeerAddr, bool)> {
        self.poll(now, true)
    }

    /// The paths due a probe (or punch) now, and whether with the short TTL.
    fn poll(&mut self, now: Instant, punches_only: bool) -> Vec<(PeerAddr, bool)> {
        let interval = self.interval(now);
        let speaks = self.speaks_veilmesh;
        let mut due = Vec::new();
        for path in &mut self.paths {
            if path.next_probe > now || (punches_only && path.punch.is_none()) {
                continue;
            }
            let short_ttl = match &mut path.punch {
                Some(punch) if now > punch.until => {
                    path.punch = None;
                    !full_probes_allowed(path, now)
                }
                Some(punch) if !punch.opened => {
                    punch.opened = true;
                    path.next_probe = punch.full_from.unwrap_or(punch.until).max(now);
                    due.push((path.addr.clone(), true));
                    continue;
                }
                Some(punch) if !matches!(punch.full_from, Some(t) if t <= now) => {
                    path.next_probe = punch.full_from.unwrap_or(punch.until);
                    continue;
                }
                Some(_) => {
                    path.next_probe = now + PUNCH_INTERVAL;
                    due.push((path.addr.clone(), false));
                    continue;
                }
                None => !full_probes_allowed(path, now),
            };
            path.rehomed = path.rehomed.filter(|at| now < *at + REHOME_FAST_PROBING);
            let live = path.is_live(now, interval) || path.recently_live(now);
            path.next_probe = now
                + if path.rehomed.is_some() || speaks && path.suspect_one_way(now) {
                    PROBE_INTERVAL
                } else if live || path.origin == Origin::Configured && path.last_pong.is_none() {
                    interval
                } else {
                    DEAD_INTERVAL.max(interval)
                };
            due.push((path.addr.clone(), short_ttl));
        }
        due
    }

    /// When the next probe is due.
    pub fn next_probe(&self) -> Option<Instant> {
        self.paths.iter().map(|p| p.next_probe).min()
    }

    /// When the next punch packet is due, if a punch is under way.
    pub fn next_punch(&self) -> Option<Instant> {
        self.paths
            .iter()
            .filter(|p| p.punch.is_some())
            .map(|p| p.next_probe)
            .min()
    }

    /// A probe reply that came over `from`: the path answers if the probe
    /// went there. False if the id is not one of ours (old, never sent) or
    /// went elsewhere: a reply over one path must not make another live.
    pub fn pong(&mut self, id: u64, from: &PeerAddr, now: Instant) -> bool {
        let Some(i) = self
            .outstanding
            .iter()
            .position(|(o, addr, _)| *o == id && addr == from)
        else {
            return false;
        };
        let Some((_, addr, sent)) = self.outstanding.remove(i) else {
            return false;
        };
        self.speaks_veilmesh = true;
        let Some(path) = self.get_mut(&addr) else {
            return false;
        };
        let sample = now.saturating_duration_since(sent);
        path.rtt = Some(match path.rtt {
            Some(rtt) => (rtt * 7 + sample) / 8,
            None => sample,
        });
        path.last_pong = Some(now);
        path.punch = None;
        path.unanswered = None;
        true
    }

    /// Re-chooses the path in use; returns it when it changed.
    pub fn select(&mut self, now: Instant, order: &[TransportKind]) -> Option<&PeerAddr> {
        let interval = self.interval(now);
        let rank =
            |kind: TransportKind| order.iter().position(|k| *k == kind).unwrap_or(usize::MAX);
        let current_live = self.live_in_use(now, interval);
        let best_live = self
            .paths
            .iter()
            .filter(|p| p.is_live(now, interval))
            .min_by_key(|p| (rank(p.addr.kind()), p.rtt.unwrap_or(Duration::MAX)));
        let chosen = match (current_live, best_live) {
            (Some(cur), Some(best)) if rank(cur.addr.kind()) <= rank(best.addr.kind()) => {
                Some(cur.addr.clone())
            }
            (_, Some(best)) => Some(best.addr.clone()),
            (_, None) => self
                .paths
                .iter()
                .filter(|p| p.last_rx.is_some())
                .max_by_key(|p| p.last_rx)
                .or_else(|| {
                    self.paths
                        .iter()
                        .filter(|p| p.origin == Origin::Configured)
                        .min_by_key(|p| rank(p.addr.kind()))
                })
                .map(|p| p.addr.clone()),
        };
        if chosen.is_some() && chosen != self.in_use {
            self.in_use = chosen;
            return self.in_use.as_ref();
        }
        None
    }

    /// Where a handshake initiation goes: the live path in use, or every
    /// path that may carry one (announced endpoints only while punched or
    /// recently live: an unsolicited full-TTL packet spoils the punch).
    pub fn handshake_targets(&self, now: Instant) -> Vec<PeerAddr> {
        if let Some(path) = self.live_in_use(now, self.interval(now)) {
            return vec![path.addr.clone()];
        }
        let mut targets: Vec<PeerAddr> = self
            .paths
            .iter()
            .filter(|p| full_probes_allowed(p, now))
            .map(|p| p.addr.clone())
            .collect();
        if let Some(addr) = &self.in_use {
            if !targets.contains(addr) {
                targets.insert(0, addr.clone());
            }
        }
        targets
    }

    pub fn has_live(&self, kind: TransportKind, now: Instant) -> bool {
        let interval = self.interval(now);
        self.paths
            .iter()
            .any(|p| p.addr.kind() == kind && p.is_live(now, interval))
    }

    /// Forgets observed paths silent for long (a NAT's old mapping).
    pub fn prune(&mut self, now: Instant) {
        let in_use = self.in_use.clone();
        self.paths.retain(|p| {
            p.origin != Origin::Observed
                || Some(&p.addr) == in_use.as_ref()
                || p.last_pong
                    .max(p.last_rx)
                    .is_some_and(|t| now.saturating_duration_since(t) < FORGET_AFTER)
        });
    }

    /// Each path's state; `describe` names the addresses.
    pub fn status(&self, now: Instant, describe: impl Fn(&PeerAddr) -> String) -> Vec<PathStatus> {
        let interval = self.interval(now);
        self.paths
            .iter()
            .map(|p| PathStatus {
                address: describe(&p.addr),
                transport: p.addr.kind().as_str().to_owned(),
                origin: p.origin,
                state: if p.is_live(now, interval) {
                    "live"
                } else if p.punch.is_some() {
                    "punching"
                } else if p.last_pong.is_some() {
                    "silent"
                } else {
                    "unverified"
                }
                .to_owned(),
                rtt_ms: p.rtt.map(|d| (d.as_secs_f64() * 1e5).round() / 100.0),
                in_use: Some(&p.addr) == self.in_use.as_ref(),
            })
            .collect()
    }
}

/// May full-TTL packets go to this path outside a punch? Not to announced
/// endpoints that neither answered nor sent anything (or not for long):
/// reaching the peer's NAT before the peer has sent anything spoils the
/// next punch.
fn full_probes_allowed(path: &Path, now: Instant) -> bool {
    let heard_recently = path
        .last_rx
        .is_some_and(|t| now.saturating_duration_since(t) <= RECENT);
    let punch_open = path
        .punch
        .is_some_and(|p| p.full_from.is_some_and(|t| t <= now));
    path.origin != Origin::Announced || path.recently_live(now) || heard_recently || punch_open
}

#[cfg(test)]
mod tests {
    use super::*;
    use veilmesh_transport::ToxPublicKey;

    fn udp(s: &str) -> PeerAddr {
        PeerAddr::Udp(s.parse().unwrap())
    }

    /// Probe ids for tests: any distinct numbers do.
    fn ids() -> impl FnMut() -> u64 {
        let mut next = 0;
        move || {
            next += 1;
            next
        }
    }
    const ORDER: [TransportKind; 3] = TransportKind::ALL;

    fn answer_all(set: &mut PathSet, now: Instant, only: &[PeerAddr]) {
        for probe in set.poll_probes(now, ids()) {
            if only.contains(&probe.to) {
                assert!(set.pong(probe.id, &probe.to, now + Duration::from_millis(10)));
            }
        }
    }

    #[test]
    fn prefers_udp_fails_over_to_tox_and_comes_back() {
        let t0 = Instant::now();
        let direct = udp("203.0.113.7:40000");
        let tox = PeerAddr::Tox(ToxPublicKey([3; 32]));
        let mut set = PathSet::new(vec![direct.clone(), tox.clone()], t0);
        // Before anything answers: the first configured path in order.
        assert_eq!(set.select(t0, &ORDER), Some(&direct));
        set.traffic(t0);
        answer_all(&mut set, t0, &[direct.clone(), tox.clone()]);
        assert_eq!(set.select(t0, &ORDER), None, "no change");
        // The direct path goes silent while packets flow: Tox takes over
        // within 5 s.
        let mut now = t0;
        let mut moved_at = None;
        for _ in 0..60 {
            now += Duration::from_millis(100);
            set.traffic(now);
            answer_all(&mut set, now, std::slice::from_ref(&tox));
            if set.select(now, &ORDER).is_some() {
                moved_at = Some(now);
                break;
            }
        }
        let moved_at = moved_at.expect("failover");
        assert_eq!(set.in_use(), Some(&tox));
        assert!(
            moved_at - t0 <= Duration::from_secs(5),
            "{:?}",
            moved_at - t0
        );
        // The direct path answers again: traffic goes back.
        for _ in 0..30 {
            now += Duration::from_millis(100);
            set.traffic(now);
            answer_all(&mut set, now, &[direct.clone(), tox.clone()]);
            set.select(now, &ORDER);
        }
        assert_eq!(set.in_use(), Some(&direct));
        let status = set.status(now, PeerAddr::to_string);
        assert!(status.iter().all(|p| p.state == "live"));
        assert_eq!(status.iter().filter(|p| p.in_use).count(), 1);
    }

    /// Probes every second only while packets flow: an idle peer's paths
    /// are probed at the keepalive interval, and traffic that resumes
    /// probes them all at once.
    #[test]
    fn idle_peers_are_probed_at_the_keepalive_interval() {
        let t0 = Instant::now();
        let direct = udp("203.0.113.7:40000");
        let tox = PeerAddr::Tox(ToxPublicKey([3; 32]));
        let mut set = PathSet::new(vec![direct.clone(), tox.clone()], t0);
        let both = [direct.clone(), tox.clone()];
        set.traffic(t0);
        let mut probes = 0;
        let count = |set: &mut PathSet, from: Instant, seconds: u64| {
            let mut sent = 0;
            for ms in (0..seconds * 1000).step_by(100) {
                let now = from + Duration::from_millis(ms);
                let due = set.poll_probes(now, ids());
                sent += due.len();
                for probe in due {
                    set.pong(probe.id, &probe.to, now + Duration::from_millis(10));
                }
            }
            sent
        };
        // With traffic in the last 30 s: two paths, one probe each a second.
        probes += count(&mut set, t0, 30);
        assert!((50..=64).contains(&probes), "{probes} probes in 30 s");
        // Idle for the next 120 s: one probe per path every 15 s.
        let idle = count(&mut set, t0 + IDLE_AFTER, 120);
        assert!((14..=18).contains(&idle), "{idle} probes in 120 idle s");
        assert!(set
            .status(
                t0 + IDLE_AFTER + Duration::from_secs(120),
                PeerAddr::to_string
            )
            .iter()
            .all(|p| p.state == "live"));
        // Traffic again: every path is probed now.
        let back = t0 + IDLE_AFTER + Duration::from_secs(121);
        assert!(set.traffic(back));
        assert_eq!(set.poll_probes(back, ids()).len(), both.len());
        assert!(!set.traffic(back), "busy already: nothing more is due");
    }

    #[test]
    fn transport_order_outranks_latency() {
        let t0 = Instant::now();
        let direct = udp("203.0.113.7:40000");
        let tox = PeerAddr::Tox(ToxPublicKey([3; 32]));
        let mut set = PathSet::new(vec![direct.clone(), tox.clone()], t0);
        for probe in set.poll_probes(t0, ids()) {
            let rtt = if probe.to == tox { 5 } else { 50 };
            set.pong(probe.id, &probe.to, t0 + Duration::from_millis(rtt));
        }
        set.select(t0 + Duration::from_millis(60), &ORDER);
        assert_eq!(set.in_use(), Some(&direct));
        set.select(
            t0 + Duration::from_millis(60),
            &[TransportKind::Tox, TransportKind::Udp],
        );
        assert_eq!(set.in_use(), Some(&tox));
    }

    #[test]
    fn a_punch_opens_with_one_short_ttl_probe_then_full_probes() {
        let t0 = Instant::now();
        let tox = PeerAddr::Tox(ToxPublicKey([3; 32]));
        let mut set = PathSet::new(vec![tox.clone()], t0);
        let public = udp("198.51.100.1:40000");
        let lan = udp("10.2.0.2:40000");
        let announced = [
            "198.51.100.1:40000".parse().unwrap(),
            "10.2.0.2:40000".parse().unwrap(),
        ];
        set.announced(&announced, t0, false);
        let first: Vec<_> = set
            .poll_probes(t0, ids())
            .into_iter()
            .filter(|p| p.to != tox)
            .collect();
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|p| p.short_ttl));
        // Nothing more to it until the peer's side is open...
        assert!(set
            .poll_probes(t0 + Duration::from_millis(300), ids())
            .iter()
            .all(|p| p.to == tox));
        // ...which its probe arriving shows: full probes every 100 ms.
        let heard_at = t0 + Duration::from_millis(300);
        assert!(set.heard(&public, heard_at));
        let later = set.poll_probes(heard_at, ids());
        assert!(later.iter().any(|p| p.to == public && !p.short_ttl));
        assert!(later.iter().all(|p| p.to != lan));
        assert_eq!(set.next_probe(), Some(heard_at + PUNCH_INTERVAL));
        // The endpoint never heard from ends its punch: only short-TTL
        // keepalives from then on, and no handshakes.
        let after = t0 + Duration::from_secs(6);
        let probes = set.poll_probes(after, ids());
        assert!(probes.iter().filter(|p| p.to == lan).all(|p| p.short_ttl));
        assert!(probes.iter().any(|p| p.to == public && !p.short_ttl));
        assert!(!set.handshake_targets(after).contains(&lan));
    }

    #[test]
    fn roaming_without_probes_follows_the_last_sender() {
        let t0 = Instant::now();
        let mut set = PathSet::new(vec![udp("198.18.0.1:51820")], t0);
        assert!(set.heard(&udp("198.18.0.77:40000"), t0));
        assert_eq!(set.select(t0, &ORDER), Some(&udp("198.18.0.77:40000")));
    }

    #[test]
    fn learned_paths_are_bounded_and_old_ones_forgotten() {
        let t0 = Instant::now();
        let mut set = PathSet::new(vec![], t0);
        for port in 0..100u16 {
            set.heard(&udp(&format!("198.18.0.1:{}", 1000 + port)), t0);
        }
        assert!(set.paths.len() <= MAX_LEARNED);
        set.select(t0, &ORDER);
        set.prune(t0 + FORGET_AFTER + Duration::from_secs(1));
        assert_eq!(set.paths.len(), 1, "only the path in use stays");
    }

    #[test]
    fn unknown_probe_replies_are_ignored() {
        let t0 = Instant::now();
        let mut set = PathSet::new(vec![udp("198.18.0.1:51820")], t0);
        assert!(!set.pong(12345, &udp("198.18.0.1:51820"), t0));
    }

    /// A reply names its probe, but only counts over the path the probe
    /// went: else a peer could make an endpoint it announced, which never
    /// answered, look live and pull our traffic there.
    #[test]
    fn a_reply_over_another_path_makes_nothing_live() {
        let t0 = Instant::now();
        let real = udp("198.18.0.1:51820");
        let victim = udp("203.0.113.99:80");
        let mut set = PathSet::new(vec![real.clone()], t0);
        set.announced(&["203.0.113.99:80".parse().unwrap()], t0, true);
        let probes = set.poll_probes(t0, ids());
        let to_victim = probes.iter().find(|p| p.to == victim).unwrap();
        assert!(!set.pong(to_victim.id, &real, t0));
        assert!(set
            .status(t0, PeerAddr::to_string)
            .iter()
            .all(|p| p.state != "live"));
        let to_real = probes.iter().find(|p| p.to == real).unwrap();
        assert!(set.pong(to_real.id, &real, t0));
    }

    /// Heard but unanswered: probed fast, then reported one way, which is
    /// our own evidence for renewing our presence.
    #[test]
    fn a_stock_wireguard_peer_is_never_one_way_nor_probed_fast() {
        let t0 = Instant::now();
        let udp = PeerAddr::Udp("198.18.0.9:51820".parse().unwrap());
        let mut set = PathSet::new(vec![udp.clone()], t0);
        set.traffic(t0);
        let mut ids = ids();
        let mut probes = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(60) {
            now += Duration::from_millis(250);
            set.heard(&udp, now);
            set.traffic(now);
            probes += set.poll_probes(now, &mut ids).len();
            assert_eq!(set.one_way(now), None);
        }
        assert!(
            probes <= 5,
            "{probes} probes in 60 s to a peer that never answers"
        );
        // Once it says something, unanswered probes count again.
        set.spoke();
        let mut found = false;
        while now < t0 + Duration::from_secs(120) {
            now += Duration::from_millis(250);
            set.heard(&udp, now);
            set.poll_probes(now, &mut ids);
            found |= set.one_way(now).is_some();
        }
        assert!(found);
    }

    #[test]
    fn a_path_heard_but_deaf_to_our_probes_is_one_way() {
        let t0 = Instant::now();
        let i2p = PeerAddr::I2p(veilmesh_transport::I2pAddress([5; 32]));
        let mut set = PathSet::new(vec![i2p.clone()], t0);
        let mut ids = ids();
        for p in set.poll_probes(t0, &mut ids) {
            assert!(set.pong(p.id, &p.to, t0));
        }
        let mut now = t0;
        let mut found = None;
        while now < t0 + Duration::from_secs(60) {
            now += Duration::from_millis(250);
            set.heard(&i2p, now);
            set.poll_probes(now, &mut ids);
            if let Some(kind) = set.one_way(now) {
                found = Some(now);
                assert_eq!(kind, TransportKind::I2p);
                break;
            }
        }
        let found = found.expect("never one way");
        // The first probe goes unanswered at the keepalive interval; being
        // heard then brings probes every second until the evidence is in.
        assert!(
            found - t0 <= KEEPALIVE_INTERVAL + ONE_WAY_AFTER + Duration::from_secs(2),
            "{:?}",
            found - t0
        );
        assert!(found - t0 >= KEEPALIVE_INTERVAL + ONE_WAY_AFTER);
        // Not heard any more: not one way, just silent.
        let later = now + HEARD_RECENTLY * 2;
        assert_eq!(set.one_way(later), None);
        // Heard again: probes lost while the peer was silent are no
        // evidence; it gets its chance to answer.
        set.poll_probes(later, &mut ids);
        set.heard(&i2p, later);
        assert_eq!(set.one_way(later), None);
        set.poll_probes(later + Duration::from_secs(1), &mut ids);
        assert_eq!(set.one_way(later + Duration::from_secs(1)), None);
    }
}
