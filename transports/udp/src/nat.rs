//! What the UDP transport learns about its NAT: a STUN client (sans-IO,
//! time passed in) that asks every configured server for our mapping, and
//! classifies the NAT from the answers.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::stun::{self, TransactionId};

/// How often the mapping is asked for again. This is how a rebound NAT
/// mapping is noticed, and the new one announced to peers: 15 s bounds
/// that, at two small requests per interval.
pub const REFRESH: Duration = Duration::from_secs(15);
/// RFC 8489's initial retransmission timeout, doubled per retry.
const FIRST_RTO: Duration = Duration::from_millis(500);
const ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatType {
    /// No STUN server configured, or none answered.
    Unknown,
    /// The mapped endpoint is one of our own: a public address.
    None,
    /// Every server sees the same mapping: punching works.
    EndpointIndependent,
    /// Servers see different mappings ("symmetric"): only peers with an
    /// open (full-cone or public) endpoint reach us directly.
    EndpointDependent,
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatType::Unknown => "unknown",
            NatType::None => "none (public address)",
            NatType::EndpointIndependent => "endpoint-independent mapping (cone)",
            NatType::EndpointDependent => "endpoint-dependent mapping (symmetric)",
        })
    }
}

/// One request retransmitted as RFC 8489 says (one transaction id, the
/// timeout doubling), given up after `ATTEMPTS`, and asked again after
/// `REFRESH`.
#[derive(Debug, Clone)]
struct Retransmit {
    pending: Option<TransactionId>,
    attempts: u32,
    next: Instant,
}

enum Due {
    NotYet,
    Send(TransactionId),
    GaveUp,
}

impl Retransmit {
    fn new(now: Instant) -> Retransmit {
        Retransmit {
            pending: None,
            attempts: 0,
            next: now,
        }
    }

    fn poll(&mut self, now: Instant, new_id: impl FnOnce() -> TransactionId) -> Due {
        if self.next > now {
            return Due::NotYet;
        }
        if self.pending.is_some() && self.attempts >= ATTEMPTS {
            self.answered(now);
            return Due::GaveUp;
        }
        let id = *self.pending.get_or_insert_with(new_id);
        self.next = now + FIRST_RTO * 2u32.pow(self.attempts);
        self.attempts += 1;
        Due::Send(id)
    }

    /// Answered (or given up): the next round starts after `REFRESH`.
    fn answered(&mut self, now: Instant) {
        self.pending = None;
        self.attempts = 0;
        self.next = now + REFRESH;
    }
}

#[derive(Debug, Clone)]
struct Server {
    address: SocketAddr,
    request: Retransmit,
    mapped: Option<SocketAddr>,
}

/// Whether our NAT sends a datagram to its own public mapping back to us
/// ("hairpinning"): then two peers behind it can reach each other at their
/// public endpoints too. Tested by sending a binding request to our own
/// mapped endpoint and watching for it to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hairpin {
    /// No mapping known yet, or the test is under way.
    Unknown,
    /// The mapped endpoint is one of our own addresses: no NAT to test.
    NotNeeded,
    Works,
    Fails,
}

impl fmt::Display for Hairpin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hairpin::Unknown => "not known yet",
            Hairpin::NotNeeded => "not needed (public address)",
            Hairpin::Works => "works (our public endpoint reaches us)",
            Hairpin::Fails => "fails (peers behind the same NAT need their LAN endpoints)",
        })
    }
}

#[derive(Debug, Clone)]
struct HairpinTest {
    /// The mapping last tested, and the result for it.
    target: Option<SocketAddr>,
    result: Hairpin,
    request: Retransmit,
}

#[derive(Debug, Clone)]
pub struct StunClient {
    servers: Vec<Server>,
    hairpin: HairpinTest,
}

impl StunClient {
    pub fn new(servers: &[SocketAddr], now: Instant) -> StunClient {
        StunClient {
            servers: servers
                .iter()
                .map(|&address| Server {
                    address,
                    request: Retransmit::new(now),
                    mapped: None,
                })
                .collect(),
            hairpin: HairpinTest {
                target: None,
                result: Hairpin::Unknown,
                request: Retransmit::new(now),
            },
        }
    }

