//! Messages between two peers' cores (path probes, endpoint announcements),
//! carried inside their Noise session so they are authenticated and work
//! over every transport.
//!
//! Each message is an IPv6 packet from the sender's mesh address to the
//! receiver's, with next header 253 (RFC 3692, for experiments): boringtun
//! only carries IP packets, and the receiving core takes these out before
//! the TUN. The kernel never sends protocol 253 from an unprivileged socket,
//! and the sending core refuses it from the TUN, so only cores write them.
//!
//! Payload: `"vm"`, version 1, message type, then the body (big endian).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// IPv6 next header value of peer messages.
pub const PROTOCOL: u8 = 253;
const IPV6_HEADER: usize = 40;
const MAGIC: &[u8; 2] = b"vm";
const VERSION: u8 = 1;
/// Endpoints one announcement carries at most; more is a malformed message.
pub const MAX_CANDIDATES: usize = 16;

const PROBE: u8 = 1;
const PROBE_REPLY: u8 = 2;
const CANDIDATES: u8 = 3;
const RELAY: u8 = 5;
const RELAYED: u8 = 6;
// Type 4 asked the receiver to renew its presence on a transport. Retired:
// a peer must not be able to cause that (each renewal is an outage for
// every peer there, and a timing signal); renewals follow our own
// evidence only. It now parses as an unknown type.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// "Answer me on the path this arrived on."
    Probe { id: u64 },
    /// The answer; `observed` is the UDP endpoint the probe came from (as
    /// STUN would report it), only ever filled in on UDP paths.
    ProbeReply {
        id: u64,
        observed: Option<SocketAddr>,
    },
    /// The sender's UDP endpoints, for hole punching. `reply` asks the
    /// receiver to announce its own, so both sides punch at about the same
    /// time.
    Candidates {
        endpoints: Vec<SocketAddr>,
        reply: bool,
    },
    /// To a relay: "forward this datagram (sealed for `to`, opaque to
    /// you) to your peer `to`" (its public key).
    Relay { to: [u8; 32], datagram: Vec<u8> },
    /// From a relay: "your peer `from` sent you this datagram through me".
    Relayed { from: [u8; 32], datagram: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("truncated peer message")]
    Truncated,
    #[error("not a veilmesh peer message")]
    BadMagic,
    #[error("unsupported peer message version {0}")]
    Version(u8),
    #[error("unknown peer message type {0}")]
    UnknownType(u8),
    #[error("bad address family {0}")]
    Family(u8),
    #[error("too many candidates ({0})")]
    TooMany(usize),
    #[error("trailing bytes after the message")]
    Trailing,
}

/// Is this IP packet (as decrypted or read from the TUN) a peer message?
pub fn is_peer_message(packet: &[u8]) -> bool {
    packet.len() >= IPV6_HEADER && packet[0] >> 4 == 6 && packet[6] == PROTOCOL
}

/// Writes `message` as an IPv6 packet from `src` to `dst` into `out`
/// (cleared first).
pub fn encode_packet(message: &PeerMessage, src: Ipv6Addr, dst: Ipv6Addr, out: &mut Vec<u8>) {
    put_header(src, dst, out);
    match message {
        PeerMessage::Probe { id } => {
            out.push(PROBE);
            out.extend_from_slice(&id.to_be_bytes());
        }
        PeerMessage::ProbeReply { id, observed } => {
            out.push(PROBE_REPLY);
            out.extend_from_slice(&id.to_be_bytes());
            match observed {
                Some(sa) => put_endpoint(out, sa),
                None => out.push(0),
            }
        }
        PeerMessage::Candidates { endpoints, reply } => {
            out.push(CANDIDATES);
            out.push(u8::from(*reply));
            encode_endpoints(endpoints, out);
        }
        PeerMessage::Relay { to, datagram } => put_relay(RELAY, to, datagram, out),
        PeerMessage::Relayed { from, datagram } => put_relay(RELAYED, from, datagram, out),
    }
    set_payload_length(out);
}

