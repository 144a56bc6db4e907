//! Serverless first contact through the BitTorrent mainline DHT (BEP 44).
//!
//! For every configured peer that may use UDP, a node publishes its current
//! UDP endpoints as a mutable item that only that peer can find and read:
//! both derive, from their static-static X25519 secret, an Ed25519 key to
//! sign (and so locate) the item of each direction and a key to encrypt its
//! contents. The DHT sees unlinkable keys and ciphertext, never addresses
//! or veilmesh identities. A node reads the items of the peers it has no
//! session with and hands the endpoints to the core, which punches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use mainline::{Dht, MutableItem, SigningKey};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::core::{peer_messages, RendezvousWanted};
use crate::identity::{PrivateKey, PublicKey};
use veilmesh_transport::Health;

/// How often a node reads the items of peers it has no session with. Two
/// such nodes read each other's endpoints within this long of each other,
/// which `RENDEZVOUS_OPEN_DELAY` in the core relies on.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Items are published again this often (DHT nodes drop old items), and
/// whenever our endpoints change.
const REPUBLISH_INTERVAL: Duration = Duration::from_secs(300);
const ITEM_VERSION: u8 = 1;
pub const NONCE_LEN: usize = 12;

/// A peer's endpoints, found in the DHT.
#[derive(Debug, Clone)]
pub struct Found {
    pub peer: PublicKey,
    pub endpoints: Vec<SocketAddr>,
}

/// The keys of one direction (publisher → reader) of one peer pair.
pub struct ItemKeys {
    signing: SigningKey,
    seal: ChaCha20Poly1305,
    publisher: PublicKey,
}

impl ItemKeys {
    pub fn new(own: &PrivateKey, peer: &PublicKey, publisher: &PublicKey) -> ItemKeys {
        let shared = own.to_x25519().diffie_hellman(&peer.to_x25519());
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut h = Sha256::new();
            h.update(b"veilmesh rendezvous v1 ");
            h.update(label);
            h.update(shared.as_bytes());
            h.update(publisher.0);
            h.finalize().into()
        };
        ItemKeys {
            signing: SigningKey::from_bytes(&derive(b"sign")),
            seal: ChaCha20Poly1305::new(&derive(b"seal").into()),
            publisher: *publisher,
        }
    }

    fn seal(&self, endpoints: &[SocketAddr], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut plain = vec![ITEM_VERSION];
        peer_messages::encode_endpoints(endpoints, &mut plain);
        self.seal_bytes(&plain, nonce)
    }

    /// Seals any plaintext as an item value (the fuzzer's way past the
    /// seal to the parser behind it).
    pub fn seal_bytes(&self, plain: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let payload = Payload {
            msg: plain,
            aad: &self.publisher.0,
        };
        let mut value = nonce.to_vec();
        // Encryption with a valid key and nonce length cannot fail.
        value.extend(
            self.seal
                .encrypt(Nonce::from_slice(&nonce), payload)
                .unwrap_or_default(),
        );
        value
    }

    /// The endpoints an item value carries, if it is sealed with these
    /// keys and well formed.
    pub fn open(&self, value: &[u8]) -> Option<Vec<SocketAddr>> {
        if value.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = value.split_at(NONCE_LEN);
        let payload = Payload {
            msg: sealed,
            aad: &self.publisher.0,
        };
        let plain = self.seal.decrypt(Nonce::from_slice(nonce), payload).ok()?;
        match plain.split_first() {
            Some((&ITEM_VERSION, rest)) => peer_messages::parse_endpoints(rest).ok(),
            _ => None,
        }
    }
}

pub struct RendezvousConfig {
    pub bootstrap: Vec<String>,
    pub port: u16,
}

/// The DHT node and the task that publishes and looks up.
pub struct Rendezvous {
    pub wanted: watch::Sender<RendezvousWanted>,
    pub found: mpsc::Receiver<Found>,
    /// What `veilmesh netcheck` says of the DHT; the task updates it.
    health: watch::Receiver<Health>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rendezvous {
    /// Starts a DHT client node (its own UDP socket and thread).
    pub fn start(config: &RendezvousConfig, key: &PrivateKey) -> anyhow::Result<Rendezvous> {
        let mut builder = Dht::builder();
        if !config.bootstrap.is_empty() {
            builder.bootstrap(&config.bootstrap);
        }
        if config.port != 0 {
            builder.port(config.port);
        }
        let dht = builder
            .build()
            .context("cannot start the DHT node for [rendezvous]")?
            .as_async();
        let (wanted, wanted_rx) = watch::channel(RendezvousWanted::default());
        let (found_tx, found) = mpsc::channel(64);
        let (health_tx, health) = watch::channel(Health {
            up: false,
            facts: vec!["starting".into()],
        });
        let links = Links {
            wanted: wanted_rx,
            found: found_tx,
            health: health_tx,
        };
        let task = tokio::spawn(run(dht, key.clone(), links));
        tracing::info!(bootstrap = ?config.bootstrap, "rendezvous DHT started");
        Ok(Rendezvous {
            wanted,
            found,
            health,
            task,
        })
    }

    /// Up once the DHT node knows other nodes (it can publish and look up).
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }
}

