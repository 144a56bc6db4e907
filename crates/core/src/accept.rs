//! Per-peer accept rules: what a peer may open towards us
//! (`accept = ["icmp", "tcp/22", "udp/53", "tcp/8000-8100"]`). Stateful:
//! what we open towards the peer may always answer. Checked on decrypted
//! packets before they reach the TUN; every function takes arbitrary bytes
//! and never panics.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::{Duration, Instant};

const PROTO_ICMPV4: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// How long a flow we opened may answer after our last packet in it.
const TCP_FLOW: Duration = Duration::from_secs(2 * 3600);
const UDP_FLOW: Duration = Duration::from_secs(180);
const ECHO_FLOW: Duration = Duration::from_secs(30);
/// Flows remembered per peer at most; beyond, expired ones are purged and,
/// if none expired, new flows are not remembered (their answers refused).
const MAX_FLOWS: usize = 16_384;

/// One accept rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// ICMP and ICMPv6 echo requests (ping).
    Icmp,
    Tcp(RangeInclusive<u16>),
    Udp(RangeInclusive<u16>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("accept rule `{rule}`: {why} (rules look like \"icmp\", \"tcp/22\", \"udp/53\", \"tcp/8000-8100\")")]
pub struct RuleError {
    rule: String,
    why: &'static str,
}

impl FromStr for Rule {
    type Err = RuleError;
    fn from_str(text: &str) -> Result<Rule, RuleError> {
        let error = |why| RuleError {
            rule: text.to_owned(),
            why,
        };
        if text == "icmp" {
            return Ok(Rule::Icmp);
        }
        let (proto, ports) = text
            .split_once('/')
            .ok_or_else(|| error("neither icmp nor PROTOCOL/PORTS"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| error("a port is a number from 1 to 65535"))
        };
        let range = match ports.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                if low > high {
                    return Err(error("the range runs backwards"));
                }
                low..=high
            }
            None => {
                let p = port(ports)?;
                p..=p
            }
        };
        match proto {
            "tcp" => Ok(Rule::Tcp(range)),
            "udp" => Ok(Rule::Udp(range)),
            _ => Err(error("the protocol is tcp or udp")),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (proto, range) = match self {
            Rule::Icmp => return f.write_str("icmp"),
            Rule::Tcp(r) => ("tcp", r),
            Rule::Udp(r) => ("udp", r),
        };
        if range.start() == range.end() {
            write!(f, "{proto}/{}", range.start())
        } else {
            write!(f, "{proto}/{}-{}", range.start(), range.end())
        }
    }
}

/// What to do with a packet from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refused: answer with ICMP "administratively prohibited" so the
    /// peer's application fails at once.
    Reject,
    /// Refused without an answer (unsolicited echo replies, malformed).
    Drop,
}

/// A flow we opened: our address and port (ICMP: the echo identifier),
/// theirs, the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Flow {
    proto: u8,
    ours: (IpAddr, u16),
    theirs: (IpAddr, u16),
}

impl Flow {
    /// How long it may answer after its last packet.
    fn lifetime(&self) -> Duration {
        match self.proto {
            PROTO_TCP => TCP_FLOW,
            PROTO_UDP => UDP_FLOW,
            _ => ECHO_FLOW,
        }
    }
}

/// The rules of one peer and the flows we opened towards it.
#[derive(Debug)]
pub struct Firewall {
    rules: Vec<Rule>,
    flows: HashMap<Flow, Instant>,
}

/// What the filter looks at in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Ports, and for TCP whether it opens a connection (SYN, no ACK).
    Ports {
        proto: u8,
        src: u16,
        dst: u16,
        opens: bool,
    },
    EchoRequest {
        id: u16,
    },
    EchoReply {
        id: u16,
    },
    /// Destination unreachable, packet too big, time exceeded, parameter
    /// problem: answers to our own packets (path MTU discovery needs them).
    IcmpError,
    OtherIcmp,
    /// A fragment other than the first: no header to judge, and it cannot
    /// be reassembled without the first, which was judged.
    LaterFragment,
    Other,
}

