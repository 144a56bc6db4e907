//! I2P destinations and their private keys, in I2P's base64 alphabet.

use std::fmt;
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use sha2::{Digest, Sha256};
use veilmesh_transport::I2pAddress;

/// Standard base64 with `-` and `~` in place of `+` and `/`, padded.
pub static I2P_BASE64: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols
        .push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-~");
    spec.padding = Some('=');
    spec.encoding().expect("a valid base64 specification")
});

/// Public key (256) + signing key (128) + certificate type (1) + length (2).
const FIXED_PART: usize = 387;
/// Certificates in destinations are small (a key certificate is 4 bytes plus
/// any excess key material); anything larger is garbage.
const MAX_CERTIFICATE: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("not I2P base64")]
    Base64,
    #[error("{0} bytes is too short for an I2P destination")]
    Truncated(usize),
    #[error("certificate length {0} is implausible")]
    Certificate(usize),
    #[error("private key blob of {0} bytes is shorter than its destination")]
    NoPrivateKey(usize),
}

/// A public I2P destination: what peers send to.
#[derive(Clone, PartialEq, Eq)]
pub struct Destination {
    bytes: Vec<u8>,
}

impl Destination {
    /// Reads a destination from the start of `bytes`; returns it and how many
    /// bytes it took (private key blobs continue after it).
    pub fn from_prefix(bytes: &[u8]) -> Result<(Destination, usize), DestinationError> {
        let header = bytes
            .get(..FIXED_PART)
            .ok_or(DestinationError::Truncated(bytes.len()))?;
        let cert_len = u16::from_be_bytes([header[385], header[386]]) as usize;
        if cert_len > MAX_CERTIFICATE {
            return Err(DestinationError::Certificate(cert_len));
        }
        let total = FIXED_PART + cert_len;
        let all = bytes
            .get(..total)
            .ok_or(DestinationError::Truncated(bytes.len()))?;
        Ok((
            Destination {
                bytes: all.to_vec(),
            },
            total,
        ))
    }

    /// A whole base64 text that is exactly one destination.
    pub fn from_base64(text: &str) -> Result<Destination, DestinationError> {
        let bytes = I2P_BASE64
            .decode(text.trim().as_bytes())
            .map_err(|_| DestinationError::Base64)?;
        let (dest, used) = Destination::from_prefix(&bytes)?;
        if used != bytes.len() {
            return Err(DestinationError::Truncated(bytes.len()));
        }
        Ok(dest)
    }

    pub fn to_base64(&self) -> String {
        I2P_BASE64.encode(&self.bytes)
    }

    /// The hash that names it (its `.b32.i2p` address).
    pub fn address(&self) -> I2pAddress {
        I2pAddress(Sha256::digest(&self.bytes).into())
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Destination({})", self.address())
    }
}

/// This node's destination with its private keys, in the form SAM takes
/// (`DESTINATION=` of SESSION CREATE). Never printed.
#[derive(Clone)]
pub struct PrivateKeys {
    base64: String,
    public: Destination,
}

impl PrivateKeys {
    pub fn from_base64(text: &str) -> Result<PrivateKeys, DestinationError> {
        let text = text.trim();
        let bytes = I2P_BASE64
            .decode(text.as_bytes())
            .map_err(|_| DestinationError::Base64)?;
        let (public, used) = Destination::from_prefix(&bytes)?;
        if used >= bytes.len() {
            return Err(DestinationError::NoPrivateKey(bytes.len()));
        }
        Ok(PrivateKeys {
            base64: text.to_owned(),
            public,
        })
    }

    pub fn base64(&self) -> &str {
        &self.base64
    }

    pub fn public(&self) -> &Destination {
        &self.public
    }
}

impl fmt::Debug for PrivateKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKeys({}, secret)", self.public.address())
    }
}

/// A peer's I2P address as configured: `<52 chars>.b32.i2p`, or its full
/// base64 destination (reduced to its hash: the transport looks the full
/// destination up anyway, so both forms behave the same).
pub fn parse_peer_address(text: &str) -> Result<I2pAddress, String> {
    let text = text.trim();
    if text.ends_with(".i2p") {
        return I2pAddress::from_b32(text).ok_or_else(|| {
            format!("`{text}` is not a .b32.i2p address (52 base32 characters, then .b32.i2p)")
        });
    }
    Destination::from_base64(text)
        .map(|d| d.address())
        .map_err(|e| format!("neither a .b32.i2p address nor a base64 destination: {e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A structurally valid destination: Ed25519 key certificate.
    pub fn sample_destination(fill: u8) -> Vec<u8> {
        let mut bytes = vec![fill; 384];
        bytes.extend_from_slice(&[5, 0, 4, 0, 7, 0, 0]);
        bytes
    }

    #[test]
    fn destination_round_trips_and_hashes_like_i2p() {
        let bytes = sample_destination(9);
        let text = I2P_BASE64.encode(&bytes);
        let dest = Destination::from_base64(&text).unwrap();
        assert_eq!(dest.to_base64(), text);
        assert_eq!(dest.address().0, <[u8; 32]>::from(Sha256::digest(&bytes)));
        assert_eq!(parse_peer_address(&text), Ok(dest.address()));
        assert_eq!(
            parse_peer_address(&dest.address().to_string()),
            Ok(dest.address())
        );
    }

    #[test]
    fn i2p_alphabet_uses_dash_and_tilde() {
        assert_eq!(I2P_BASE64.encode(&[0xfb, 0xff]), "-~8=");
    }

    #[test]
    fn private_keys_carry_their_destination_and_hide_the_secret() {
        let mut blob = sample_destination(3);
        blob.extend_from_slice(&[0x55; 256 + 32]);
        let keys = PrivateKeys::from_base64(&I2P_BASE64.encode(&blob)).unwrap();
        assert_eq!(keys.public().address(), {
            let (d, _) = Destination::from_prefix(&blob).unwrap();
            d.address()
        });
        assert!(!format!("{keys:?}").contains(&keys.base64()[..20]));
        // A bare destination has no private part.
        let public_only = I2P_BASE64.encode(&sample_destination(3));
        assert!(matches!(
            PrivateKeys::from_base64(&public_only),
            Err(DestinationError::NoPrivateKey(_))
        ));
    }

    #[test]
    fn bad_peer_addresses_say_why() {
        assert!(parse_peer_address("abc.b32.i2p")
            .unwrap_err()
            .contains("b32"));
        assert!(parse_peer_address("AAAA").unwrap_err().contains("short"));
        assert!(parse_peer_address("!!!").unwrap_err().contains("base64"));
    }

    proptest! {
        #[test]
        fn destination_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Ok((dest, used)) = Destination::from_prefix(&bytes) {
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(Destination::from_base64(&dest.to_base64()), Ok(dest));
            }
            let _ = PrivateKeys::from_base64(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn truncated_destinations_are_refused(cut in 0usize..391) {
            let bytes = sample_destination(1);
            prop_assert!(Destination::from_base64(&I2P_BASE64.encode(&bytes[..cut])).is_err());
        }
    }
}
