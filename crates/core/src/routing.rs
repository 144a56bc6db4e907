//! Longest-prefix-match table from IP networks to values (peer ids).
//!
//! One hash map per prefix length present, probed from the longest: a
//! lookup costs one hash per distinct prefix length (typically two: the mesh
//! /128s and a few site subnets), independent of the number of peers.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::{is_mesh_address, MESH_PREFIX_LEN};

#[derive(Debug, Clone)]
struct Family<T> {
    /// (prefix length, masked network → value), longest prefix first.
    by_len: Vec<(u8, HashMap<u128, T>)>,
    bits: u8,
}

impl<T> Family<T> {
    fn new(bits: u8) -> Self {
        Family {
            by_len: Vec::new(),
            bits,
        }
    }

    fn mask(&self, addr: u128, len: u8) -> u128 {
        let host_bits = u32::from(self.bits - len);
        let full: u128 = if self.bits == 128 {
            u128::MAX
        } else {
            (1u128 << self.bits) - 1
        };
        if host_bits >= 128 {
            0
        } else {
            addr & (full & !((1u128 << host_bits) - 1))
        }
    }

    fn insert(&mut self, addr: u128, len: u8, value: T) -> Option<T> {
        let key = self.mask(addr, len);
        let slot = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(i) => i,
            Err(i) => {
                self.by_len.insert(i, (len, HashMap::new()));
                i
            }
        };
        self.by_len[slot].1.insert(key, value)
    }

    fn lookup(&self, addr: u128, shortest: u8) -> Option<&T> {
        self.by_len
            .iter()
            .take_while(|(len, _)| *len >= shortest)
            .find_map(|(len, map)| map.get(&self.mask(addr, *len)))
    }

    fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for (_, map) in &mut self.by_len {
            map.retain(|_, v| keep(v));
        }
        self.by_len.retain(|(_, map)| !map.is_empty());
    }
}

#[derive(Debug, Clone)]
pub struct RoutingTable<T> {
    v4: Family<T>,
    v6: Family<T>,
}

impl<T> Default for RoutingTable<T> {
    fn default() -> Self {
        RoutingTable {
            v4: Family::new(32),
            v6: Family::new(128),
        }
    }
}

impl<T> RoutingTable<T> {
    /// Inserts a route, returning the value it replaced for exactly this net.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert(u128::from(u32::from(n.addr())), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        self.lookup_within(addr, 0)
    }

    /// Where a packet to or from `addr` belongs: the longest prefix wins,
    /// except that a mesh address only ever matches a prefix inside the
    /// mesh /48 (its key's peer): an exit's default route never carries a
    /// mesh address, and no exit may send from one.
    pub fn route(&self, addr: IpAddr) -> Option<&T> {
        let shortest = match addr {
            IpAddr::V6(v6) if is_mesh_address(&v6) => MESH_PREFIX_LEN,
            _ => 0,
        };
        self.lookup_within(addr, shortest)
    }

    /// The longest match among routes of at least `shortest` bits: with 1,
    /// a default route (an exit node's) is not considered.
    pub fn lookup_within(&self, addr: IpAddr, shortest: u8) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a)), shortest),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a), shortest),
        }
    }

    /// Removes every route whose value fails `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.v4.retain(&mut keep);
        self.v6.retain(&mut keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_for_both_families() {
        let mut t = RoutingTable::default();
        t.insert(net("10.0.0.0/8"), "wide");
        t.insert(net("10.1.0.0/16"), "narrow");
        t.insert(net("10.1.2.3/32"), "host");
        t.insert(net("0.0.0.0/0"), "default");
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&"host"));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&"narrow"));
        assert_eq!(t.lookup(ip("10.200.0.1")), Some(&"wide"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));

        t.insert(net("fd60:db4d:ddb5::/48"), "mesh");
        t.insert(net("fd60:db4d:ddb5:1::1/128"), "peer");
        assert_eq!(t.lookup(ip("fd60:db4d:ddb5:1::1")), Some(&"peer"));
        assert_eq!(t.lookup(ip("fd60:db4d:ddb5:1::2")), Some(&"mesh"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
    }

    #[test]
    fn a_lookup_within_a_length_skips_shorter_routes() {
        let mut t = RoutingTable::default();
        t.insert(net("0.0.0.0/0"), "exit");
        t.insert(net("10.0.0.0/8"), "site");
        assert_eq!(t.lookup_within(ip("10.1.2.3"), 1), Some(&"site"));
        assert_eq!(t.lookup_within(ip("192.0.2.1"), 1), None);
        assert_eq!(t.lookup_within(ip("10.1.2.3"), 9), None);
        assert_eq!(t.lookup_within(ip("192.0.2.1"), 0), Some(&"exit"));
    }

    #[test]
    fn a_mesh_address_never_routes_to_a_default_route() {
        let mut t = RoutingTable::default();
        t.insert(net("::/0"), "exit");
        t.insert(net("fd60:db4d:ddb5:1::1/128"), "peer");
        assert_eq!(t.route(ip("fd60:db4d:ddb5:1::1")), Some(&"peer"));
        assert_eq!(t.route(ip("fd60:db4d:ddb5:1::2")), None);
        assert_eq!(t.route(ip("2001:db8::1")), Some(&"exit"));
    }

    #[test]
    fn families_do_not_mix() {
        let mut t = RoutingTable::default();
        t.insert(net("::/0"), 6);
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        t.insert(net("0.0.0.0/0"), 4);
        assert_eq!(t.lookup(ip("::ffff:10.0.0.1")), Some(&6));
    }

    #[test]
    fn retain_drops_a_peer_everywhere() {
        let mut t = RoutingTable::default();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("fd00::/8"), 2);
        t.retain(|v| *v != 2);
        assert_eq!(t.lookup(ip("10.1.0.1")), Some(&1));
        assert_eq!(t.lookup(ip("fd00::1")), None);
    }

    proptest! {
        // Against a brute-force model: the longest matching net wins.
        #[test]
        fn matches_a_linear_scan(
            nets in proptest::collection::vec((any::<u32>(), 0u8..=32), 1..20),
            probes in proptest::collection::vec(any::<u32>(), 1..50),
        ) {
            let mut t = RoutingTable::default();
            let mut model: Vec<(ipnet::Ipv4Net, usize)> = Vec::new();
            for (i, (addr, len)) in nets.iter().enumerate() {
                let n = ipnet::Ipv4Net::new((*addr).into(), *len).unwrap().trunc();
                t.insert(IpNet::V4(n), i);
                model.retain(|(m, _)| *m != n);
                model.push((n, i));
            }
            for p in probes {
                let a = std::net::Ipv4Addr::from(p);
                let expected = model
                    .iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, v)| v);
                prop_assert_eq!(t.lookup(IpAddr::V4(a)), expected);
            }
        }
    }
}
