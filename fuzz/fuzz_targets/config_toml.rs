//! Config files. Run in a network namespace of its own (scripts/fuzz.sh):
//! endpoint host names are resolved. Inputs naming files to read are
//! skipped, so the fuzzer reads nothing from the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use veilmesh::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("_file") {
        return;
    }
    if let Ok(config) = Config::parse(text, Path::new("/fuzz/veil0.toml")) {
        for kind in veilmesh_transport::TransportKind::ALL {
            let _ = config.contacts(kind);
        }
        let _ = config.peer_subnets().count();
        for peer in &config.peers {
            let _ = peer.is_anonymous();
        }
    }
});
