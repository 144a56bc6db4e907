//! Invite tokens. The input is the token's JSON: the harness adds the
//! checksum, so the JSON parser and the checks behind it are reached, and
//! a decoded invite is joined into a config.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::path::Path;
use veilmesh::invite::{add_peer, Invite};

const CONFIG: &str = "[interface]\nprivate_key = \"YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=\"\n[i2p]\nenabled = true\n";

fuzz_target!(|data: &[u8]| {
    let mut body = data.to_vec();
    body.extend_from_slice(&Sha256::digest(data)[..4]);
    let token = format!("veilmesh1-{}", URL_SAFE_NO_PAD.encode(&body));
    if let Ok(invite) = Invite::decode(&token) {
        // A decoded invite encodes to a token that decodes to it again.
        assert_eq!(Invite::decode(&invite.encode()).as_ref(), Ok(&invite));
        let _ = add_peer(CONFIG, Path::new("/fuzz/veil0.toml"), &invite, &invite.name);
    }
    let _ = Invite::decode(&String::from_utf8_lossy(data));
});
