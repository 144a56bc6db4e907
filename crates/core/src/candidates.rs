//! Our own UDP endpoints, as we announce them to peers, and which
//! endpoints a peer gives us may be probed at all.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use crate::peer_messages::MAX_CANDIDATES;
use crate::routing::RoutingTable;
use crate::PeerId;

/// Endpoints peers saw us at that we keep: NATs that map per destination
/// would otherwise grow the list without end.
const MAX_OBSERVED_SELF: usize = 4;

/// Our own UDP endpoints: interface addresses and STUN mappings (`local`),
/// and where peers saw our probes come from (`observed`).
#[derive(Debug, Default)]
pub(crate) struct OwnEndpoints {
    local: Vec<SocketAddr>,
    observed: VecDeque<SocketAddr>,
}

impl OwnEndpoints {
    /// Replaces the local endpoints; true if that changed them.
    pub(crate) fn set_local(&mut self, mut endpoints: Vec<SocketAddr>) -> bool {
        endpoints.retain(usable_endpoint);
        endpoints.dedup();
        if endpoints == self.local {
            return false;
        }
        tracing::info!(?endpoints, "local UDP endpoints");
        self.local = endpoints;
        true
    }

    /// A peer saw our probe come from `sa`, one of our NAT's mappings:
    /// true if it is new to us.
    pub(crate) fn observed(&mut self, sa: SocketAddr) -> bool {
        if !usable_endpoint(&sa) || self.is_own(&sa) {
            return false;
        }
        tracing::info!(endpoint = %sa, "a peer sees us at a new endpoint");
        if self.observed.len() == MAX_OBSERVED_SELF {
            self.observed.pop_front();
        }
        self.observed.push_back(sa);
        true
    }

    /// What we announce: local endpoints first, then observed ones.
    pub(crate) fn announced(&self) -> Vec<SocketAddr> {
        let mut all = self.local.clone();
        for sa in &self.observed {
            if !all.contains(sa) {
                all.push(*sa);
            }
        }
        all.truncate(MAX_CANDIDATES);
        all
    }

    fn is_own(&self, sa: &SocketAddr) -> bool {
        self.local.contains(sa) || self.observed.contains(sa)
    }

    /// May a peer's endpoint be probed or learned? A usable one that is
    /// not ours (a peer announcing our own endpoint would have us probe
    /// ourselves).
    pub(crate) fn usable_for_peer(&self, sa: &SocketAddr) -> bool {
        let sa = SocketAddr::new(sa.ip().to_canonical(), sa.port());
        usable_endpoint(&sa) && !self.is_own(&sa)
    }

    /// The endpoints a peer gave us (in the session or the DHT) that may be
    /// probed: usable ones, and never one our own TUN routes (a tunnel
    /// inside the tunnel). An exit's default route does not count: our own
    /// sockets carry the mark that keeps them out of it.
    pub(crate) fn usable_peer_endpoints(
        &self,
        routes: &RoutingTable<PeerId>,
        endpoints: &[SocketAddr],
    ) -> Vec<SocketAddr> {
        endpoints
            .iter()
            .map(|sa| SocketAddr::new(sa.ip().to_canonical(), sa.port()))
            .filter(|sa| self.usable_for_peer(sa) && routes.lookup_within(sa.ip(), 1).is_none())
            .collect()
    }
}

/// May an endpoint be probed, learned or announced? Never the unspecified,
/// loopback, link-local (169.254.0.0/16, fe80::/10), multicast or broadcast
/// addresses, a mesh address, nor port 0: none of them reaches a peer, and
/// a peer naming one would turn our probes on our own host or LAN.
fn usable_endpoint(sa: &SocketAddr) -> bool {
    let ip = sa.ip().to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    sa.port() != 0
        && !ip.is_unspecified()
        && !ip.is_loopback()
        && !link_local
        && !ip.is_multicast()
        && ip != IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
        && !matches!(ip, IpAddr::V6(v6) if crate::identity::is_mesh_address(&v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_that_reach_no_peer_are_unusable() {
        for bad in [
            "0.0.0.0:51820",
            "127.0.0.1:51820",
            "169.254.1.1:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "192.0.2.1:0",
            "[::1]:51820",
            "[fe80::1]:51820",
            "[::ffff:127.0.0.1]:51820",
            "[fd60:db4d:ddb5::1]:51820",
        ] {
            assert!(!usable_endpoint(&sa(bad)), "{bad}");
        }
        for good in ["192.0.2.1:51820", "[2001:db8::1]:51820", "10.0.0.1:1"] {
            assert!(usable_endpoint(&sa(good)), "{good}");
        }
    }

    #[test]
    fn local_endpoints_change_only_when_they_differ() {
        let mut own = OwnEndpoints::default();
        assert!(own.set_local(vec![sa("192.0.2.1:1"), sa("127.0.0.1:1")]));
        assert_eq!(own.announced(), [sa("192.0.2.1:1")]);
        assert!(!own.set_local(vec![sa("192.0.2.1:1"), sa("192.0.2.1:1")]));
        assert!(own.set_local(Vec::new()));
        assert!(own.announced().is_empty());
    }

    #[test]
    fn observed_endpoints_are_few_new_and_announced_after_local_ones() {
        let mut own = OwnEndpoints::default();
        own.set_local(vec![sa("192.0.2.1:1")]);
        assert!(!own.observed(sa("192.0.2.1:1")), "already ours");
        assert!(!own.observed(sa("127.0.0.1:5")), "unusable");
        for port in 10..20 {
            assert!(own.observed(sa(&format!("198.51.100.1:{port}"))));
        }
        let announced = own.announced();
        assert_eq!(announced.len(), 1 + MAX_OBSERVED_SELF);
        assert_eq!(announced[0], sa("192.0.2.1:1"));
        assert_eq!(announced[1], sa("198.51.100.1:16"), "the oldest went first");
    }

    #[test]
    fn announced_endpoints_fit_one_message() {
        let mut own = OwnEndpoints::default();
        let many = (1..=40).map(|p| sa(&format!("192.0.2.1:{p}"))).collect();
        own.set_local(many);
        assert_eq!(own.announced().len(), MAX_CANDIDATES);
    }

    #[test]
    fn a_peer_may_not_have_us_probe_ourselves_or_the_tunnel() {
        let mut own = OwnEndpoints::default();
        own.set_local(vec![sa("192.0.2.1:1")]);
        let mut routes = RoutingTable::default();
        routes.insert("10.9.0.0/16".parse().unwrap(), 0);
        let given = [
            sa("[::ffff:192.0.2.1]:1"),
            sa("10.9.1.1:51820"),
            sa("[::ffff:198.51.100.7]:51820"),
            sa("127.0.0.1:51820"),
        ];
        assert_eq!(
            own.usable_peer_endpoints(&routes, &given),
            [sa("198.51.100.7:51820")]
        );
    }
}
