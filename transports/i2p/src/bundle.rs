//! The payload of a veilmesh I2P datagram: Noise messages, bundled, or a
//! receipt that paces the sender.
//!
//! i2pd's cost is per datagram (a garlic message each, gzip), not per
//! byte: carrying what is already queued for one destination in one
//! datagram multiplies what the router moves. RAW datagrams name no
//! sender, so a data datagram says who sent it (the hash of its
//! destination, where receipts go) and numbers itself within the sender's
//! flow to us; the receiver answers at most every 100 ms with a receipt of
//! how many it got, from which the sender learns the loss and sets its
//! rate (`pacer`).
//!
//! ```text
//! data:    0xB2 | flow (u64) | seq (u32) | from (32 bytes) | count (u8, >= 1)
//!               | count x (length u16 >= 1, Noise message)
//! receipt: 0xB3 | flow (u64) | highest seq seen (u32) | datagrams received (u32)
//! ```
//!
//! Integers are big-endian. The count makes a bundle cut at a record
//! boundary an error, not a shorter bundle; nothing may follow the last
//! record or a receipt. The flow is a random number the sender picks per
//! destination (a receipt is only believed for a flow the sender knows);
//! `received` counts modulo 2^32.

/// First byte of a data datagram.
pub const DATA: u8 = 0xB2;
/// First byte of a receipt.
pub const RECEIPT: u8 = 0xB3;
/// Messages one datagram carries at most.
pub const MAX_MESSAGES: usize = 255;
/// Bytes of a data datagram before its records.
pub const DATA_HEADER: usize = 1 + 8 + 4 + 32 + 1;
const RECORD_HEADER: usize = 2;
/// Bytes of a receipt.
pub const RECEIPT_LEN: usize = 1 + 8 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("empty datagram")]
    Empty,
    #[error("unknown datagram format {0:#04x}")]
    UnknownFormat(u8),
    #[error("datagram with no messages")]
    NoMessages,
    #[error("datagram cut short")]
    Truncated,
    #[error("empty message in a datagram")]
    EmptyMessage,
    #[error("bytes after the end of a datagram")]
    Trailing,
}

/// Who sent a data datagram and where it stands in the sender's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub flow: u64,
    pub seq: u32,
    /// The hash of the sender's destination (its `.b32.i2p` address).
    pub from: [u8; 32],
}

/// What a receiver got of one flow so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub flow: u64,
    pub highest: u32,
    pub received: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    Data {
        header: DataHeader,
        messages: Vec<&'a [u8]>,
    },
    Receipt(Receipt),
}

/// The bytes a data datagram with messages of these lengths takes.
pub fn bundled_len(lengths: impl IntoIterator<Item = usize>) -> usize {
    DATA_HEADER
        + lengths
            .into_iter()
            .map(|len| RECORD_HEADER + len)
            .sum::<usize>()
}

/// The bytes one more message of `len` adds to a data datagram.
pub fn record_len(len: usize) -> usize {
    RECORD_HEADER + len
}

/// Writes a data datagram into `out` (cleared first). There must be 1 to
/// `MAX_MESSAGES` messages of 1 to 65535 bytes each; callers keep to that
/// (the transport bundles Noise messages of at most a few KB).
pub fn encode_data(header: &DataHeader, messages: &[&[u8]], out: &mut Vec<u8>) {
    debug_assert!(!messages.is_empty() && messages.len() <= MAX_MESSAGES);
    out.clear();
    out.push(DATA);
    out.extend_from_slice(&header.flow.to_be_bytes());
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&header.from);
    out.push(messages.len() as u8);
    for message in messages {
        debug_assert!(!message.is_empty() && message.len() <= usize::from(u16::MAX));
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
    }
}

/// Writes a receipt into `out` (cleared first).
pub fn encode_receipt(receipt: &Receipt, out: &mut Vec<u8>) {
    out.clear();
    out.push(RECEIPT);
    out.extend_from_slice(&receipt.flow.to_be_bytes());
    out.extend_from_slice(&receipt.highest.to_be_bytes());
    out.extend_from_slice(&receipt.received.to_be_bytes());
}

/// One datagram payload, checked whole before any message is handed out:
/// a damaged datagram yields nothing.
pub fn decode(payload: &[u8]) -> Result<Payload<'_>, BundleError> {
    let (&kind, rest) = payload.split_first().ok_or(BundleError::Empty)?;
    match kind {
        DATA => decode_data(rest),
        RECEIPT => {
            let (flow, rest) = rest
                .split_first_chunk::<8>()
                .ok_or(BundleError::Truncated)?;
            let (highest, rest) = rest
                .split_first_chunk::<4>()
                .ok_or(BundleError::Truncated)?;
            let (received, rest) = rest
                .split_first_chunk::<4>()
                .ok_or(BundleError::Truncated)?;
            if !rest.is_empty() {
                return Err(BundleError::Trailing);
            }
            Ok(Payload::Receipt(Receipt {
                flow: u64::from_be_bytes(*flow),
                highest: u32::from_be_bytes(*highest),
                received: u32::from_be_bytes(*received),
            }))
        }
        other => Err(BundleError::UnknownFormat(other)),
    }
}

