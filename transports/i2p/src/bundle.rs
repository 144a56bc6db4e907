//! Several Noise messages in one I2P datagram.
//!
//! i2pd's cost is per datagram (a garlic message each, gzip, and for
//! DATAGRAM style a signature), not per byte: carrying what is already
//! queued for one destination in one datagram multiplies what the router
//! moves. A datagram's payload is either one bare Noise message (its first
//! byte is a WireGuard message type, 1 to 4) or a bundle:
//!
//! ```text
//! 0xB1 (bundle, version 1) | count (u8, >= 1) | count x (length u16 BE >= 1, message)
//! ```
//!
//! The count makes a bundle cut at a record boundary an error, not a
//! shorter bundle. Nothing may follow the last record.

/// First byte of a version 1 bundle: never a WireGuard message type.
pub const BUNDLE_V1: u8 = 0xB1;
/// Messages one bundle carries at most.
pub const MAX_MESSAGES: usize = 255;
const HEADER: usize = 2;
const RECORD_HEADER: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("empty datagram")]
    Empty,
    #[error("unknown datagram format {0:#04x}")]
    UnknownFormat(u8),
    #[error("bundle with no messages")]
    NoMessages,
    #[error("bundle cut short")]
    Truncated,
    #[error("empty message in a bundle")]
    EmptyMessage,
    #[error("bytes after the last message of a bundle")]
    Trailing,
}

/// The bytes a bundle of messages with these lengths takes.
pub fn bundled_len(lengths: impl IntoIterator<Item = usize>) -> usize {
    HEADER
        + lengths
            .into_iter()
            .map(|len| RECORD_HEADER + len)
            .sum::<usize>()
}

/// Writes `messages` as one datagram payload into `out` (cleared first):
/// bare if there is one, else a bundle. Each message must be 1 to 65535
/// bytes and there may be at most `MAX_MESSAGES`; callers keep to that
/// (the transport bundles Noise messages, at most a few KB each).
pub fn encode(messages: &[&[u8]], out: &mut Vec<u8>) {
    out.clear();
    debug_assert!(!messages.is_empty() && messages.len() <= MAX_MESSAGES);
    if let [single] = messages {
        out.extend_from_slice(single);
        return;
    }
    out.push(BUNDLE_V1);
    out.push(messages.len() as u8);
    for message in messages {
        debug_assert!(!message.is_empty() && message.len() <= usize::from(u16::MAX));
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
    }
}

/// The Noise messages in one datagram payload, checked whole before any is
/// handed out: a damaged bundle yields nothing.
pub fn decode(payload: &[u8]) -> Result<Vec<&[u8]>, BundleError> {
    let (&first, rest) = payload.split_first().ok_or(BundleError::Empty)?;
    match first {
        1..=4 => return Ok(vec![payload]),
        BUNDLE_V1 => {}
        other => return Err(BundleError::UnknownFormat(other)),
    }
    let (&count, mut rest) = rest.split_first().ok_or(BundleError::Truncated)?;
    if count == 0 {
        return Err(BundleError::NoMessages);
    }
    let mut messages = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (len, tail) = rest
            .split_first_chunk::<RECORD_HEADER>()
            .ok_or(BundleError::Truncated)?;
        let len = usize::from(u16::from_be_bytes(*len));
        if len == 0 {
            return Err(BundleError::EmptyMessage);
        }
        if tail.len() < len {
            return Err(BundleError::Truncated);
        }
        let (message, tail) = tail.split_at(len);
        messages.push(message);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(BundleError::Trailing);
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Noise-like messages: a type byte 1-4, then anything.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        (1u8..=4, proptest::collection::vec(any::<u8>(), 0..1500)).prop_map(|(kind, mut body)| {
            body.insert(0, kind);
            body
        })
    }

    proptest! {
        #[test]
        fn round_trip(messages in proptest::collection::vec(message(), 1..12)) {
            let slices: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            encode(&slices, &mut out);
            prop_assert_eq!(out.len(), if slices.len() == 1 {
                slices[0].len()
            } else {
                bundled_len(slices.iter().map(|m| m.len()))
            });
            prop_assert_eq!(decode(&out), Ok(slices));
        }

        #[test]
        fn every_truncation_of_a_bundle_is_an_error(
            messages in proptest::collection::vec(message(), 2..6),
            cut in 0usize..10_000,
        ) {
            let slices: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            encode(&slices, &mut out);
            let cut = cut % out.len();
            prop_assert!(decode(&out[..cut]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            if let Ok(messages) = decode(&bytes) {
                prop_assert!(messages.iter().all(|m| !m.is_empty()));
                prop_assert!(messages.iter().map(|m| m.len()).sum::<usize>() <= bytes.len());
            }
        }
    }

    #[test]
    fn malformed_bundles_say_why() {
        assert_eq!(decode(&[]), Err(BundleError::Empty));
        assert_eq!(decode(&[0x42, 1]), Err(BundleError::UnknownFormat(0x42)));
        assert_eq!(decode(&[BUNDLE_V1, 0]), Err(BundleError::NoMessages));
        assert_eq!(
            decode(&[BUNDLE_V1, 1, 0, 0]),
            Err(BundleError::EmptyMessage)
        );
        assert_eq!(
            decode(&[BUNDLE_V1, 1, 0, 1, 4, 9]),
            Err(BundleError::Trailing)
        );
        assert_eq!(
            decode(&[BUNDLE_V1, 2, 0, 1, 4]),
            Err(BundleError::Truncated)
        );
        // A bare Noise message passes through whole.
        assert_eq!(decode(&[4, 0, 0, 0, 7]), Ok(vec![&[4, 0, 0, 0, 7][..]]));
    }
}