    /// The hairpin test's request, when one is due: to our own public
    /// endpoint, once per mapping (and again every `REFRESH` while it
    /// fails), never when the mapping is one of our `local` endpoints.
    pub fn poll_hairpin(
        &mut self,
        now: Instant,
        local: &[SocketAddr],
        new_id: impl FnOnce() -> TransactionId,
    ) -> Option<(SocketAddr, [u8; 20])> {
        let test = &mut self.hairpin;
        let Some(mapped) = self.servers.iter().find_map(|s| s.mapped) else {
            test.target = None;
            test.result = Hairpin::Unknown;
            return None;
        };
        if local.contains(&mapped) {
            test.target = Some(mapped);
            test.result = Hairpin::NotNeeded;
            return None;
        }
        if test.target != Some(mapped) {
            *test = HairpinTest {
                target: Some(mapped),
                result: Hairpin::Unknown,
                request: Retransmit::new(now),
            };
        }
        if test.result == Hairpin::Works {
            return None;
        }
        match test.request.poll(now, new_id) {
            Due::NotYet => None,
            Due::GaveUp => {
                test.result = Hairpin::Fails;
                None
            }
            Due::Send(id) => Some((mapped, stun::binding_request(&id))),
        }
    }

    /// A binding request arrived from `from`: true if it is our own hairpin
    /// test coming back (not to be answered).
    pub fn hairpin_arrived(&mut self, from: SocketAddr, id: TransactionId) -> bool {
        let test = &mut self.hairpin;
        if test.request.pending != Some(id) || test.target != Some(from) {
            return false;
        }
        test.request.pending = None;
        if test.result != Hairpin::Works {
            tracing::info!(endpoint = %from, "NAT hairpinning works");
        }
        test.result = Hairpin::Works;
        true
    }

    pub fn hairpin(&self) -> Hairpin {
        self.hairpin.result
    }

    /// Requests due now: (server, datagram). `new_id` makes transaction ids.
    pub fn poll_transmits(
        &mut self,
        now: Instant,
        mut new_id: impl FnMut() -> TransactionId,
    ) -> Vec<(SocketAddr, [u8; 20])> {
        let mut out = Vec::new();
        for server in &mut self.servers {
            match server.request.poll(now, &mut new_id) {
                Due::NotYet => {}
                // No answer this round: the old mapping is no longer known.
                Due::GaveUp => {
                    if server.mapped.take().is_some() {
                        tracing::info!(server = %server.address, "STUN server stopped answering");
                    }
                }
                Due::Send(id) => out.push((server.address, stun::binding_request(&id))),
            }
        }
        out
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let test = &self.hairpin;
        let hairpin = matches!(test.result, Hairpin::Unknown | Hairpin::Fails)
            .then_some(test.request.next)
            .filter(|_| test.target.is_some());
        self.servers
            .iter()
            .map(|s| s.request.next)
            .chain(hairpin)
            .min()
    }

    /// A binding response from `from`; false if it answers nothing we asked.
    pub fn handle_response(
        &mut self,
        from: SocketAddr,
        id: TransactionId,
        mapped: Option<SocketAddr>,
        now: Instant,
    ) -> bool {
        let Some(server) = self
            .servers
            .iter_mut()
            .find(|s| s.address == from && s.request.pending == Some(id))
        else {
            return false;
        };
        server.request.answered(now);
        let mapped = mapped.map(|sa| SocketAddr::new(sa.ip().to_canonical(), sa.port()));
        if server.mapped != mapped {
            tracing::info!(server = %from, mapped = ?mapped, "STUN mapping");
        }
        server.mapped = mapped;
        true
    }

    /// Each server and the endpoint it last saw us at, if it answered.
    pub fn mappings(&self) -> Vec<(SocketAddr, Option<SocketAddr>)> {
        self.servers.iter().map(|s| (s.address, s.mapped)).collect()
    }

    pub fn has_servers(&self) -> bool {
        !self.servers.is_empty()
    }