/// `encode_packet` of a `Relay` message, from a borrowed datagram (the
/// data path's way: no copy into a message first).
pub fn encode_relay(
    to: &[u8; 32],
    datagram: &[u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    out: &mut Vec<u8>,
) {
    put_header(src, dst, out);
    put_relay(RELAY, to, datagram, out);
    set_payload_length(out);
}

fn put_relay(kind: u8, key: &[u8; 32], datagram: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(key);
    // A datagram fits a u16: it came in one IP packet.
    out.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    out.extend_from_slice(datagram);
}

/// The IPv6 header (its payload length set last) and the message header.
fn put_header(src: Ipv6Addr, dst: Ipv6Addr, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, PROTOCOL, 64]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
}

fn set_payload_length(out: &mut [u8]) {
    let payload_len = (out.len() - IPV6_HEADER) as u16;
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
}

/// Parses the payload of a peer message packet (after the IPv6 header).
pub fn parse_packet(packet: &[u8]) -> Result<PeerMessage, ParseError> {
    parse(packet.get(IPV6_HEADER..).ok_or(ParseError::Truncated)?)
}

/// The IPv6 source address of a packet `is_peer_message` accepted.
pub fn source(packet: &[u8]) -> Option<Ipv6Addr> {
    let bytes: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
    Some(Ipv6Addr::from(bytes))
}

