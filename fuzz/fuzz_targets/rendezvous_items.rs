//! DHT rendezvous items. The input is the plaintext: the harness seals it
//! with a peer pair's keys, so the parser behind the seal is reached; the
//! raw input is also opened as a value as found in the DHT.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use veilmesh::identity::PrivateKey;
use veilmesh::rendezvous::{ItemKeys, NONCE_LEN};

static KEYS: LazyLock<ItemKeys> = LazyLock::new(|| {
    let own = PrivateKey::parse("YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=").unwrap();
    let peer = PrivateKey::parse("IDFyBYNPm6nH/SX3pN8nkWeMj7anzZ4N0xZN2UpIOHY=")
        .unwrap()
        .public_key();
    ItemKeys::new(&own, &peer, &peer)
});

fuzz_target!(|data: &[u8]| {
    let sealed = KEYS.seal_bytes(data, [7; NONCE_LEN]);
    let _ = KEYS.open(&sealed);
    let _ = KEYS.open(data);
});
