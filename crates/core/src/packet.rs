//! Just enough IP parsing to route, and the ICMP errors veilmesh sends back
//! on the TUN. Every function takes arbitrary bytes and never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const IPV4_HEADER_MIN: usize = 20;
const IPV6_HEADER: usize = 40;
const ICMP_HEADER: usize = 8;
const PROTO_ICMPV4: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// RFC 4443: an ICMPv6 error must fit the minimum MTU.
const ICMPV6_ERROR_MAX: usize = 1280;
/// RFC 1812 4.3.2.3: ICMPv4 errors should not exceed 576 bytes.
const ICMPV4_ERROR_MAX: usize = 576;
const DEFAULT_TTL: u8 = 64;

/// What the data path needs to know about an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Length from the header; may be shorter than the buffer (padding).
    pub total_len: usize,
    /// IPv4 "don't fragment"; always true for IPv6 (routers never fragment it).
    pub dont_fragment: bool,
    /// Transport protocol / next header directly after the fixed header.
    pub protocol: u8,
    /// IPv4 fragment other than the first one.
    pub later_fragment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    Version(u8),
    #[error("truncated: {have} bytes, header says {need}")]
    Truncated { have: usize, need: usize },
    #[error("IPv4 header length {0} is below 20")]
    BadHeaderLength(usize),
    #[error("IPv4 total length {total} is below the header length {header}")]
    TotalBelowHeader { total: usize, header: usize },
}

pub fn parse(packet: &[u8]) -> Result<IpInfo, PacketError> {
    let first = *packet.first().ok_or(PacketError::Empty)?;
    match first >> 4 {
        4 => parse_v4(packet),
        6 => parse_v6(packet),
        v => Err(PacketError::Version(v)),
    }
}

fn need(packet: &[u8], len: usize) -> Result<(), PacketError> {
    if packet.len() < len {
        Err(PacketError::Truncated {
            have: packet.len(),
            need: len,
        })
    } else {
        Ok(())
    }
}

fn octets<const N: usize>(packet: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&packet[at..at + N]);
    out
}

fn parse_v4(packet: &[u8]) -> Result<IpInfo, PacketError> {
    need(packet, IPV4_HEADER_MIN)?;
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER_MIN {
        return Err(PacketError::BadHeaderLength(header_len));
    }
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total_len < header_len {
        // The core cuts the packet to `total_len`: it must keep the header.
        return Err(PacketError::TotalBelowHeader {
            total: total_len,
            header: header_len,
        });
    }
    need(packet, total_len)?;
    let flags_offset = u16::from_be_bytes([packet[6], packet[7]]);
    Ok(IpInfo {
        src: IpAddr::V4(Ipv4Addr::from(octets::<4>(packet, 12))),
        dst: IpAddr::V4(Ipv4Addr::from(octets::<4>(packet, 16))),
        total_len,
        dont_fragment: flags_offset & 0x4000 != 0,
        protocol: packet[9],
        later_fragment: flags_offset & 0x1fff != 0,
    })
}

fn parse_v6(packet: &[u8]) -> Result<IpInfo, PacketError> {
    need(packet, IPV6_HEADER)?;
    let total_len = IPV6_HEADER + usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    need(packet, total_len)?;
    Ok(IpInfo {
        src: IpAddr::V6(Ipv6Addr::from(octets::<16>(packet, 8))),
        dst: IpAddr::V6(Ipv6Addr::from(octets::<16>(packet, 24))),
        total_len,
        dont_fragment: true,
        protocol: packet[6],
        later_fragment: false,
    })
}

/// Multicast and broadcast: the kernel's router solicitations, MLD reports,
/// mDNS and the like. veilmesh routes unicast only.
pub fn is_multicast_or_broadcast(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast(),
    }
}