    /// Our public endpoint, as the first answering server sees it.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.servers.iter().find_map(|s| s.mapped)
    }

    /// What the answers say about our NAT; `local` are our own endpoints.
    pub fn nat_type(&self, local: &[SocketAddr]) -> NatType {
        let mapped: Vec<SocketAddr> = self.servers.iter().filter_map(|s| s.mapped).collect();
        match mapped.first() {
            None => NatType::Unknown,
            Some(first) if local.contains(first) => NatType::None,
            Some(first) if mapped.iter().any(|m| m != first) => NatType::EndpointDependent,
            Some(_) if mapped.len() >= 2 => NatType::EndpointIndependent,
            // One answer cannot tell the mapping behaviour.
            Some(_) => NatType::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut() -> TransactionId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_servers_tell_cone_from_symmetric() {
        let t0 = Instant::now();
        let servers = [sa("203.0.113.10:3478"), sa("203.0.113.11:3478")];
        let mut client = StunClient::new(&servers, t0);
        let mut make = ids();
        let requests = client.poll_transmits(t0, &mut make);
        assert_eq!(requests.len(), 2);
        let id = |i: usize| -> TransactionId { requests[i].1[8..20].try_into().unwrap() };
        assert!(client.handle_response(servers[0], id(0), Some(sa("198.51.100.1:40000")), t0));
        assert_eq!(client.nat_type(&[]), NatType::Unknown, "one answer");
        assert!(client.handle_response(servers[1], id(1), Some(sa("198.51.100.1:40000")), t0));
        assert_eq!(client.nat_type(&[]), NatType::EndpointIndependent);
        assert_eq!(client.public_endpoint(), Some(sa("198.51.100.1:40000")));
        assert_eq!(client.nat_type(&[sa("198.51.100.1:40000")]), NatType::None);
        // Next round: the second server sees another port.
        let later = t0 + REFRESH;
        let requests = client.poll_transmits(later, &mut make);
        let id = |i: usize| -> TransactionId { requests[i].1[8..20].try_into().unwrap() };
        client.handle_response(servers[0], id(0), Some(sa("198.51.100.1:40000")), later);
        client.handle_response(servers[1], id(1), Some(sa("198.51.100.1:61234")), later);
        assert_eq!(client.nat_type(&[]), NatType::EndpointDependent);
    }

    #[test]
    fn hairpinning_is_tested_against_our_own_mapping() {
        let t0 = Instant::now();
        let server = sa("203.0.113.10:3478");
        let mut client = StunClient::new(&[server], t0);
        let mut make = ids();
        assert_eq!(
            client.poll_hairpin(t0, &[], &mut make),
            None,
            "no mapping yet"
        );
        let first = client.poll_transmits(t0, &mut make);
        let id: TransactionId = first[0].1[8..20].try_into().unwrap();
        let mapped = sa("198.51.100.1:40000");
        client.handle_response(server, id, Some(mapped), t0);
        // A public address needs no test.
        assert_eq!(client.poll_hairpin(t0, &[mapped], &mut make), None);
        assert_eq!(client.hairpin(), Hairpin::NotNeeded);
        // Behind a NAT: a request to our own mapping, and it comes back.
        let (to, request) = client.poll_hairpin(t0, &[], &mut make).unwrap();
        assert_eq!(to, mapped);
        let hairpin_id: TransactionId = request[8..20].try_into().unwrap();
        assert!(
            !client.hairpin_arrived(sa("198.51.100.9:1"), hairpin_id),
            "from elsewhere"
        );
        assert!(client.hairpin_arrived(mapped, hairpin_id));
        assert_eq!(client.hairpin(), Hairpin::Works);
        assert_eq!(
            client.poll_hairpin(t0 + REFRESH, &[], &mut make),
            None,
            "tested once"
        );

        // A new mapping is tested again; no answer in four tries: fails.
        let mut client = StunClient::new(&[server], t0);
        let first = client.poll_transmits(t0, &mut make);
        let id: TransactionId = first[0].1[8..20].try_into().unwrap();
        client.handle_response(server, id, Some(mapped), t0);
        let mut now = t0;
        let mut sent = 0;
        while client.hairpin() == Hairpin::Unknown && now < t0 + REFRESH {
            sent += usize::from(client.poll_hairpin(now, &[], &mut make).is_some());
            now += Duration::from_millis(100);
        }
        assert_eq!(
            (sent, client.hairpin()),
            (ATTEMPTS as usize, Hairpin::Fails)
        );
    }

    #[test]
    fn retries_back_off_then_forget_the_mapping() {
        let t0 = Instant::now();
        let server = sa("203.0.113.10:3478");
        let mut client = StunClient::new(&[server], t0);
        let mut make = ids();
        let first = client.poll_transmits(t0, &mut make);
        let id: TransactionId = first[0].1[8..20].try_into().unwrap();
        client.handle_response(server, id, Some(sa("198.51.100.1:1")), t0);
        let mut now = t0 + REFRESH;
        let mut sent = Vec::new();
        for _ in 0..200 {
            sent.extend(
                client
                    .poll_transmits(now, &mut make)
                    .into_iter()
                    .map(|_| now),
            );
            now += Duration::from_millis(100);
            if client.public_endpoint().is_none() {
                break;
            }
        }
        assert_eq!(sent.len(), ATTEMPTS as usize);
        // All retransmissions carry one transaction id, spaced 0.5, 1, 2 s.
        let gaps: Vec<u128> = sent.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert_eq!(gaps, [500, 1000, 2000]);
        assert_eq!(client.public_endpoint(), None);
        // Responses from elsewhere or to unknown ids count for nothing.
        assert!(!client.handle_response(sa("203.0.113.99:3478"), id, None, now));
    }
}
