//! Request lines on the control socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veilmesh::control::parse_request;

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(&String::from_utf8_lossy(data));
});
