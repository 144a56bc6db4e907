//! Batches through the core. Out: sealed datagrams gathered per path in
//! `TxBatch`: the core seals each TUN packet straight into its buffer, and
//! runs of equal-sized datagrams to one path leave in one
//! `Transport::send_batch` (one `sendmsg` with UDP GSO), as the kernel
//! wants them: back to back, the last may be shorter. In: a `TunSink`
//! gives the core the place to decrypt each datagram of a receive call
//! into (the daemon's batch of TUN writes).

use veilmesh_transport::PeerAddr;

use crate::BUFFER_SIZE;

/// Datagrams in one batch at most: what one UDP GSO send takes.
pub const MAX_BATCH: usize = 64;

/// A run of datagrams for one path, ready to send.
pub struct Run<'a> {
    pub to: PeerAddr,
    pub datagrams: &'a [u8],
    /// Every datagram's size but the last's.
    pub segment: usize,
    pub count: usize,
}

#[derive(Default)]
pub struct TxBatch {
    buf: Vec<u8>,
    /// The open run: `buf[start..fill]` for `to`.
    start: usize,
    fill: usize,
    to: Option<PeerAddr>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run: nothing more joins it.
    closed: bool,
}

impl TxBatch {
    pub fn new() -> TxBatch {
        TxBatch {
            // Room for a full run of MTU-sized datagrams and one of any size.
            buf: vec![0u8; 4 * BUFFER_SIZE],
            ..TxBatch::default()
        }
    }

    /// Whether `space` has room for another datagram of any size; if
    /// not, `take` the open run first.
    pub fn has_room(&self) -> bool {
        self.buf.len() - self.fill >= BUFFER_SIZE
    }

    /// Where the next datagram is sealed (`BUFFER_SIZE` bytes at least
    /// when `has_room`).
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.fill..]
    }

    /// Whether a datagram of `len` bytes for `to`, sealed at the start of
    /// `space`, may join the open run. If not, `take` the run, then `add`.
    pub fn joins(&self, to: &PeerAddr, len: usize) -> bool {
        match &self.to {
            None => true,
            Some(open) => {
                open == to && !self.closed && len <= self.segment && self.count < MAX_BATCH
            }
        }
    }

    /// Adds the datagram of `len` bytes sealed at the start of `space`
    /// (after `joins` said yes, or after `take`).
    pub fn add(&mut self, to: &PeerAddr, len: usize) {
        if self.to.is_none() {
            self.to = Some(to.clone());
            self.segment = len;
            self.start = self.fill;
        }
        self.closed = len < self.segment;
        self.count += 1;
        self.fill += len;
    }

    /// The open run, to send now; the next `add` starts a new one. A
    /// datagram already sealed at `space` stays where it is (the run's
    /// room was checked before sealing). Called when the buffer is short
    /// of room, new runs start at its beginning again.
    pub fn take(&mut self) -> Option<Run<'_>> {
        let to = self.to.take()?;
        let (start, end, count) = (self.start, self.fill, self.count);
        self.count = 0;
        self.closed = false;
        if !self.has_room() {
            self.fill = 0;
        }
        Some(Run {
            to,
            datagrams: &self.buf[start..end],
            segment: self.segment,
            count,
        })
    }
}

/// Where a batch of TUN packets goes besides `TxBatch`: the transports
/// (and the TUN, for ICMP errors).
pub trait TunBatchOutput {
    /// Size limits of datagrams to `to` (`Transport::limits`).
    fn limits(&self, to: &PeerAddr) -> veilmesh_transport::DatagramLimits;
    /// A run of sealed datagrams to one path is complete: send it now
    /// (the buffer is reused after). False if it could not be sent.
    fn send(&mut self, run: Run<'_>) -> bool;
    /// A packet for the TUN: an ICMP error the core made.
    fn reply(&mut self, packet: &[u8]);
}

/// Where a batch of received datagrams is decrypted to: one place per
/// packet, each `BUFFER_SIZE` bytes long.
pub trait TunSink {
    /// The place for the next packet, the same one until `commit`; None
    /// when the sink is full (write it out, then hand in the rest).
    fn space(&mut self) -> Option<&mut [u8]>;
    /// The packet of `len` bytes at the start of the last `space` is done.
    fn commit(&mut self, len: usize);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn udp(text: &str) -> PeerAddr {
        PeerAddr::Udp(text.parse::<SocketAddr>().unwrap())
    }

    /// Seals `len` bytes of `byte` for `to` as the daemon does; returns
    /// the runs that had to go first.
    fn seal(
        batch: &mut TxBatch,
        to: &PeerAddr,
        len: usize,
        byte: u8,
    ) -> Vec<(PeerAddr, Vec<u8>, usize)> {
        let mut sent = Vec::new();
        if !batch.has_room() {
            sent.extend(
                batch
                    .take()
                    .map(|r| (r.to, r.datagrams.to_vec(), r.segment)),
            );
        }
        batch.space()[..len].fill(byte);
        if !batch.joins(to, len) {
            sent.extend(
                batch
                    .take()
                    .map(|r| (r.to, r.datagrams.to_vec(), r.segment)),
            );
        }
        batch.add(to, len);
        sent
    }

    /// Equal datagrams to one path make one run; a shorter one ends it; a
    /// longer one or another path starts a new run; 64 at most; the
    /// buffer wraps without moving a datagram.
    #[test]
    fn runs_are_equal_datagrams_to_one_path_with_a_shorter_last() {
        let (a, b) = (udp("192.0.2.1:1"), udp("192.0.2.2:2"));
        let mut batch = TxBatch::new();
        let mut sent = Vec::new();
        for i in 0..3 {
            sent.extend(seal(&mut batch, &a, 100, i));
        }
        sent.extend(seal(&mut batch, &a, 40, 3));
        assert!(sent.is_empty(), "one run so far");
        sent.extend(seal(&mut batch, &a, 100, 4));
        assert_eq!(sent.len(), 1, "the shorter datagram closed the run");
        assert_eq!(sent[0].0, a);
        assert_eq!(sent[0].2, 100);
        let expected: Vec<u8> = [vec![0; 100], vec![1; 100], vec![2; 100], vec![3; 40]].concat();
        assert_eq!(sent[0].1, expected);
        sent.clear();
        sent.extend(seal(&mut batch, &b, 100, 5));
        assert_eq!(sent.len(), 1, "another path");
        assert_eq!((&sent[0].0, sent[0].1.as_slice()), (&a, &[4u8; 100][..]));
        sent.clear();
        for i in 0..200u32 {
            sent.extend(seal(&mut batch, &b, 1500, i as u8));
        }
        let run = batch.take().unwrap();
        sent.push((run.to, run.datagrams.to_vec(), run.segment));
        let datagrams: Vec<u8> = sent.iter().flat_map(|(_, d, _)| d.clone()).collect();
        let mut expected = vec![5u8; 100];
        for i in 0..200u32 {
            expected.extend(std::iter::repeat_n(i as u8, 1500));
        }
        assert_eq!(
            datagrams, expected,
            "nothing lost or reordered across wraps"
        );
        assert!(sent
            .iter()
            .all(|(to, d, _)| to == &b && d.len() <= MAX_BATCH * 1500));
    }
}
