//! When our own presence on a transport (an I2P session, a Tox instance)
//! should be re-created: only on our own evidence that peers do not hear
//! us there, with backoff, and after a move once peers had their chance.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use veilmesh_transport::TransportKind;

use crate::transport_index;

/// After our presence on a transport moved (a failover), peers get this
/// long to get through (they notice they are not heard and renew their
/// side, ~45 s on I2P) before we suspect our own new router.
pub(crate) const MOVE_SILENCE: Duration = Duration::from_secs(90);
/// Renewals of our presence back off: the second may follow the first
/// after the minimum, each further one waits twice as long as the last,
/// up to the maximum; a quiet spell of `RENEW_FORGET` starts over.
pub(crate) const RENEW_BACKOFF_MIN: Duration = Duration::from_secs(60);
const RENEW_BACKOFF_MAX: Duration = Duration::from_secs(3600);
const RENEW_FORGET: Duration = Duration::from_secs(2 * 3600);

#[derive(Debug, Default)]
pub(crate) struct Presence {
    /// Transports whose presence we want re-created, for the daemon.
    wanted: VecDeque<TransportKind>,
    backoff: [RenewalBackoff; 3],
    /// A renewal we asked for, whose re-created presence is not a move.
    expected: Option<TransportKind>,
    /// Our presence on a transport moved at this time: if no peer gets
    /// through, our own router may hold stale routes to them (LeaseSets of
    /// tunnels that died with the old router, or that its cache kept).
    moved: Option<(TransportKind, Instant)>,
}

impl Presence {
    /// Asks for our presence on `kind` to be re-created, if the backoff
    /// allows. Each renewal costs every peer on that transport an outage
    /// and shows the peer that caused it when we renewed, so renewals
    /// back off exponentially (`RENEW_BACKOFF_MIN` doubling to
    /// `RENEW_BACKOFF_MAX`). A request still queued was admitted within
    /// the minimum, so the backoff also keeps the queue free of repeats.
    pub(crate) fn request(&mut self, kind: TransportKind, now: Instant, peer: &str, why: &str) {
        if !self.backoff[transport_index(kind)].admit(now) {
            tracing::trace!(peer, transport = %kind, why, "renewal not due yet");
            return;
        }
        // Debug: most transports have nothing to renew; those that do log it.
        tracing::debug!(peer, transport = %kind, why, "renewing our presence");
        self.expected = Some(kind);
        self.wanted.push_back(kind);
    }

    /// Our presence on `kind` was re-created. Unless we asked for it, that
    /// is a move, judged once `MOVE_SILENCE` has passed if some peer is
    /// reachable over it (a renewal of ours judged again would renew in a
    /// loop while every peer is away).
    pub(crate) fn rehomed(&mut self, kind: TransportKind, has_peers: bool, now: Instant) {
        let renewal = self.expected.take_if(|k| *k == kind).is_some();
        tracing::info!(transport = %kind, renewal, "our presence was re-created: peers contacted");
        if has_peers && !renewal {
            self.moved = Some((kind, now));
        }
    }

    /// The move whose peers had their time to get through, once: the
    /// caller renews if none did.
    pub(crate) fn move_to_judge(&mut self, now: Instant) -> Option<(TransportKind, Instant)> {
        let (kind, at) = self.moved?;
        if now < at + MOVE_SILENCE {
            return None;
        }
        self.moved = None;
        Some((kind, at))
    }

    /// When a move is due to be judged.
    pub(crate) fn next_judgement(&self) -> Option<Instant> {
        self.moved.map(|(_, at)| at + MOVE_SILENCE)
    }

    pub(crate) fn poll_renewal(&mut self) -> Option<TransportKind> {
        self.wanted.pop_front()
    }
}

/// When the next renewal of our presence on one transport may be.
#[derive(Debug, Default, Clone, Copy)]
struct RenewalBackoff {
    last: Option<Instant>,
    wait: Duration,
}

impl RenewalBackoff {
    /// True (and the renewal is counted) if one may happen now.
    fn admit(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let since = now.saturating_duration_since(last);
            if since < self.wait {
                return false;
            }
            if since >= RENEW_FORGET {
                self.wait = Duration::ZERO;
            }
        }
        self.last = Some(now);
        self.wait = (self.wait * 2).clamp(RENEW_BACKOFF_MIN, RENEW_BACKOFF_MAX);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(presence: &mut Presence) -> Vec<TransportKind> {
        std::iter::from_fn(|| presence.poll_renewal()).collect()
    }

    #[test]
    fn renewal_backoff_doubles_to_an_hour_and_forgets_after_quiet() {
        let t0 = Instant::now();
        let mut backoff = RenewalBackoff::default();
        assert!(backoff.admit(t0));
        assert!(!backoff.admit(t0 + Duration::from_secs(59)));
        let mut at = t0;
        let mut waits = Vec::new();
        for wait in [60, 120, 240, 480, 960, 1920, 3600, 3600] {
            at += Duration::from_secs(wait);
            assert!(!backoff.admit(at - Duration::from_secs(1)));
            assert!(backoff.admit(at));
            waits.push(backoff.wait.as_secs());
        }
        assert_eq!(waits, [120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert!(backoff.admit(at + RENEW_FORGET));
        assert_eq!(backoff.wait, RENEW_BACKOFF_MIN);
    }

    #[test]
    fn requests_back_off_per_transport() {
        let mut presence = Presence::default();
        let t0 = Instant::now();
        presence.request(TransportKind::I2p, t0, "a", "test");
        presence.request(TransportKind::I2p, t0, "b", "test");
        presence.request(TransportKind::Tox, t0, "c", "test");
        assert_eq!(
            drain(&mut presence),
            [TransportKind::I2p, TransportKind::Tox]
        );
        presence.request(TransportKind::I2p, t0 + RENEW_BACKOFF_MIN / 2, "a", "test");
        assert!(drain(&mut presence).is_empty());
        presence.request(TransportKind::I2p, t0 + RENEW_BACKOFF_MIN, "a", "test");
        assert_eq!(drain(&mut presence), [TransportKind::I2p]);
    }

    #[test]
    fn our_own_renewal_is_not_a_move() {
        let mut presence = Presence::default();
        let t0 = Instant::now();
        presence.request(TransportKind::I2p, t0, "a", "test");
        presence.rehomed(TransportKind::I2p, true, t0);
        assert_eq!(presence.next_judgement(), None);
        assert_eq!(presence.move_to_judge(t0 + MOVE_SILENCE), None);
    }

    #[test]
    fn a_move_is_judged_once_after_the_silence() {
        let mut presence = Presence::default();
        let t0 = Instant::now();
        presence.rehomed(TransportKind::I2p, false, t0);
        assert_eq!(presence.next_judgement(), None, "nobody to hear from");
        presence.rehomed(TransportKind::I2p, true, t0);
        assert_eq!(presence.next_judgement(), Some(t0 + MOVE_SILENCE));
        assert_eq!(presence.move_to_judge(t0 + MOVE_SILENCE / 2), None);
        let judged = presence.move_to_judge(t0 + MOVE_SILENCE);
        assert_eq!(judged, Some((TransportKind::I2p, t0)));
        assert_eq!(presence.move_to_judge(t0 + 2 * MOVE_SILENCE), None);
    }
}
