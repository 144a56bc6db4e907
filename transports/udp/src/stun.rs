//! STUN (RFC 8489) binding requests and responses, the only part of STUN
//! veilmesh speaks: it asks servers (and peers) for its public mapping, and
//! answers binding requests on its own port so any node with a public
//! address serves as a reflector for the others.
//!
//! STUN shares the socket with WireGuard messages. They never collide: a
//! WireGuard message starts with its type (1–4) and three zero bytes, a
//! STUN message with a zero byte (request) or a type whose second byte is
//! not zero (responses), followed by the magic cookie.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

pub type TransactionId = [u8; 12];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    BindingRequest(TransactionId),
    /// A success response with the mapped address, if it carried one.
    BindingSuccess(TransactionId, Option<SocketAddr>),
    BindingError(TransactionId),
}

/// Cheap check on the receive path: is this datagram STUN (and so not
/// for the core)?
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER
        && matches!(
            u16::from_be_bytes([datagram[0], datagram[1]]),
            BINDING_REQUEST | BINDING_SUCCESS | BINDING_ERROR
        )
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
}

pub fn binding_request(id: &TransactionId) -> [u8; HEADER] {
    let mut out = [0u8; HEADER];
    out[..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..].copy_from_slice(id);
    out
}

/// A success response telling the requester where it came from.
pub fn binding_success(id: &TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let ip = mapped.ip().to_canonical();
    let (family, addr_len) = match ip {
        IpAddr::V4(_) => (1u8, 4usize),
        IpAddr::V6(_) => (2u8, 16usize),
    };
    let attr_len = 4 + addr_len;
    let mut out = Vec::with_capacity(HEADER + 4 + attr_len);
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.push(0);
    out.push(family);
    out.extend_from_slice(&(mapped.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    let key = xor_key(id);
    match ip {
        IpAddr::V4(v4) => out.extend(v4.octets().iter().zip(&key).map(|(a, k)| a ^ k)),
        IpAddr::V6(v6) => out.extend(v6.octets().iter().zip(&key).map(|(a, k)| a ^ k)),
    }
    out
}

/// Magic cookie followed by the transaction id: what addresses are XORed with.
fn xor_key(id: &TransactionId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(id);
    key
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a STUN binding message")]
    NotStun,
    #[error("STUN message length does not match the datagram")]
    Length,
    #[error("truncated STUN attribute")]
    Attribute,
}

pub fn parse(datagram: &[u8]) -> Result<Message, ParseError> {
    if !is_stun(datagram) {
        return Err(ParseError::NotStun);
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if length % 4 != 0 || HEADER + length != datagram.len() {
        return Err(ParseError::Length);
    }
    let mut id = [0u8; 12];
    id.copy_from_slice(&datagram[8..HEADER]);
    match u16::from_be_bytes([datagram[0], datagram[1]]) {
        BINDING_REQUEST => return Ok(Message::BindingRequest(id)),
        BINDING_ERROR => return Ok(Message::BindingError(id)),
        _ => {}
    }
    let mut attrs = &datagram[HEADER..];
    let mut plain = None;
    while !attrs.is_empty() {
        if attrs.len() < 4 {
            return Err(ParseError::Attribute);
        }
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let padded = len.div_ceil(4) * 4;
        let value = attrs.get(4..4 + len).ok_or(ParseError::Attribute)?;
        match kind {
            XOR_MAPPED_ADDRESS => {
                let sa = address(value, Some(&xor_key(&id))).ok_or(ParseError::Attribute)?;
                return Ok(Message::BindingSuccess(id, Some(sa)));
            }
            MAPPED_ADDRESS => plain = Some(address(value, None).ok_or(ParseError::Attribute)?),
            _ => {}
        }
        attrs = attrs.get(4 + padded..).unwrap_or_default();
    }
    Ok(Message::BindingSuccess(id, plain))
}

fn address(value: &[u8], xor: Option<&[u8; 16]>) -> Option<SocketAddr> {
    let unxor = |bytes: &[u8], i: usize| bytes[i] ^ xor.map_or(0, |k| k[i]);
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?])
        ^ xor.map_or(0, |_| (MAGIC_COOKIE >> 16) as u16);
    let raw = value.get(4..)?;
    let ip = match (value.get(1)?, raw.len()) {
        (1, 4) => IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| {
            unxor(raw, i)
        }))),
        (2, 16) => IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| {
            unxor(raw, i)
        }))),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), port)),
        ]
    }

    proptest! {
        #[test]
        fn responses_round_trip(id in any::<[u8; 12]>(), mapped in endpoint()) {
            let response = binding_success(&id, mapped);
            prop_assert!(is_stun(&response));
            prop_assert_eq!(parse(&response), Ok(Message::BindingSuccess(id, Some(mapped))));
        }

        #[test]
        fn requests_round_trip(id in any::<[u8; 12]>()) {
            prop_assert_eq!(parse(&binding_request(&id)), Ok(Message::BindingRequest(id)));
        }

        #[test]
        fn truncated_responses_are_errors(id in any::<[u8; 12]>(), mapped in endpoint(), cut in 0usize..64) {
            let response = binding_success(&id, mapped);
            let cut = cut % response.len();
            prop_assert!(parse(&response[..cut]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn wireguard_messages_are_never_stun(kind in 1u8..=4, rest in proptest::collection::vec(any::<u8>(), 28..200)) {
            let mut datagram = vec![kind, 0, 0, 0];
            datagram.extend(rest);
            prop_assert!(!is_stun(&datagram));
        }
    }

    /// RFC 5769 section 2.2: a sample IPv4 response (XOR-MAPPED-ADDRESS
    /// 192.0.2.1:32853, among SOFTWARE, MESSAGE-INTEGRITY, FINGERPRINT).
    #[test]
    fn parses_the_rfc5769_ipv4_response() {
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae\
                   8022000b7465737420766563746f7220\
                   002000080001a147e112a643\
                   000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
                   80280004c07d4c96";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        match parse(&bytes) {
            Ok(Message::BindingSuccess(_, Some(sa))) => {
                assert_eq!(sa, "192.0.2.1:32853".parse().unwrap())
            }
            other => panic!("{other:?}"),
        }
    }
}
