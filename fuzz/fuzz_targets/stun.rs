//! STUN messages as the UDP transport meets them on its socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veilmesh_udp::stun;

fuzz_target!(|data: &[u8]| {
    if !stun::is_stun(data) {
        return;
    }
    if let Ok(stun::Message::BindingRequest(id)) = stun::parse(data) {
        // The answer to a request must parse back to what it says.
        let from = "198.51.100.7:40000".parse().unwrap();
        let answer = stun::binding_success(&id, from);
        assert_eq!(
            stun::parse(&answer),
            Ok(stun::Message::BindingSuccess(id, Some(from)))
        );
    }
});
