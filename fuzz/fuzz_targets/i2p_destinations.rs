//! I2P destinations and private keys, binary and base64, and the peer
//! addresses of a config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veilmesh_i2p::{parse_peer_address, Destination, PrivateKeys};

fuzz_target!(|data: &[u8]| {
    if let Ok((dest, used)) = Destination::from_prefix(data) {
        assert!(used <= data.len());
        let text = dest.to_base64();
        assert_eq!(
            Destination::from_base64(&text).map(|d| d.address()),
            Ok(dest.address())
        );
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(keys) = PrivateKeys::from_base64(&text) {
        let _ = keys.public().address();
    }
    let _ = parse_peer_address(&text);
    let _ = veilmesh_transport::I2pAddress::from_b32(&text);
});
