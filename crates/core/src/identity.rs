//! Node identity: Curve25519 keys in WireGuard's base64 text form, and the
//! mesh address derived from a public key.

use std::fmt;
use std::net::Ipv6Addr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519;
use sha2::{Digest, Sha256};

/// The mesh prefix every veilmesh address lives in.
pub const MESH_PREFIX: [u8; 6] = [0xfd, 0x60, 0xdb, 0x4d, 0xdd, 0xb5];
pub const MESH_PREFIX_LEN: u8 = 48;
/// Domain separation for the address hash, so that the same key used by
/// another protocol never yields correlated identifiers.
pub const ADDRESS_HASH_DOMAIN: &[u8] = b"veilmesh address v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not valid base64 ({0})")]
    Base64(String),
    #[error("decodes to {0} bytes, a key is 32")]
    Length(usize),
}

fn decode_key(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(PublicKey)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// `fd60:db4d:ddb5::/48` followed by the first 80 bits of
    /// SHA-256("veilmesh address v1" || public key).
    pub fn mesh_address(&self) -> Ipv6Addr {
        let digest = Sha256::new()
            .chain_update(ADDRESS_HASH_DOMAIN)
            .chain_update(self.0)
            .finalize();
        let mut octets = [0u8; 16];
        octets[..6].copy_from_slice(&MESH_PREFIX);
        octets[6..].copy_from_slice(&digest[..10]);
        Ipv6Addr::from(octets)
    }

    pub fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A private key. Never printed by `Debug`, so it cannot leak into logs.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the OS random source, clamped as `wg genkey` does.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(PrivateKey::from_bytes(bytes))
    }

    /// The key these 32 bytes make, clamped: for tests and simulations
    /// that must be the same in every run.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        PrivateKey(bytes)
    }

    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(PrivateKey)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.to_x25519()).to_bytes())
    }

    pub fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Is this address inside the mesh prefix?
pub fn is_mesh_address(addr: &Ipv6Addr) -> bool {
    addr.octets()[..6] == MESH_PREFIX
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Pinned vectors: changing the derivation breaks every deployed mesh, so
    // these must never change. Reproduce with the shell one-liner in README.md.
    const VECTORS: &[(&str, &str)] = &[
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", VECTOR_ZERO),
        ("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=", VECTOR_NINES),
        (
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
            VECTOR_RFC7748,
        ),
    ];
    const VECTOR_ZERO: &str = "fd60:db4d:ddb5:5905:9b08:364b:f33a:423";
    const VECTOR_NINES: &str = "fd60:db4d:ddb5:7544:925a:76be:1932:7767";
    // RFC 7748 section 6.1, Alice's public key.
    const VECTOR_RFC7748: &str = "fd60:db4d:ddb5:ded5:a4e:fe1b:58bd:dc4f";

    #[test]
    fn address_derivation_vectors() {
        for (key, addr) in VECTORS {
            let pk = PublicKey::parse(key).unwrap();
            assert_eq!(pk.mesh_address().to_string(), *addr, "key {key}");
        }
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private = hex_key("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex_key("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let sk = PrivateKey(private);
        assert_eq!(sk.public_key().0, public);
    }

    fn hex_key(hex: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn bad_keys_are_rejected_with_a_reason() {
        assert!(matches!(
            PublicKey::parse("not base64!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(PublicKey::parse("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(PrivateKey::parse("").err(), Some(KeyError::Length(0)));
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a.to_base64(), b.to_base64());
        assert_eq!(a.0[0] & 7, 0);
        assert_eq!(a.0[31] & 0xc0, 0x40);
        assert_eq!(format!("{a:?}"), "PrivateKey(<redacted>)");
    }

    proptest! {
        #[test]
        fn keys_round_trip_through_base64(bytes in any::<[u8; 32]>()) {
            let pk = PublicKey(bytes);
            prop_assert_eq!(PublicKey::parse(&pk.to_base64()).unwrap(), pk);
            prop_assert!(is_mesh_address(&pk.mesh_address()));
        }

        #[test]
        fn key_parsing_never_panics(text in ".{0,80}") {
            let _ = PublicKey::parse(&text);
            let _ = PrivateKey::parse(&text);
        }
    }
}