fn parse(payload: &[u8]) -> Result<PeerMessage, ParseError> {
    let mut r = Reader(payload);
    if r.take(2)? != MAGIC {
        return Err(ParseError::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(ParseError::Version(version));
    }
    let message = match r.u8()? {
        PROBE => PeerMessage::Probe { id: r.u64()? },
        PROBE_REPLY => PeerMessage::ProbeReply {
            id: r.u64()?,
            observed: r.endpoint()?,
        },
        CANDIDATES => PeerMessage::Candidates {
            reply: r.u8()? != 0,
            endpoints: r.endpoints()?,
        },
        RELAY => PeerMessage::Relay {
            to: r.array()?,
            datagram: r.datagram()?,
        },
        RELAYED => PeerMessage::Relayed {
            from: r.array()?,
            datagram: r.datagram()?,
        },
        other => return Err(ParseError::UnknownType(other)),
    };
    if !r.0.is_empty() {
        return Err(ParseError::Trailing);
    }
    Ok(message)
}

/// A list of at most `MAX_CANDIDATES` endpoints (more are cut off): a
/// count, then each as family, address and port.
pub fn encode_endpoints(endpoints: &[SocketAddr], out: &mut Vec<u8>) {
    let endpoints = &endpoints[..endpoints.len().min(MAX_CANDIDATES)];
    out.push(endpoints.len() as u8);
    for sa in endpoints {
        put_endpoint(out, sa);
    }
}

/// Parses exactly one `encode_endpoints` list.
pub fn parse_endpoints(bytes: &[u8]) -> Result<Vec<SocketAddr>, ParseError> {
    let mut r = Reader(bytes);
    let endpoints = r.endpoints()?;
    if !r.0.is_empty() {
        return Err(ParseError::Trailing);
    }
    Ok(endpoints)
}

fn put_endpoint(out: &mut Vec<u8>, sa: &SocketAddr) {
    match sa.ip().to_canonical() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&sa.port().to_be_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.0.len() < n {
            return Err(ParseError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        self.take(N)?.try_into().map_err(|_| ParseError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A u16 length, then that many bytes.
    fn datagram(&mut self) -> Result<Vec<u8>, ParseError> {
        let len = u16::from_be_bytes(self.array()?);
        Ok(self.take(usize::from(len))?.to_vec())
    }

    fn endpoints(&mut self) -> Result<Vec<SocketAddr>, ParseError> {
        let count = usize::from(self.u8()?);
        if count > MAX_CANDIDATES {
            return Err(ParseError::TooMany(count));
        }
        (0..count)
            .map(|_| self.endpoint()?.ok_or(ParseError::Family(0)))
            .collect()
    }

    fn endpoint(&mut self) -> Result<Option<SocketAddr>, ParseError> {
        let ip = match self.u8()? {
            0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            family => return Err(ParseError::Family(family)),
        };
        Ok(Some(SocketAddr::new(ip, u16::from_be_bytes(self.array()?))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| {
                SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), port)
            }),
        ]
    }

    fn message() -> impl Strategy<Value = PeerMessage> {
        prop_oneof![
            any::<u64>().prop_map(|id| PeerMessage::Probe { id }),
            (any::<u64>(), proptest::option::of(endpoint()))
                .prop_map(|(id, observed)| PeerMessage::ProbeReply { id, observed }),
            (
                proptest::collection::vec(endpoint(), 0..=MAX_CANDIDATES),
                any::<bool>()
            )
                .prop_map(|(endpoints, reply)| PeerMessage::Candidates { endpoints, reply }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..200)
            )
                .prop_map(|(to, datagram)| PeerMessage::Relay { to, datagram }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..200)
            )
                .prop_map(|(from, datagram)| PeerMessage::Relayed { from, datagram }),
        ]
    }

    const SRC: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 1, 0, 0, 0, 1);
    const DST: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 2, 0, 0, 0, 2);

    proptest! {
        #[test]
        fn round_trip(m in message()) {
            let mut packet = Vec::new();
            encode_packet(&m, SRC, DST, &mut packet);
            prop_assert!(is_peer_message(&packet));
            prop_assert_eq!(source(&packet), Some(SRC));
            // A valid IPv6 header: boringtun checks the payload length.
            prop_assert_eq!(usize::from(u16::from_be_bytes([packet[4], packet[5]])), packet.len() - 40);
            prop_assert_eq!(parse_packet(&packet), Ok(m));
        }

        #[test]
        fn every_truncation_is_an_error(m in message(), cut in 0usize..400) {
            let mut packet = Vec::new();
            encode_packet(&m, SRC, DST, &mut packet);
            let cut = cut % packet.len();
            prop_assert!(parse_packet(&packet[..cut]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_packet(&bytes);
            let _ = is_peer_message(&bytes);
            let _ = source(&bytes);
        }
    }

    proptest! {
        #[test]
        fn encode_relay_is_the_relay_message(to in any::<[u8; 32]>(), datagram in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (mut borrowed, mut owned) = (Vec::new(), Vec::new());
            encode_relay(&to, &datagram, SRC, DST, &mut borrowed);
            encode_packet(&PeerMessage::Relay { to, datagram }, SRC, DST, &mut owned);
            prop_assert_eq!(borrowed, owned);
        }
    }

    #[test]
    fn trailing_bytes_and_oversized_lists_are_refused() {
        let mut packet = Vec::new();
        encode_packet(&PeerMessage::Probe { id: 7 }, SRC, DST, &mut packet);
        packet.push(0);
        assert_eq!(parse_packet(&packet), Err(ParseError::Trailing));
        let payload = [b'v', b'm', VERSION, CANDIDATES, 1, 17];
        assert_eq!(parse(&payload), Err(ParseError::TooMany(17)));
        assert_eq!(parse(b"vm\x02\x01"), Err(ParseError::Version(2)));
        assert_eq!(parse(b"vm\x01\x09"), Err(ParseError::UnknownType(9)));
        assert_eq!(parse(b"vm\x01\x04"), Err(ParseError::UnknownType(4)));
        // A relay datagram's length says more than there is.
        let mut relay = vec![b'v', b'm', VERSION, RELAY];
        relay.extend_from_slice(&[7; 32]);
        relay.extend_from_slice(&[0, 9, 1, 2]);
        assert_eq!(parse(&relay), Err(ParseError::Truncated));
    }

    #[test]
    fn ipv4_mapped_endpoints_travel_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:203.0.113.5]:40000".parse().unwrap();
        let m = PeerMessage::Candidates {
            endpoints: vec![mapped],
            reply: false,
        };
        let mut packet = Vec::new();
        encode_packet(&m, SRC, DST, &mut packet);
        assert_eq!(
            parse_packet(&packet),
            Ok(PeerMessage::Candidates {
                endpoints: vec!["203.0.113.5:40000".parse().unwrap()],
                reply: false
            })
        );
    }
}
