//! Who sent a datagram, decided before any session state is touched: the
//! identity a transport vouches for, the transport's handshake rate limit
//! and cookies, the initiator's static key (one Diffie-Hellman, budgeted
//! under load), and session indices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{HandshakeInit, Packet, Tunn, TunnResult};
use boringtun::x25519;
use veilmesh_transport::{PeerAddr, TransportKind};

use crate::peer::{path_allowed, PeerTable};
use crate::{transport_index, DropReason, NodeCounters, PeerId, Transmit};

/// Handshake messages accepted per second and transport before the load
/// rules apply (cookies over UDP, drops elsewhere). Per transport, so a
/// flood of spoofed UDP initiations cannot block handshakes over Tox or
/// I2P.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Under load, initiations without a valid cookie are decrypted (one
/// Diffie-Hellman each) at most this often per second, to learn whether
/// the sender may get a cookie over UDP at all; the rest are dropped.
const UNDER_LOAD_IDENTIFICATIONS: u32 = 1000;

/// The gate every datagram passes before its peer's session sees it.
pub(crate) struct Gate {
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Handshake rate limits, one per transport (`transport_index`).
    limiters: [Arc<RateLimiter>; 4],
    /// Under-load identifications this second.
    identified_under_load: u32,
    /// When the rate limiters' second ends (checked on each tick).
    second_ends: Instant,
    /// Where a cookie reply is written: 64 bytes.
    cookie: [u8; 128],
}

impl Gate {
    pub(crate) fn new(private: x25519::StaticSecret, now: Instant) -> Gate {
        let public = x25519::PublicKey::from(&private);
        let limiter = || Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Gate {
            private,
            public,
            limiters: [limiter(), limiter(), limiter(), limiter()],
            identified_under_load: 0,
            second_ends: now + Duration::from_secs(1),
            cookie: [0; 128],
        }
    }

    /// On a timer tick, not a wake-up of its own: a second of 1 to 1.25 s.
    pub(crate) fn tick(&mut self, now: Instant) {
        if now < self.second_ends {
            return;
        }
        for limiter in &self.limiters {
            limiter.reset_count();
        }
        self.identified_under_load = 0;
        self.second_ends = now + Duration::from_secs(1);
    }

    /// The peer `datagram` (from `from`) belongs to, or why it is dropped
    /// (counted). Under load over UDP, a handshake gets a cookie reply
    /// queued in `transmits` instead, if its peer may use that path.
    pub(crate) fn identify(
        &mut self,
        from: &PeerAddr,
        datagram: &[u8],
        peers: &mut PeerTable,
        counters: &mut NodeCounters,
        transmits: &mut std::collections::VecDeque<Transmit>,
    ) -> Result<PeerId, DropReason> {
        let named = !matches!(from, PeerAddr::Unattributed(_));
        if named && from.kind() != TransportKind::Udp && !peers.by_identity.contains_key(from) {
            counters.unknown_sender += 1;
            tracing::trace!(%from, "datagram from an identity no peer has");
            return Err(DropReason::UnknownPeer);
        }
        let Ok(parsed) = Tunn::parse_incoming_packet(datagram) else {
            counters.bad_packet += 1;
            return Err(DropReason::BadPacket);
        };
        let handshake = matches!(
            parsed,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        );
        let cookie = if handshake {
            self.admit_handshake(from, datagram, counters)?
        } else {
            None
        };
        let id = match parsed {
            Packet::HandshakeInit(init) => {
                self.identify_initiator(from, &init, cookie.is_some(), peers, counters)?
            }
            Packet::HandshakeResponse(p) => peer_of_index(peers, p.receiver_idx, counters)?,
            Packet::PacketCookieReply(p) => peer_of_index(peers, p.receiver_idx, counters)?,
            Packet::PacketData(p) => peer_of_index(peers, p.receiver_idx, counters)?,
        };
        let Some(cookie) = cookie else {
            return Ok(id);
        };
        let Some(peer) = peers.slots[id].as_mut() else {
            return Err(DropReason::UnknownPeer);
        };
        if path_allowed(&peer.spec, from) {
            counters.cookies_sent += 1;
            transmits.push_back(Transmit::new(from.clone(), &cookie));
        } else {
            peer.counters.wrong_path += 1;
        }
        counters.rate_limited += 1;
        Err(DropReason::RateLimited)
    }

    /// A handshake's MAC and its transport's rate limit: Ok(None) to go on,
    /// Ok(Some(cookie)) when, under load over UDP, the sender must first
    /// prove its address (the cookie is for it, if it may have one).
    fn admit_handshake(
        &mut self,
        from: &PeerAddr,
        datagram: &[u8],
        counters: &mut NodeCounters,
    ) -> Result<Option<Vec<u8>>, DropReason> {
        let limiter = &self.limiters[transport_index(from.kind())];
        match limiter.verify_packet(from.ip(), datagram, &mut self.cookie) {
            Ok(_) => Ok(None),
            Err(TunnResult::WriteToNetwork(cookie)) => Ok(Some(cookie.to_vec())),
            Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                counters.rate_limited += 1;
                Err(DropReason::RateLimited)
            }
            Err(_) => {
                counters.bad_packet += 1;
                Err(DropReason::BadPacket)
            }
        }
    }

    /// A handshake initiation names its sender only inside the encrypted
    /// static key: decrypt it (one Diffie-Hellman; under load, budgeted).
    fn identify_initiator(
        &mut self,
        from: &PeerAddr,
        init: &HandshakeInit,
        under_load: bool,
        peers: &PeerTable,
        counters: &mut NodeCounters,
    ) -> Result<PeerId, DropReason> {
        if under_load {
            if self.identified_under_load >= UNDER_LOAD_IDENTIFICATIONS {
                counters.rate_limited += 1;
                return Err(DropReason::RateLimited);
            }
            self.identified_under_load += 1;
        }
        let half = parse_handshake_anon(&self.private, &self.public, init).map_err(|_| {
            counters.bad_packet += 1;
            DropReason::BadPacket
        })?;
        match peers.by_key.get(&half.peer_static_public) {
            Some(&id) => Ok(id),
            None => {
                counters.unknown_peer_handshakes += 1;
                tracing::debug!(%from, "handshake from a key not in the config");
                Err(DropReason::UnknownPeer)
            }
        }
    }
}