/// The task's ends of the channels.
struct Links {
    wanted: watch::Receiver<RendezvousWanted>,
    found: mpsc::Sender<Found>,
    health: watch::Sender<Health>,
}

/// The DHT node as netcheck reports it: where it listens, how many nodes it
/// knows, what address the others see.
async fn dht_health(dht: &mainline::async_dht::AsyncDht) -> Health {
    let known = dht.to_bootstrap().await.len();
    let info = dht.info().await;
    let mut facts = vec![
        format!("DHT node on port {}", info.local_addr().port()),
        format!("{known} DHT nodes known"),
    ];
    if let Some(public) = info.public_address() {
        facts.push(format!("the DHT sees us at {public}"));
    }
    Health {
        up: known > 0,
        facts,
    }
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn run(dht: mainline::async_dht::AsyncDht, key: PrivateKey, links: Links) {
    let Links {
        mut wanted,
        found,
        health,
    } = links;
    let own = key.public_key();
    let mut published: Option<(Vec<SocketAddr>, Vec<PublicKey>, tokio::time::Instant)> = None;
    let mut last_seq = 0i64;
    // The newest item seen per peer: only newer ones are handed on.
    let mut seen: HashMap<[u8; 32], i64> = HashMap::new();
    loop {
        health.send_replace(dht_health(&dht).await);
        let current = wanted.borrow_and_update().clone();
        let stale = published.as_ref().is_none_or(|(endpoints, to, at)| {
            *endpoints != current.endpoints
                || *to != current.publish_to
                || at.elapsed() >= REPUBLISH_INTERVAL
        });
        if stale && !current.endpoints.is_empty() {
            let seq = unix_seconds().max(last_seq + 1);
            last_seq = seq;
            for peer in &current.publish_to {
                let keys = ItemKeys::new(&key, peer, &own);
                let mut nonce = [0u8; NONCE_LEN];
                if getrandom::fill(&mut nonce).is_err() {
                    continue;
                }
                let value = keys.seal(&current.endpoints, nonce);
                let item = MutableItem::new(keys.signing.clone(), &value, seq, None);
                match dht.put_mutable(item, None).await {
                    Ok(_) => {
                        tracing::debug!(peer = %peer.to_base64(), seq, "endpoints published in the DHT")
                    }
                    Err(error) => tracing::info!(%error, "publishing endpoints in the DHT failed"),
                }
            }
            published = Some((
                current.endpoints.clone(),
                current.publish_to.clone(),
                tokio::time::Instant::now(),
            ));
        }
        for peer in &current.look_up {
            let keys = ItemKeys::new(&key, peer, peer);
            let public = keys.signing.verifying_key().to_bytes();
            let Some(item) = dht.get_mutable_most_recent(&public, None).await else {
                continue;
            };
            if seen.get(&peer.0).is_some_and(|&s| s >= item.seq()) {
                continue;
            }
            seen.insert(peer.0, item.seq());
            match keys.open(item.value()) {
                Some(endpoints) => {
                    if found
                        .send(Found {
                            peer: *peer,
                            endpoints,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                None => tracing::debug!(peer = %peer.to_base64(), "unreadable DHT item"),
            }
        }
        // Wake at the next poll, or at once when the wanted set changes.
        let _ = tokio::time::timeout(POLL_INTERVAL, wanted.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_the_peer_reads_the_item_and_directions_differ() {
        let (a, b, c) = (
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
        );
        let endpoints: Vec<SocketAddr> = vec![
            "192.0.2.2:40000".parse().unwrap(),
            "10.1.0.2:40000".parse().unwrap(),
        ];
        let by_a = ItemKeys::new(&a, &b.public_key(), &a.public_key());
        let value = by_a.seal(&endpoints, [7; NONCE_LEN]);
        // b derives the same keys for a's direction.
        let at_b = ItemKeys::new(&b, &a.public_key(), &a.public_key());
        assert_eq!(at_b.signing.verifying_key(), by_a.signing.verifying_key());
        assert_eq!(at_b.open(&value), Some(endpoints));
        // The other direction is another item.
        let b_to_a = ItemKeys::new(&b, &a.public_key(), &b.public_key());
        assert_ne!(b_to_a.signing.verifying_key(), by_a.signing.verifying_key());
        assert_eq!(b_to_a.open(&value), None);
        // A third node finds nothing it can read.
        let at_c = ItemKeys::new(&c, &a.public_key(), &a.public_key());
        assert_ne!(at_c.signing.verifying_key(), by_a.signing.verifying_key());
        assert_eq!(at_c.open(&value), None);
        // No address in the clear.
        assert!(!value.windows(4).any(|w| w == [192, 0, 2, 2]));
    }

    proptest! {
        #[test]
        fn garbage_items_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (a, b) = (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap());
            let keys = ItemKeys::new(&b, &a.public_key(), &a.public_key());
            prop_assert_eq!(keys.open(&bytes), None);
        }
    }
}
