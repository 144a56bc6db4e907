//! What a SAM bridge sends: reply lines on the control connection, and
//! forwarded RAW datagrams (bundles of Noise messages) on the UDP socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veilmesh_i2p::sam;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(reply) = sam::Reply::parse(&line) {
        let _ = reply.get("RESULT");
        let _ = reply.require("VALUE");
        let _ = reply.expect_ok("NAMING REPLY");
    }
    if let Ok(messages) = veilmesh_i2p::bundle::decode(data) {
        assert!(messages.iter().all(|m| !m.is_empty()));
    }
});