impl Firewall {
    pub fn new(rules: Vec<Rule>) -> Firewall {
        Firewall {
            rules,
            flows: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// A packet from us to the peer: remembers the flows we open, so their
    /// answers pass.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) {
        let Some((src, dst, transport)) = inspect(packet) else {
            return;
        };
        let (flow, opens) = match transport {
            Transport::Ports {
                proto,
                src: sport,
                dst: dport,
                opens,
            } => {
                let flow = Flow {
                    proto,
                    ours: (src, sport),
                    theirs: (dst, dport),
                };
                (flow, opens || proto == PROTO_UDP)
            }
            Transport::EchoRequest { id } => {
                let flow = Flow {
                    proto: PROTO_ICMPV4,
                    ours: (src, id),
                    theirs: (dst, 0),
                };
                (flow, true)
            }
            _ => return,
        };
        if let Some(expires) = self.flows.get_mut(&flow) {
            *expires = now + flow.lifetime();
            return;
        }
        if !opens {
            return;
        }
        if self.flows.len() >= MAX_FLOWS {
            self.flows.retain(|_, expires| *expires > now);
            if self.flows.len() >= MAX_FLOWS {
                tracing::debug!("accept rules: flow table full, not remembering a new flow");
                return;
            }
        }
        self.flows.insert(flow, now + flow.lifetime());
    }

    /// A decrypted packet from the peer.
    pub fn inbound(&mut self, packet: &[u8], now: Instant) -> Verdict {
        let Some((src, dst, transport)) = inspect(packet) else {
            return Verdict::Drop;
        };
        match transport {
            Transport::Ports {
                proto,
                src: sport,
                dst: dport,
                ..
            } => {
                let allowed = self.rules.iter().any(|rule| match rule {
                    Rule::Tcp(ports) => proto == PROTO_TCP && ports.contains(&dport),
                    Rule::Udp(ports) => proto == PROTO_UDP && ports.contains(&dport),
                    Rule::Icmp => false,
                });
                let answer = Flow {
                    proto,
                    ours: (dst, dport),
                    theirs: (src, sport),
                };
                if allowed || self.answers(answer, now) {
                    Verdict::Accept
                } else {
                    Verdict::Reject
                }
            }
            Transport::EchoRequest { .. } if self.rules.contains(&Rule::Icmp) => Verdict::Accept,
            Transport::EchoRequest { .. } => Verdict::Reject,
            Transport::EchoReply { id } => {
                let answer = Flow {
                    proto: PROTO_ICMPV4,
                    ours: (dst, id),
                    theirs: (src, 0),
                };
                if self.answers(answer, now) {
                    Verdict::Accept
                } else {
                    Verdict::Drop
                }
            }
            Transport::IcmpError | Transport::LaterFragment => Verdict::Accept,
            Transport::OtherIcmp => Verdict::Drop,
            Transport::Other => Verdict::Reject,
        }
    }

    /// Is this an answer in a flow we opened (and not expired)? Answers
    /// keep the flow alive as our packets do.
    fn answers(&mut self, flow: Flow, now: Instant) -> bool {
        match self.flows.get_mut(&flow) {
            Some(expires) if *expires > now => {
                *expires = now + flow.lifetime();
                true
            }
            Some(_) => {
                self.flows.remove(&flow);
                false
            }
            None => false,
        }
    }
}

/// Source, destination and what the filter needs of the transport header.
fn inspect(packet: &[u8]) -> Option<(IpAddr, IpAddr, Transport)> {
    let info = crate::packet::parse(packet).ok()?;
    let packet = packet.get(..info.total_len)?;
    let (proto, header) = match info.src {
        IpAddr::V4(_) => {
            if info.later_fragment {
                return Some((info.src, info.dst, Transport::LaterFragment));
            }
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            (info.protocol, packet.get(header_len..)?)
        }
        IpAddr::V6(_) => match ipv6_upper_layer(packet)? {
            Upper::Header(proto, at) => (proto, packet.get(at..)?),
            Upper::LaterFragment => return Some((info.src, info.dst, Transport::LaterFragment)),
        },
    };
    let transport = match proto {
        PROTO_TCP | PROTO_UDP => {
            let ports = header.get(..4)?;
            let opens = if proto == PROTO_TCP {
                let flags = *header.get(13)?;
                flags & 0x02 != 0 && flags & 0x10 == 0
            } else {
                false
            };
            Transport::Ports {
                proto,
                src: u16::from_be_bytes([ports[0], ports[1]]),
                dst: u16::from_be_bytes([ports[2], ports[3]]),
                opens,
            }
        }
        PROTO_ICMPV4 | PROTO_ICMPV6 => {
            let icmp = header.get(..8)?;
            let id = u16::from_be_bytes([icmp[4], icmp[5]]);
            match (proto, icmp[0]) {
                (PROTO_ICMPV4, 8) | (PROTO_ICMPV6, 128) => Transport::EchoRequest { id },
                (PROTO_ICMPV4, 0) | (PROTO_ICMPV6, 129) => Transport::EchoReply { id },
                (PROTO_ICMPV4, 3 | 11 | 12) | (PROTO_ICMPV6, 1..=4) => Transport::IcmpError,
                _ => Transport::OtherIcmp,
            }
        }
        _ => Transport::Other,
    };
    Some((info.src, info.dst, transport))
}

enum Upper {
    /// The upper-layer protocol and where its header starts.
    Header(u8, usize),
    LaterFragment,
}

/// Walks IPv6 extension headers (hop-by-hop, routing, fragment,
/// destination options, AH) to the upper-layer header.
fn ipv6_upper_layer(packet: &[u8]) -> Option<Upper> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AUTH: u8 = 51;
    const DEST_OPTS: u8 = 60;
    let mut next = *packet.get(6)?;
    let mut at = 40;
    // A handful at most in real packets; a long chain is refused.
    for _ in 0..8 {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                let ext = packet.get(at..at + 2)?;
                next = ext[0];
                at += (usize::from(ext[1]) + 1) * 8;
            }
            FRAGMENT => {
                let ext = packet.get(at..at + 8)?;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Some(Upper::LaterFragment);
                }
                next = ext[0];
                at += 8;
            }
            AUTH => {
                let ext = packet.get(at..at + 2)?;
                next = ext[0];
                at += (usize::from(ext[1]) + 2) * 4;
            }
            proto => return Some(Upper::Header(proto, at)),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const US4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const PEER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const US6: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 0, 0, 0, 0, 1);
    const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 0, 0, 0, 0, 2);

    fn v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(rest.len() as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p.extend_from_slice(rest);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h
    }

    fn icmp(kind: u8, id: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0] = kind;
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h
    }

    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;

    fn rules(text: &[&str]) -> Firewall {
        Firewall::new(text.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn rules_parse_and_print() {
        for text in ["icmp", "tcp/22", "udp/53", "tcp/8000-8100", "udp/1-65535"] {
            assert_eq!(text.parse::<Rule>().unwrap().to_string(), text);
        }
        for bad in [
            "",
            "ICMP",
            "tcp",
            "tcp/",
            "tcp/0",
            "tcp/65536",
            "tcp/22-21",
            "sctp/9",
            "tcp/a",
            "tcp/1-",
            "/22",
            "tcp/22/23",
        ] {
            let error = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(error.contains(&format!("`{bad}`")), "{error}");
        }
    }

    #[test]
    fn the_peer_opens_only_what_the_rules_allow() {
        let now = Instant::now();
        let mut fw = rules(&["icmp", "tcp/8080", "udp/5000-5010"]);
        let peer_tcp = |dport| v4(PEER4, US4, PROTO_TCP, &tcp(40000, dport, SYN));
        assert_eq!(fw.inbound(&peer_tcp(8080), now), Verdict::Accept);
        assert_eq!(fw.inbound(&peer_tcp(8081), now), Verdict::Reject);
        let peer_udp = |dport| v4(PEER4, US4, PROTO_UDP, &udp(40000, dport));
        assert_eq!(fw.inbound(&peer_udp(5005), now), Verdict::Accept);
        assert_eq!(fw.inbound(&peer_udp(5011), now), Verdict::Reject);
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, PROTO_TCP, &tcp(1, 5005, SYN)), now),
            Verdict::Reject
        );
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, PROTO_ICMPV4, &icmp(8, 7)), now),
            Verdict::Accept
        );
        assert_eq!(
            fw.inbound(&v6(PEER6, US6, PROTO_ICMPV6, &icmp(128, 7)), now),
            Verdict::Accept
        );
        // Another protocol (GRE) is refused.
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, 47, &[0; 8]), now),
            Verdict::Reject
        );
        // Without "icmp", no ping.
        let mut fw = rules(&["tcp/22"]);
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, PROTO_ICMPV4, &icmp(8, 7)), now),
            Verdict::Reject
        );
        // Errors (path MTU discovery) always pass; unsolicited replies do not.
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, PROTO_ICMPV4, &icmp(3, 0)), now),
            Verdict::Accept
        );
        assert_eq!(
            fw.inbound(&v6(PEER6, US6, PROTO_ICMPV6, &icmp(2, 0)), now),
            Verdict::Accept
        );
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, PROTO_ICMPV4, &icmp(0, 7)), now),
            Verdict::Drop
        );
    }

    #[test]
    fn what_we_open_may_answer_until_it_expires() {
        let now = Instant::now();
        let mut fw = rules(&["tcp/22"]);
        let answer = v4(PEER4, US4, PROTO_TCP, &tcp(8081, 40000, SYN_ACK));
        assert_eq!(fw.inbound(&answer, now), Verdict::Reject);
        // Our SYN opens the flow; only its exact answer passes.
        fw.outbound(&v4(US4, PEER4, PROTO_TCP, &tcp(40000, 8081, SYN)), now);
        assert_eq!(fw.inbound(&answer, now), Verdict::Accept);
        let other_port = v4(PEER4, US4, PROTO_TCP, &tcp(8081, 40001, SYN_ACK));
        assert_eq!(fw.inbound(&other_port, now), Verdict::Reject);
        // A packet of ours without SYN opens nothing.
        fw.outbound(&v4(US4, PEER4, PROTO_TCP, &tcp(40002, 9000, ACK)), now);
        let answer2 = v4(PEER4, US4, PROTO_TCP, &tcp(9000, 40002, ACK));
        assert_eq!(fw.inbound(&answer2, now), Verdict::Reject);
        // UDP and ping over IPv6.
        fw.outbound(&v6(US6, PEER6, PROTO_UDP, &udp(5353, 53)), now);
        assert_eq!(
            fw.inbound(&v6(PEER6, US6, PROTO_UDP, &udp(53, 5353)), now),
            Verdict::Accept
        );
        fw.outbound(&v6(US6, PEER6, PROTO_ICMPV6, &icmp(128, 99)), now);
        assert_eq!(
            fw.inbound(&v6(PEER6, US6, PROTO_ICMPV6, &icmp(129, 99)), now),
            Verdict::Accept
        );
        assert_eq!(
            fw.inbound(&v6(PEER6, US6, PROTO_ICMPV6, &icmp(129, 98)), now),
            Verdict::Drop
        );
        // Idle past its lifetime, the UDP flow is gone; the TCP one is not.
        let later = now + UDP_FLOW + Duration::from_secs(1);
        assert_eq!(
            fw.inbound(&v6(PEER6, US6, PROTO_UDP, &udp(53, 5353)), later),
            Verdict::Reject
        );
        assert_eq!(fw.inbound(&answer, later), Verdict::Accept);
    }

    #[test]
    fn fragments_and_extension_headers() {
        let now = Instant::now();
        let mut fw = rules(&["tcp/8080"]);
        // IPv6 with a destination-options header, then TCP to 8080 / 8081.
        let with_opts = |dport| {
            let mut rest = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
            rest.extend(tcp(40000, dport, SYN));
            v6(PEER6, US6, 60, &rest)
        };
        assert_eq!(fw.inbound(&with_opts(8080), now), Verdict::Accept);
        assert_eq!(fw.inbound(&with_opts(8081), now), Verdict::Reject);
        // A later IPv6 fragment passes (the first was judged); a first one is judged.
        let fragment = |offset: u16, dport| {
            let mut rest = vec![PROTO_TCP, 0];
            rest.extend((offset << 3).to_be_bytes());
            rest.extend([0, 0, 0, 1]);
            rest.extend(tcp(40000, dport, SYN));
            v6(PEER6, US6, 44, &rest)
        };
        assert_eq!(fw.inbound(&fragment(1, 8081), now), Verdict::Accept);
        assert_eq!(fw.inbound(&fragment(0, 8081), now), Verdict::Reject);
        // An IPv4 later fragment passes.
        let mut p = v4(PEER4, US4, PROTO_TCP, &[0; 8]);
        p[6..8].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(fw.inbound(&p, now), Verdict::Accept);
        // Truncated transport headers are dropped.
        assert_eq!(
            fw.inbound(&v4(PEER4, US4, PROTO_TCP, &[0; 3]), now),
            Verdict::Drop
        );
    }

    #[test]
    fn the_flow_table_is_bounded() {
        let now = Instant::now();
        let mut fw = rules(&[]);
        for port in 0..(MAX_FLOWS + 10) {
            let sport = 1024 + (port % 60000) as u16;
            let dport = 1 + (port / 60000) as u16;
            fw.outbound(&v4(US4, PEER4, PROTO_UDP, &udp(sport, dport)), now);
        }
        assert_eq!(fw.flows.len(), MAX_FLOWS);
        // Once they expire, new flows find room again.
        let later = now + UDP_FLOW + Duration::from_secs(1);
        fw.outbound(&v4(US4, PEER4, PROTO_UDP, &udp(9, 9)), later);
        assert_eq!(fw.flows.len(), 1);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let now = Instant::now();
            let mut fw = rules(&["icmp", "tcp/1-100"]);
            fw.outbound(&bytes, now);
            let _ = fw.inbound(&bytes, now);
        }

        #[test]
        fn truncation_never_panics(cut in 0usize..80, dport in 1u16..200) {
            let now = Instant::now();
            let mut fw = rules(&["tcp/1-100"]);
            let full = v6(PEER6, US6, PROTO_TCP, &tcp(4000, dport, SYN));
            let _ = fw.inbound(&full[..cut.min(full.len())], now);
        }
    }
}
