//! What a SAM bridge sends: reply lines on the control connection, and
//! forwarded RAW datagrams (bundled Noise messages, receipts) on the UDP
//! socket, which reach the receipt table and the pacer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veilmesh_i2p::pacer::{Pacer, Receipts};
use veilmesh_i2p::{bundle, sam};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(reply) = sam::Reply::parse(&line) {
        let _ = reply.get("RESULT");
        let _ = reply.require("VALUE");
        let _ = reply.expect_ok("NAMING REPLY");
    }
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    match bundle::decode(data) {
        Ok(bundle::Payload::Data { header, messages }) => {
            assert!(messages.iter().all(|m| !m.is_empty()));
            bundle::encode_data(&header, &messages, &mut out);
            assert_eq!(out, data, "data datagrams have one encoding");
            let mut receipts = Receipts::default();
            let receipt = receipts.record(&header, now);
            assert!(receipt.is_some(), "the first datagram of a flow is answered");
        }
        Ok(bundle::Payload::Receipt(receipt)) => {
            bundle::encode_receipt(&receipt, &mut out);
            assert_eq!(out, data, "receipts have one encoding");
            // A pacer that sent some datagrams gets it as it came, and
            // as if for its flow (the fuzzer cannot guess flow ids).
            let mut pacer: Pacer<u8> = Pacer::new(receipt.received.into(), now);
            let mut at = now;
            for round in 0..40u64 {
                pacer.push(0, [0; 32], vec![4; 64], at);
                let _ = pacer.poll_transmit(at, &mut out);
                at += std::time::Duration::from_millis(round * 7);
            }
            let ours = pacer.flow_id(&0).unwrap_or_default();
            pacer.on_receipt(&receipt, at);
            pacer.on_receipt(&bundle::Receipt { flow: ours, ..receipt }, at);
            pacer.on_receipt(&bundle::Receipt { flow: ours, highest: receipt.highest / 2, received: receipt.received / 3 }, at);
            let _ = pacer.poll_transmit(at, &mut out);
            assert!(pacer.rate(&0).is_some_and(|r| r > 0.0));
        }
        Err(_) => {}
    }
});
