//! IP parsing and the ICMP error builders, fed what the core feeds them:
//! the packet cut to its header's total length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::Ipv6Addr;
use veilmesh::core::packet::{self, Unreachable};

const LOCAL: Ipv6Addr = Ipv6Addr::new(0xfd60, 0xdb4d, 0xddb5, 1, 0, 0, 0, 1);

fuzz_target!(|data: &[u8]| {
    let Ok(info) = packet::parse(data) else {
        return;
    };
    assert!(info.total_len <= data.len());
    let cut = &data[..info.total_len];
    let mut out = vec![0u8; 2048];
    for why in [Unreachable::NoRoute, Unreachable::NoPath] {
        if let Some(n) = packet::destination_unreachable(cut, &info, why, LOCAL, &mut out) {
            // What we build must parse, and answer the original sender.
            let reply = packet::parse(&out[..n]).expect("our ICMP error parses");
            assert_eq!(reply.dst, info.src);
        }
    }
    for mtu in [0, 1280, 65_535, usize::MAX] {
        if let Some(n) = packet::packet_too_big(cut, &info, mtu, LOCAL, &mut out) {
            assert!(packet::parse(&out[..n]).is_ok());
        }
    }
    let _ = packet::is_multicast_or_broadcast(&info.dst);
});