fn decode_data(rest: &[u8]) -> Result<Payload<'_>, BundleError> {
    let (flow, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(BundleError::Truncated)?;
    let (seq, rest) = rest
        .split_first_chunk::<4>()
        .ok_or(BundleError::Truncated)?;
    let (from, rest) = rest
        .split_first_chunk::<32>()
        .ok_or(BundleError::Truncated)?;
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
    Ok(Payload::Data {
        header: DataHeader {
            flow: u64::from_be_bytes(*flow),
            seq: u32::from_be_bytes(*seq),
            from: *from,
        },
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 1..1500)
    }

    fn header() -> impl Strategy<Value = DataHeader> {
        (any::<u64>(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(flow, seq, from)| DataHeader {
            flow,
            seq,
            from,
        })
    }

    proptest! {
        #[test]
        fn data_round_trips(header in header(), messages in proptest::collection::vec(message(), 1..12)) {
            let slices: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            encode_data(&header, &slices, &mut out);
            prop_assert_eq!(out.len(), bundled_len(slices.iter().map(|m| m.len())));
            prop_assert_eq!(decode(&out), Ok(Payload::Data { header, messages: slices }));
        }

        #[test]
        fn receipts_round_trip(flow in any::<u64>(), highest in any::<u32>(), received in any::<u32>()) {
            let receipt = Receipt { flow, highest, received };
            let mut out = Vec::new();
            encode_receipt(&receipt, &mut out);
            prop_assert_eq!(out.len(), RECEIPT_LEN);
            prop_assert_eq!(decode(&out), Ok(Payload::Receipt(receipt)));
        }

        #[test]
        fn every_truncation_is_an_error(
            header in header(),
            messages in proptest::collection::vec(message(), 1..6),
            cut in 0usize..10_000,
        ) {
            let slices: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            encode_data(&header, &slices, &mut out);
            prop_assert!(decode(&out[..cut % out.len()]).is_err());
            encode_receipt(&Receipt { flow: 1, highest: 2, received: 3 }, &mut out);
            prop_assert!(decode(&out[..cut % out.len()]).is_err());
        }

        #[test]
        fn anything_appended_is_an_error(
            header in header(),
            message in message(),
            extra in proptest::collection::vec(any::<u8>(), 1..40),
        ) {
            let mut out = Vec::new();
            encode_data(&header, &[&message], &mut out);
            out.extend_from_slice(&extra);
            prop_assert!(decode(&out).is_err());
            encode_receipt(&Receipt { flow: 1, highest: 2, received: 3 }, &mut out);
            out.extend_from_slice(&extra);
            prop_assert_eq!(decode(&out), Err(BundleError::Trailing));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            if let Ok(Payload::Data { messages, .. }) = decode(&bytes) {
                prop_assert!(messages.iter().all(|m| !m.is_empty()));
                prop_assert!(messages.iter().map(|m| m.len()).sum::<usize>() <= bytes.len());
            }
        }
    }

    #[test]
    fn malformed_datagrams_say_why() {
        let head = |count: u8| {
            let mut d = vec![DATA];
            d.extend_from_slice(&[0; 44]);
            d.push(count);
            d
        };
        assert_eq!(decode(&[]), Err(BundleError::Empty));
        assert_eq!(decode(&[0x42, 1]), Err(BundleError::UnknownFormat(0x42)));
        // Bare Noise messages (the first I2P format) are not accepted.
        assert_eq!(decode(&[4, 0, 0, 0, 7]), Err(BundleError::UnknownFormat(4)));
        assert_eq!(decode(&head(0)), Err(BundleError::NoMessages));
        assert_eq!(
            decode(&[head(1), vec![0, 0]].concat()),
            Err(BundleError::EmptyMessage)
        );
        assert_eq!(
            decode(&[head(1), vec![0, 1, 4, 9]].concat()),
            Err(BundleError::Trailing)
        );
        assert_eq!(
            decode(&[head(2), vec![0, 1, 4]].concat()),
            Err(BundleError::Truncated)
        );
        assert_eq!(decode(&[RECEIPT, 0, 0]), Err(BundleError::Truncated));
    }
}
