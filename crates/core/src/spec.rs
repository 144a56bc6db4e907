//! What the core knows of a peer: its own input type, built by the daemon
//! from the config file (or by a test), so the core depends on no config
//! types and on no transport implementation.

use ipnet::{IpNet, Ipv6Net};
use veilmesh_transport::{PeerAddr, TransportKind};

use crate::identity::PublicKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// For logs and `show`.
    pub name: String,
    pub public_key: PublicKey,
    /// Subnets routed through this peer, besides its mesh /128.
    pub allowed_ips: Vec<IpNet>,
    /// Where the peer is known to be: a static UDP endpoint, its Tox key,
    /// its I2P destination (at most one of each kind is used). A path of a
    /// transport not in `transports` is never used.
    pub paths: Vec<PeerAddr>,
    /// The transports the peer may be reached over, in order of
    /// preference. Nothing is ever sent to it, or accepted from it, over
    /// another.
    pub transports: Vec<TransportKind>,
    pub persistent_keepalive: Option<u16>,
    /// Our addresses the peer may send to besides our mesh address, and
    /// may get answers from. None: anywhere, unless the peer is anonymous
    /// (then our mesh address only).
    pub allowed_destinations: Option<Vec<IpNet>>,
    /// What the peer may open towards us (see `accept`). None: anything.
    pub accept: Option<Vec<crate::accept::Rule>>,
    /// We may reach other peers through this one (it relays for us).
    pub relay: bool,
}

impl PeerSpec {
    /// Everything this peer may use as a source address: its mesh /128 and
    /// its configured subnets.
    pub fn all_allowed_ips(&self) -> impl Iterator<Item = IpNet> + '_ {
        all_allowed_ips(&self.public_key, &self.allowed_ips)
    }

    pub fn allows(&self, kind: TransportKind) -> bool {
        self.transports.contains(&kind)
    }

    /// Its path over `kind`, if it has one and may use that transport.
    pub fn path(&self, kind: TransportKind) -> Option<&PeerAddr> {
        self.allows(kind)
            .then(|| self.paths.iter().find(|p| p.kind() == kind))
            .flatten()
    }

    pub fn is_anonymous(&self) -> bool {
        is_anonymous(&self.transports)
    }
}

/// A peer's mesh /128, then the subnets routed through it.
pub fn all_allowed_ips<'a>(
    key: &PublicKey,
    subnets: &'a [IpNet],
) -> impl Iterator<Item = IpNet> + 'a {
    let mesh = IpNet::V6(Ipv6Net::from(key.mesh_address()));
    std::iter::once(mesh).chain(subnets.iter().copied())
}

/// A peer that may not use UDP must never learn our IP address: it gets
/// no UDP answer, no endpoint, no Tox friendship, and reaches our mesh
/// address only (plus `allowed_destinations`).
pub fn is_anonymous(transports: &[TransportKind]) -> bool {
    !transports.contains(&TransportKind::Udp)
}