/// The peer a session index belongs to: one that has a session state (no
/// other can have handed the index out).
fn peer_of_index(
    peers: &PeerTable,
    receiver_idx: u32,
    counters: &mut NodeCounters,
) -> Result<PeerId, DropReason> {
    let id = (receiver_idx >> 8) as usize;
    if matches!(peers.slots.get(id), Some(Some(peer)) if peer.tunn.is_some()) {
        Ok(id)
    } else {
        counters.bad_packet += 1;
        Err(DropReason::BadPacket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;
    use crate::tests::seeded_key;
    use crate::PeerSpec;

    fn gate_and_peers(now: Instant) -> (Gate, PeerTable, PrivateKey, PrivateKey) {
        let ours = seeded_key(b"gate: ours");
        let theirs = seeded_key(b"gate: theirs");
        let mut peers = PeerTable::default();
        let spec = PeerSpec {
            name: "b".into(),
            public_key: theirs.public_key(),
            allowed_ips: vec![],
            paths: vec![],
            transports: vec![TransportKind::Udp],
            persistent_keepalive: None,
            allowed_destinations: None,
            accept: None,
            relay: false,
        };
        peers.reconfigure(vec![spec], now).unwrap();
        (Gate::new(ours.to_x25519(), now), peers, ours, theirs)
    }

    fn initiation(from: &PrivateKey, to: &PrivateKey) -> Vec<u8> {
        let public = x25519::PublicKey::from(&to.to_x25519());
        let mut tunn = Tunn::new(from.to_x25519(), public, None, None, 7, None);
        let mut buf = vec![0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            _ => unreachable!("an initiation is always written"),
        }
    }

    /// A configured key is found by its initiation; garbage, a stranger's
    /// initiation and an index nobody issued are dropped and counted.
    #[test]
    fn initiators_are_found_by_key_and_the_rest_is_counted() {
        let now = Instant::now();
        let (mut gate, mut peers, ours, theirs) = gate_and_peers(now);
        let from = PeerAddr::Udp("198.51.100.7:51820".parse().unwrap());
        let mut counters = NodeCounters::default();
        let mut transmits = std::collections::VecDeque::new();
        let mut identify = |datagram: &[u8], counters: &mut NodeCounters| {
            gate.identify(&from, datagram, &mut peers, counters, &mut transmits)
        };
        assert_eq!(identify(&initiation(&theirs, &ours), &mut counters), Ok(0));
        let stranger = seeded_key(b"gate: stranger");
        assert_eq!(
            identify(&initiation(&stranger, &ours), &mut counters),
            Err(DropReason::UnknownPeer)
        );
        assert_eq!(counters.unknown_peer_handshakes, 1);
        assert_eq!(
            identify(b"garbage", &mut counters),
            Err(DropReason::BadPacket)
        );
        let mut data = vec![0u8; 32];
        data[0] = 4;
        assert_eq!(identify(&data, &mut counters), Err(DropReason::BadPacket));
        assert_eq!(counters.bad_packet, 2);
    }

    /// Past the rate limit, a UDP initiation gets a cookie reply (its
    /// peer may use UDP) instead of a Diffie-Hellman; the next second
    /// starts on a tick, not before.
    #[test]
    fn under_load_udp_handshakes_get_cookies_until_the_second_ends() {
        let now = Instant::now();
        let (mut gate, mut peers, ours, theirs) = gate_and_peers(now);
        let from = PeerAddr::Udp("198.51.100.7:51820".parse().unwrap());
        let mut counters = NodeCounters::default();
        let mut transmits = std::collections::VecDeque::new();
        let init = initiation(&theirs, &ours);
        let mut results = Vec::new();
        for _ in 0..HANDSHAKE_RATE_LIMIT + 5 {
            results.push(gate.identify(&from, &init, &mut peers, &mut counters, &mut transmits));
        }
        assert!(results[..HANDSHAKE_RATE_LIMIT as usize]
            .iter()
            .all(|r| *r == Ok(0)));
        assert_eq!(results.last(), Some(&Err(DropReason::RateLimited)));
        assert!(counters.cookies_sent >= 1);
        assert_eq!(transmits.front().map(|t| t.to.clone()), Some(from.clone()));
        // boringtun's limiters also keep a one-second clock of their own,
        // which only the virtual-time tests move: here, a tick inside the
        // second leaves the load on.
        gate.tick(now + Duration::from_millis(500));
        assert_eq!(
            gate.identify(&from, &init, &mut peers, &mut counters, &mut transmits),
            Err(DropReason::RateLimited),
            "the second has not ended"
        );
    }
}