/// RFC 1122 / RFC 4443: never answer an error with an error, nor a packet
/// whose source cannot be answered.
fn may_answer_with_error(original: &[u8], info: &IpInfo) -> bool {
    if info.later_fragment || is_multicast_or_broadcast(&info.dst) || info.src.is_unspecified() {
        return false;
    }
    if is_multicast_or_broadcast(&info.src) {
        return false;
    }
    match info.src {
        IpAddr::V4(_) if info.protocol == PROTO_ICMPV4 => {
            let header_len = usize::from(original[0] & 0x0f) * 4;
            // Only echo request/reply and other queries may be answered.
            matches!(
                original.get(header_len),
                Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18)
            )
        }
        IpAddr::V6(_) if info.protocol == PROTO_ICMPV6 => {
            // ICMPv6 types below 128 are errors.
            matches!(original.get(IPV6_HEADER), Some(t) if *t >= 128)
        }
        _ => true,
    }
}

/// Why a packet cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No peer owns the destination.
    NoRoute,
    /// The peer exists but there is no path to it right now.
    NoPath,
}

/// Builds an ICMP "destination unreachable" answering `original` into `out`.
/// ICMPv4 errors come from the original destination: Linux drops, as a
/// martian, an IPv4 packet arriving with one of its own addresses as source,
/// so an error "from" the TUN's address would never reach the sender.
/// ICMPv6 errors come from `local_v6`. Returns the length written, or None
/// where the rules forbid an answer.
pub fn destination_unreachable(
    original: &[u8],
    info: &IpInfo,
    why: Unreachable,
    local_v6: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    match info.src {
        IpAddr::V4(_) => {
            // Type 3; code 0 = net unreachable, 1 = host unreachable.
            let code = match why {
                Unreachable::NoRoute => 0,
                Unreachable::NoPath => 1,
            };
            icmpv4_error(original, info, 3, code, 0, out)
        }
        IpAddr::V6(_) => {
            // Type 1; code 0 = no route, 3 = address unreachable.
            let code = match why {
                Unreachable::NoRoute => 0,
                Unreachable::NoPath => 3,
            };
            icmpv6_error(original, info, 1, code, 0, local_v6, out)
        }
    }
}

/// ICMP "communication administratively prohibited" (v4: type 3 code 13;
/// v6: type 1 code 1) answering `original`.
pub fn administratively_prohibited(
    original: &[u8],
    info: &IpInfo,
    local_v6: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    match info.src {
        IpAddr::V4(_) => icmpv4_error(original, info, 3, 13, 0, out),
        IpAddr::V6(_) => icmpv6_error(original, info, 1, 1, 0, local_v6, out),
    }
}

/// ICMPv6 "packet too big" or ICMPv4 "fragmentation needed" carrying `mtu`.
pub fn packet_too_big(
    original: &[u8],
    info: &IpInfo,
    mtu: usize,
    local_v6: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    let mtu = u32::try_from(mtu).unwrap_or(u32::MAX);
    match info.src {
        IpAddr::V4(_) => {
            let mtu16 = u16::try_from(mtu).unwrap_or(u16::MAX);
            icmpv4_error(original, info, 3, 4, u32::from(mtu16), out)
        }
        IpAddr::V6(_) => icmpv6_error(original, info, 2, 0, mtu, local_v6, out),
    }
}

fn icmpv4_error(
    original: &[u8],
    info: &IpInfo,
    icmp_type: u8,
    code: u8,
    rest_of_header: u32,
    out: &mut [u8],
) -> Option<usize> {
    let (IpAddr::V4(orig_src), IpAddr::V4(orig_dst)) = (info.src, info.dst) else {
        return None;
    };
    if !may_answer_with_error(original, info) {
        return None;
    }
    let quoted = original
        .len()
        .min(info.total_len)
        .min(ICMPV4_ERROR_MAX - IPV4_HEADER_MIN - ICMP_HEADER);
    let total = IPV4_HEADER_MIN + ICMP_HEADER + quoted;
    let out = out.get_mut(..total)?;
    let src = orig_dst;
    out[0] = 0x45;
    out[1] = 0xc0; // DSCP CS6: network control
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[4..8].copy_from_slice(&[0, 0, 0, 0]);
    out[8] = DEFAULT_TTL;
    out[9] = PROTO_ICMPV4;
    out[10..12].copy_from_slice(&[0, 0]);
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&orig_src.octets());
    let ip_sum = checksum(&[&out[..IPV4_HEADER_MIN]]);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let icmp = &mut out[IPV4_HEADER_MIN..];
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&rest_of_header.to_be_bytes());
    icmp[ICMP_HEADER..].copy_from_slice(&original[..quoted]);
    let sum = checksum(&[icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

fn icmpv6_error(
    original: &[u8],
    info: &IpInfo,
    icmp_type: u8,
    code: u8,
    rest_of_header: u32,
    local: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    let IpAddr::V6(orig_src) = info.src else {
        return None;
    };
    if !may_answer_with_error(original, info) {
        return None;
    }
    let quoted = original
        .len()
        .min(info.total_len)
        .min(ICMPV6_ERROR_MAX - IPV6_HEADER - ICMP_HEADER);
    let payload_len = ICMP_HEADER + quoted;
    let total = IPV6_HEADER + payload_len;
    let out = out.get_mut(..total)?;
    out[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    out[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    out[6] = PROTO_ICMPV6;
    out[7] = DEFAULT_TTL;
    out[8..24].copy_from_slice(&local.octets());
    out[24..40].copy_from_slice(&orig_src.octets());
    let (header, icmp) = out.split_at_mut(IPV6_HEADER);
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&rest_of_header.to_be_bytes());
    icmp[ICMP_HEADER..].copy_from_slice(&original[..quoted]);
    let pseudo_len = (payload_len as u32).to_be_bytes();
    let pseudo_tail = [0, 0, 0, PROTO_ICMPV6];
    let sum = checksum(&[&header[8..40], &pseudo_len, &pseudo_tail, icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

/// RFC 1071 Internet checksum over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        let mut bytes = *part;
        if let Some(hi) = odd.take() {
            if let Some((&lo, rest)) = bytes.split_first() {
                sum += u64::from(u16::from_be_bytes([hi, lo]));
                bytes = rest;
            } else {
                odd = Some(hi);
                continue;
            }
        }
        let mut pairs = bytes.chunks_exact(2);
        for pair in &mut pairs {
            sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = pairs.remainder() {
            odd = Some(*last);
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn ipv6_echo(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER + ICMP_HEADER + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((ICMP_HEADER + payload) as u16).to_be_bytes());
        p[6] = PROTO_ICMPV6;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40] = 128; // echo request
        p
    }

    pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: usize, df: bool) -> Vec<u8> {
        let total = IPV4_HEADER_MIN + 8 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let sum = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    const A6: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 1, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 2, 0, 0, 0, 2);

    #[test]
    fn parses_ipv6_and_ipv4() {
        let p = ipv6_echo(A6, B6, 10);
        let info = parse(&p).unwrap();
        assert_eq!(info.src, IpAddr::V6(A6));
        assert_eq!(info.dst, IpAddr::V6(B6));
        assert_eq!(info.total_len, p.len());
        let p = ipv4_udp(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            5,
            true,
        );
        let info = parse(&p).unwrap();
        assert!(info.dont_fragment);
        assert_eq!(info.dst, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
    }

    #[test]
    fn rejects_bad_packets_with_reasons() {
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(parse(&[0x50; 40]), Err(PacketError::Version(5)));
        let p = ipv6_echo(A6, B6, 10);
        assert!(matches!(
            parse(&p[..30]),
            Err(PacketError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&p[..p.len() - 1]),
            Err(PacketError::Truncated { .. })
        ));
        let mut v4 = ipv4_udp(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 0, false);
        v4[0] = 0x44;
        assert_eq!(parse(&v4), Err(PacketError::BadHeaderLength(16)));
    }

    #[test]
    fn ipv4_total_length_below_the_header_is_rejected() {
        // ICMP to an unrouted address with total length 0: once cut to its
        // total length, nothing of the header would be left to answer.
        let p = [
            0x45, 0, 0, 0, 0, 0, 0, 0, 0x40, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        assert_eq!(
            parse(&p),
            Err(PacketError::TotalBelowHeader {
                total: 0,
                header: 20
            })
        );
        let mut q = ipv4_udp(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 8, false);
        q[0] = 0x46; // 24-byte header, total length 36: fine
        assert!(parse(&q).is_ok());
        q[2..4].copy_from_slice(&22u16.to_be_bytes());
        assert!(matches!(
            parse(&q),
            Err(PacketError::TotalBelowHeader { .. })
        ));
    }

    #[test]
    fn icmpv6_unreachable_is_well_formed() {
        let p = ipv6_echo(A6, B6, 100);
        let info = parse(&p).unwrap();
        let mut out = [0u8; 2000];
        let n = destination_unreachable(&p, &info, Unreachable::NoRoute, A6, &mut out).unwrap();
        let reply = parse(&out[..n]).unwrap();
        assert_eq!(reply.dst, IpAddr::V6(A6));
        assert_eq!(reply.protocol, PROTO_ICMPV6);
        assert_eq!(out[40], 1);
        assert_eq!(&out[48..48 + p.len()], &p[..]);
        // Verifying a correct checksum yields zero.
        let payload_len = ((n - 40) as u32).to_be_bytes();
        assert_eq!(
            checksum(&[&out[8..40], &payload_len, &[0, 0, 0, 58], &out[40..n]]),
            0
        );
    }

    #[test]
    fn icmpv4_frag_needed_carries_mtu_and_valid_checksums() {
        let p = ipv4_udp(
            Ipv4Addr::new(10, 10, 1, 1),
            Ipv4Addr::new(192, 168, 50, 2),
            1400,
            true,
        );
        let info = parse(&p).unwrap();
        let mut out = [0u8; 2000];
        let n = packet_too_big(&p, &info, 1340, A6, &mut out).unwrap();
        // From the original destination, never from the sender's own address.
        assert_eq!(&out[12..16], &[192, 168, 50, 2]);
        assert_eq!(&out[16..20], &[10, 10, 1, 1]);
        assert!(n <= ICMPV4_ERROR_MAX);
        assert_eq!(checksum(&[&out[..20]]), 0);
        assert_eq!(checksum(&[&out[20..n]]), 0);
        assert_eq!((out[20], out[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 1340);
    }

    #[test]
    fn errors_are_never_answered_with_errors() {
        let p = ipv6_echo(A6, B6, 8);
        let info = parse(&p).unwrap();
        let mut out = [0u8; 2000];
        let n = destination_unreachable(&p, &info, Unreachable::NoRoute, B6, &mut out).unwrap();
        let err = out[..n].to_vec();
        let err_info = parse(&err).unwrap();
        assert_eq!(
            destination_unreachable(&err, &err_info, Unreachable::NoRoute, A6, &mut out),
            None
        );
        let mut mcast = ipv6_echo(A6, "ff02::2".parse().unwrap(), 8);
        mcast[40] = 133; // router solicitation
        let info = parse(&mcast).unwrap();
        assert!(is_multicast_or_broadcast(&info.dst));
        assert_eq!(
            destination_unreachable(&mcast, &info, Unreachable::NoRoute, A6, &mut out),
            None
        );
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2, complemented.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Splitting at odd offsets must not change the result.
        assert_eq!(checksum(&[&data[..3], &data[3..5], &data[5..]]), !0xddf2);
    }

    proptest! {
        #[test]
        fn parsing_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(info) = parse(&bytes) {
                prop_assert!(info.total_len <= bytes.len());
                // The builders see what the core hands them: the packet cut
                // to its total length.
                let packet = &bytes[..info.total_len];
                let mut out = [0u8; 1500];
                let _ = destination_unreachable(packet, &info, Unreachable::NoPath, A6, &mut out);
                let _ = packet_too_big(packet, &info, 1280, A6, &mut out);
            }
        }

        #[test]
        fn every_truncation_of_a_valid_packet_is_rejected(cut in 0usize..148) {
            let p = ipv6_echo(A6, B6, 100);
            prop_assert!(parse(&p[..cut]).is_err());
            let q = ipv4_udp(Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8), 120, false);
            prop_assert!(parse(&q[..cut]).is_err());
        }

        #[test]
        fn icmp_errors_round_trip_through_the_parser(payload in 0usize..3000, v4 in any::<bool>()) {
            let p = if v4 {
                ipv4_udp(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), payload, true)
            } else {
                ipv6_echo(A6, B6, payload)
            };
            let info = parse(&p).unwrap();
            let mut out = [0u8; 1500];
            let n = packet_too_big(&p, &info, 1280, A6, &mut out).unwrap();
            let reply = parse(&out[..n]).unwrap();
            prop_assert_eq!(reply.dst, info.src);
            prop_assert_eq!(reply.total_len, n);
        }
    }
}
