//! How fast datagrams go to the SAM bridge, and which go together.
//!
//! Each destination has a flow: a queue of Noise messages and two budgets,
//! bytes and datagrams per second (the router's work is mostly per
//! datagram, so at the datagram limit messages queue up and share
//! datagrams). They start at 40 Mbit/s and 2000 datagrams/s and follow the
//! receiver's receipts (`bundle::Receipt`, at most every 100 ms): while
//! loss stays under 1 %, a budget that held the flow back grows 10 % per
//! receipt (the datagram budget only once datagrams go out 75 % full);
//! above 5 % loss both drop to 90 % of what arrived, at most every 200 ms;
//! no receipt for a second while sending, on a flow that had receipts,
//! halves them. Whatever the flows
//! want, the bridge gets at most `MAX_DATAGRAMS_PER_SECOND` (its UDP socket
//! overflows in bursts).
//!
//! Messages waiting for one destination share a datagram up to the flow's
//! bundle size (16 KB to start): i2pd's work per datagram (a SAM read, a
//! gzip stream, a garlic message) costs as much as ~6 KB of payload, so
//! fewer, fuller datagrams move more per CPU second. A flow that is idle
//! sends a message at once; a busy one (a datagram left within `BUSY`)
//! lets a bundle that is not full wait up to `CORK_DELAY` for more, so a
//! stream of TCP ACKs shares datagrams instead of costing one each.
//!
//! Loss and the bundle size: one lost 1 KB tunnel message loses the whole
//! datagram, so bundles lose a quarter (down to 4 KB) when loss looks like
//! the path's, and grow back by 1 KB per loss-free receipt while their size
//! holds the flow back. Loss while the flow pushed against its budget is
//! congestion (an overflowing queue: i2pd's SAM socket, a router's link)
//! that drops whole datagrams whatever their size: only the rate is cut,
//! unless the loss outlasts `LOSS_STREAK_TO_SHRINK` receipts in a row.
//! A message that waited `MAX_QUEUE_DELAY` is dropped
//! here: the queue stays short, TCP inside sees the loss at once, and no
//! flood builds up inside i2pd (its link queue drops a peer at 500
//! messages, after which its ratchet loses sync).
//!
//! No I/O and no clock: time comes in as `now`; `poll_transmit` hands out
//! the next datagram payload and `poll_timeout` says when to ask again.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::bundle::{self, DataHeader, Receipt};

/// A new flow's budgets: 40 Mbit/s, and 2000 datagrams/s (i2pd's cost is
/// mostly per datagram: 159 us + 0.024 us per byte measured for RAW on the
/// test network, so bundling is the cheap way to move more).
pub const START_RATE: f64 = 5_000_000.0;
pub const MIN_RATE: f64 = START_RATE / 20.0;
pub const MAX_RATE: f64 = START_RATE * 10.0;
pub const START_DATAGRAM_RATE: f64 = 2000.0;
const MIN_DATAGRAM_RATE: f64 = 100.0;
/// Datagrams in a row one flow may send at once.
const FLOW_DATAGRAM_BURST: f64 = 8.0;
/// The datagram budget grows only when datagrams go out this full: until
/// then fuller bundles move more for the same cost.
const FULL_ENOUGH: f64 = 0.75;
/// Datagrams per second to the bridge, whatever the flows' rates.
pub const MAX_DATAGRAMS_PER_SECOND: f64 = 6000.0;
const DATAGRAM_BURST: f64 = 32.0;
/// A flow's bucket holds this much of its rate (at least two datagrams).
const BURST_TIME: f64 = 0.005;
pub const MAX_BUNDLE: usize = 16 * 1024;
const MIN_BUNDLE: usize = 4 * 1024;
const BUNDLE_GROWTH: usize = 1024;
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(50);
/// A busy flow's bundle that is not full waits this long for more.
const CORK_DELAY: Duration = Duration::from_millis(1);
/// A flow is busy while its last datagram left less than this ago.
const BUSY: Duration = Duration::from_millis(5);
/// Lossy receipts in a row after which bundles shrink even under
/// congestion: rate cuts alone did not end the loss.
const LOSS_STREAK_TO_SHRINK: u32 = 3;
/// Messages waiting in all flows; more are refused (backpressure).
pub const MAX_QUEUED: usize = 512;
/// Receipts waiting to go out; more are dropped (the next one says more).
const MAX_CONTROL: usize = 64;
/// How often a receiver answers a flow.
pub const RECEIPT_INTERVAL: Duration = Duration::from_millis(100);
/// Datagrams a receipt must cover before it tells anything.
const MIN_SAMPLE: u32 = 16;
const GROWTH: f64 = 1.1;
const LOSS_TO_GROW: f64 = 0.01;
const LOSS_TO_CUT: f64 = 0.05;
const CUT_INTERVAL: Duration = Duration::from_millis(200);
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(1);
/// A flow with nothing queued for this long is forgotten.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Senders a receiver keeps count of; the least recent goes first.
const MAX_SENDERS: usize = 256;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PacerCounters {
    /// Messages dropped after waiting `MAX_QUEUE_DELAY`.
    pub stale_drops: u64,
    /// Messages refused because `MAX_QUEUED` wait already.
    pub full_drops: u64,
    pub receipts: u64,
    /// Receipts for no flow of ours, or claiming datagrams never sent.
    pub ignored_receipts: u64,
    /// Rate cuts for loss or missing receipts.
    pub cuts: u64,
}

/// The next datagram: its route and how many Noise messages it carries.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit<K> {
    pub route: K,
    pub messages: usize,
}

struct Flow {
    id: u64,
    from: [u8; 32],
    next_seq: u32,
    queue: VecDeque<(Vec<u8>, Instant)>,
    rate: f64,
    tokens: f64,
    datagram_rate: f64,
    datagram_tokens: f64,
    refilled: Instant,
    /// Which budget held the flow back since the last receipt.
    limited_by_bytes: bool,
    limited_by_datagrams: bool,
    /// Payload bytes sent since the last receipt.
    bytes_since_receipt: usize,
    max_bundle: usize,
    /// (highest, received) of the receipt the next one is compared with.
    base: Option<(u32, u32)>,
    last_cut: Option<Instant>,
    last_receipt: Option<Instant>,
    sent_since_receipt: u32,
    active_at: Instant,
    /// When the last datagram left.
    last_sent: Option<Instant>,
    /// Receipts in a row that showed more than `LOSS_TO_CUT` lost.
    loss_streak: u32,
}

impl Flow {
    fn new(id: u64, from: [u8; 32], now: Instant) -> Flow {
        Flow {
            id,
            from,
            next_seq: 0,
            queue: VecDeque::new(),
            rate: START_RATE,
            tokens: burst(START_RATE),
            datagram_rate: START_DATAGRAM_RATE,
            datagram_tokens: FLOW_DATAGRAM_BURST,
            refilled: now,
            limited_by_bytes: false,
            limited_by_datagrams: false,
            bytes_since_receipt: 0,
            max_bundle: MAX_BUNDLE,
            base: None,
            last_cut: None,
            last_receipt: None,
            sent_since_receipt: 0,
            active_at: now,
            last_sent: None,
            loss_streak: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(burst(self.rate));
        self.datagram_tokens =
            (self.datagram_tokens + elapsed * self.datagram_rate).min(FLOW_DATAGRAM_BURST);
        self.refilled = now;
    }

    /// Scales both budgets by `factor` (< 1), and the bundle size by 3/4
    /// when `shrink`.
    fn cut(&mut self, factor: f64, shrink: bool, now: Instant) {
        self.rate = (self.rate * factor).clamp(MIN_RATE, MAX_RATE);
        self.datagram_rate =
            (self.datagram_rate * factor).clamp(MIN_DATAGRAM_RATE, MAX_DATAGRAMS_PER_SECOND);
        self.tokens = self.tokens.min(burst(self.rate));
        if shrink {
            self.max_bundle = (self.max_bundle * 3 / 4).max(MIN_BUNDLE);
        }
        self.last_cut = Some(now);
    }

    /// Is a loss the bundle size's fault? Not when the flow pushed against
    /// its budget: that is congestion, an overflowing queue (i2pd's SAM
    /// socket, a router's link queue) that loses whole datagrams whatever
    /// their size, and the rate cut ends it. Loss at a rate the flow did
    /// not push, or that outlasts `LOSS_STREAK_TO_SHRINK` cuts, is the
    /// path's: one lost 1 KB tunnel message loses the whole datagram.
    fn loss_is_per_size(&self) -> bool {
        let congested = self.limited_by_bytes || self.limited_by_datagrams;
        !congested || self.loss_streak >= LOSS_STREAK_TO_SHRINK
    }

    /// Until when a bundle that is not full yet waits for more: only
    /// while the flow is busy (a datagram left within `BUSY`), and at most
    /// `CORK_DELAY` after its first message came. `None`: it may go.
    fn corked_until(&self, count: usize, now: Instant) -> Option<Instant> {
        if count < self.queue.len() {
            return None; // full: more wait than fit
        }
        let last = self.last_sent?;
        let (_, first_at) = self.queue.front()?;
        if now.saturating_duration_since(last) > BUSY {
            return None;
        }
        let until = *first_at + CORK_DELAY;
        (until > now).then_some(until)
    }

    /// How many queued messages the next datagram takes.
    fn bundle_count(&self) -> usize {
        let mut size = bundle::DATA_HEADER;
        let mut count = 0;
        for (message, _) in &self.queue {
            let grown = size + bundle::record_len(message.len());
            if count > 0 && (grown > self.max_bundle || count == bundle::MAX_MESSAGES) {
                break;
            }
            size = grown;
            count += 1;
        }
        count
    }
}

fn burst(rate: f64) -> f64 {
    (rate * BURST_TIME).max(2.0 * MAX_BUNDLE as f64)
}

pub struct Pacer<K> {
    flows: HashMap<K, Flow>,
    by_id: HashMap<u64, K>,
    /// Flows with queued messages, served in turn.
    ready: VecDeque<K>,
    control: VecDeque<(K, Vec<u8>)>,
    queued: usize,
    datagram_tokens: f64,
    refilled: Instant,
    /// Flow ids: a keyed sequence, so they cannot be guessed.
    id_key: u64,
    ids_issued: u64,
    swept_at: Instant,
    pub counters: PacerCounters,
}

impl<K: Clone + Eq + Hash> Pacer<K> {
    /// `id_key` must be random: receipts are believed for known flow ids.
    pub fn new(id_key: u64, now: Instant) -> Pacer<K> {
        Pacer {
            flows: HashMap::new(),
            by_id: HashMap::new(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            queued: 0,
            datagram_tokens: DATAGRAM_BURST,
            refilled: now,
            id_key,
            ids_issued: 0,
            swept_at: now,
            counters: PacerCounters::default(),
        }
    }

    /// Queues a Noise message for `route`, sent as from `from` (our
    /// destination's hash). False (counted) when too many wait already.
    pub fn push(&mut self, route: K, from: [u8; 32], message: Vec<u8>, now: Instant) -> bool {
        if self.queued >= MAX_QUEUED {
            self.counters.full_drops += 1;
            return false;
        }
        if !self.flows.contains_key(&route) {
            let id = self.next_flow_id();
            self.by_id.insert(id, route.clone());
            self.flows.insert(route.clone(), Flow::new(id, from, now));
        }
        let Some(flow) = self.flows.get_mut(&route) else {
            return false;
        };
        flow.from = from;
        if flow.queue.is_empty() {
            self.ready.push_back(route);
        }
        flow.queue.push_back((message, now));
        self.queued += 1;
        true
    }

    /// Queues a finished payload (a receipt) to go before any data.
    pub fn push_control(&mut self, route: K, payload: Vec<u8>) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back((route, payload));
        }
    }

    /// The next datagram payload into `out`, if one may go now.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<Transmit<K>> {
        self.sweep(now);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.datagram_tokens =
            (self.datagram_tokens + elapsed * MAX_DATAGRAMS_PER_SECOND).min(DATAGRAM_BURST);
        self.refilled = now;
        if self.datagram_tokens < 1.0 {
            return None;
        }
        if let Some((route, payload)) = self.control.pop_front() {
            out.clear();
            out.extend_from_slice(&payload);
            self.datagram_tokens -= 1.0;
            return Some(Transmit { route, messages: 0 });
        }
        for _ in 0..self.ready.len() {
            let route = self.ready.pop_front()?;
            let Some(flow) = self.flows.get_mut(&route) else {
                continue;
            };
            let stale = flow
                .queue
                .iter()
                .take_while(|(_, at)| now.saturating_duration_since(*at) > MAX_QUEUE_DELAY)
                .count();
            if stale > 0 {
                flow.queue.drain(..stale);
                self.queued -= stale;
                self.counters.stale_drops += stale as u64;
            }
            if flow.queue.is_empty() {
                continue;
            }
            flow.refill(now);
            if flow.tokens < 0.0 || flow.datagram_tokens < 1.0 {
                flow.limited_by_bytes |= flow.tokens < 0.0;
                flow.limited_by_datagrams |= flow.datagram_tokens < 1.0;
                self.ready.push_back(route);
                continue;
            }
            if flow.base.is_some()
                && flow.sent_since_receipt >= MIN_SAMPLE
                && flow
                    .last_receipt
                    .is_some_and(|t| now.saturating_duration_since(t) > RECEIPT_TIMEOUT)
            {
                // Everything lost, or the receipts are: slow down, once a
                // second. Datagrams too big for the path lose everything too.
                flow.cut(0.5, true, now);
                flow.last_receipt = Some(now);
                self.counters.cuts += 1;
            }
            let count = flow.bundle_count();
            if flow.corked_until(count, now).is_some() {
                self.ready.push_back(route);
                continue;
            }
            let header = DataHeader {
                flow: flow.id,
                seq: flow.next_seq,
                from: flow.from,
            };
            let messages: Vec<&[u8]> = flow.queue.iter().take(count).map(|(m, _)| &m[..]).collect();
            bundle::encode_data(&header, &messages, out);
            flow.queue.drain(..count);
            flow.next_seq = flow.next_seq.wrapping_add(1);
            flow.sent_since_receipt = flow.sent_since_receipt.saturating_add(1);
            flow.tokens -= out.len() as f64;
            flow.datagram_tokens -= 1.0;
            flow.bytes_since_receipt += out.len();
            flow.active_at = now;
            flow.last_sent = Some(now);
            self.queued -= count;
            self.datagram_tokens -= 1.0;
            if !flow.queue.is_empty() {
                self.ready.push_back(route.clone());
            }
            return Some(Transmit {
                route,
                messages: count,
            });
        }
        None
    }

    /// When `poll_transmit` may have something again; None: nothing waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let global = self.refilled
            + Duration::from_secs_f64(
                (1.0 - self.datagram_tokens).max(0.0) / MAX_DATAGRAMS_PER_SECOND,
            );
        if !self.control.is_empty() {
            return Some(global);
        }
        let flows = self
            .ready
            .iter()
            .filter_map(|route| self.flows.get(route))
            .map(|flow| {
                let bytes = (-flow.tokens).max(0.0) / flow.rate;
                let datagrams = (1.0 - flow.datagram_tokens).max(0.0) / flow.datagram_rate;
                let budget = flow.refilled + Duration::from_secs_f64(bytes.max(datagrams));
                // `refilled` is the `now` of the last `poll_transmit`.
                let cork = flow.corked_until(flow.bundle_count(), self.refilled);
                cork.map_or(budget, |until| until.max(budget))
            })
            .min()?;
        Some(flows.max(global))
    }

    /// A receipt from a destination we send to: the flow's rate follows.
    pub fn on_receipt(&mut self, receipt: &Receipt, now: Instant) {
        let Some(flow) = self
            .by_id
            .get(&receipt.flow)
            .and_then(|route| self.flows.get_mut(route))
        else {
            self.counters.ignored_receipts += 1;
            return;
        };
        // A sequence number at or past the next one was never sent.
        if receipt.highest.wrapping_sub(flow.next_seq) as i32 >= 0 {
            self.counters.ignored_receipts += 1;
            return;
        }
        self.counters.receipts += 1;
        flow.last_receipt = Some(now);
        let fill = flow.bytes_since_receipt as f64
            / (f64::from(flow.sent_since_receipt.max(1)) * flow.max_bundle as f64);
        flow.sent_since_receipt = 0;
        flow.bytes_since_receipt = 0;
        let Some((highest, received)) = flow.base else {
            flow.base = Some((receipt.highest, receipt.received));
            return;
        };
        let sent = receipt.highest.wrapping_sub(highest) as i32;
        if sent < MIN_SAMPLE as i32 {
            return;
        }
        flow.base = Some((receipt.highest, receipt.received));
        let got = f64::from(receipt.received.wrapping_sub(received));
        let delivered = (got / f64::from(sent as u32)).min(1.0);
        let loss = 1.0 - delivered;
        if loss > LOSS_TO_CUT {
            flow.loss_streak = flow.loss_streak.saturating_add(1);
            if flow
                .last_cut
                .is_none_or(|t| now.saturating_duration_since(t) >= CUT_INTERVAL)
            {
                let shrink = flow.loss_is_per_size();
                flow.cut(delivered * 0.9, shrink, now);
                self.counters.cuts += 1;
            }
        } else {
            flow.loss_streak = 0;
        }
        if loss < LOSS_TO_GROW {
            if flow.limited_by_bytes {
                flow.rate = (flow.rate * GROWTH).min(MAX_RATE);
            }
            if flow.limited_by_datagrams && fill >= FULL_ENOUGH {
                flow.datagram_rate = (flow.datagram_rate * GROWTH).min(MAX_DATAGRAMS_PER_SECOND);
            }
            // Bundles grow back when their size held the flow back.
            if flow.limited_by_bytes || flow.limited_by_datagrams || fill >= FULL_ENOUGH {
                flow.max_bundle = (flow.max_bundle + BUNDLE_GROWTH).min(MAX_BUNDLE);
            }
        }
        flow.limited_by_bytes = false;
        flow.limited_by_datagrams = false;
    }

    /// The rate of the flow on `route`, in bytes per second.
    pub fn rate(&self, route: &K) -> Option<f64> {
        self.flows.get(route).map(|f| f.rate)
    }

    /// The budgets of all flows (bytes and datagrams per second), highest
    /// first.
    pub fn rates(&self) -> Vec<(f64, f64)> {
        let mut rates: Vec<(f64, f64)> = self
            .flows
            .values()
            .map(|f| (f.rate, f.datagram_rate))
            .collect();
        rates.sort_by(|a, b| b.0.total_cmp(&a.0));
        rates
    }

    /// The id receipts for the flow on `route` carry.
    pub fn flow_id(&self, route: &K) -> Option<u64> {
        self.flows.get(route).map(|f| f.id)
    }

    /// The messages waiting in all flows.
    pub fn queued(&self) -> usize {
        self.queued
    }

    fn next_flow_id(&mut self) -> u64 {
        self.ids_issued += 1;
        mix(self.id_key ^ mix(self.ids_issued))
    }

    /// Forgets flows idle for `FLOW_IDLE` (checked every few seconds).
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.swept_at) < FLOW_IDLE / 16 {
            return;
        }
        self.swept_at = now;
        let by_id = &mut self.by_id;
        self.flows.retain(|_, flow| {
            let keep =
                !flow.queue.is_empty() || now.saturating_duration_since(flow.active_at) < FLOW_IDLE;
            if !keep {
                by_id.remove(&flow.id);
            }
            keep
        });
    }
}

/// splitmix64's finalizer: a bijection that scrambles its input.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What a receiver got from each sender, for the receipts it owes them.
#[derive(Default)]
pub struct Receipts {
    senders: HashMap<[u8; 32], Track>,
}

struct Track {
    receipt: Receipt,
    reported_at: Option<Instant>,
    seen_at: Instant,
}

impl Receipts {
    /// Counts one data datagram; the receipt to send its sender, when one
    /// is due. A sender's new flow (it restarted) replaces the old.
    pub fn record(&mut self, header: &DataHeader, now: Instant) -> Option<Receipt> {
        if !self.senders.contains_key(&header.from) && self.senders.len() >= MAX_SENDERS {
            let oldest = self
                .senders
                .iter()
                .min_by_key(|(_, track)| track.seen_at)
                .map(|(from, _)| *from);
            if let Some(oldest) = oldest {
                self.senders.remove(&oldest);
            }
        }
        let fresh = || Receipt {
            flow: header.flow,
            highest: header.seq,
            received: 0,
        };
        let track = self.senders.entry(header.from).or_insert(Track {
            receipt: fresh(),
            reported_at: None,
            seen_at: now,
        });
        if track.receipt.flow != header.flow {
            track.receipt = fresh();
            track.reported_at = None;
        }
        let receipt = &mut track.receipt;
        receipt.received = receipt.received.wrapping_add(1);
        if header.seq.wrapping_sub(receipt.highest) as i32 > 0 {
            receipt.highest = header.seq;
        }
        track.seen_at = now;
        let due = track
            .reported_at
            .is_none_or(|t| now.saturating_duration_since(t) >= RECEIPT_INTERVAL);
        due.then(|| {
            track.reported_at = Some(now);
            track.receipt
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: [u8; 32] = [7; 32];

    /// A pacer sending to route 1, a receiver whose receipts come back at
    /// once, and virtual time.
    struct Link {
        pacer: Pacer<u32>,
        receipts: Receipts,
        now: Instant,
        out: Vec<u8>,
        sent_datagrams: u64,
        lost: u64,
    }

    impl Link {
        fn new() -> Link {
            let now = Instant::now();
            Link {
                pacer: Pacer::new(0x5eed, now),
                receipts: Receipts::default(),
                now,
                out: Vec::new(),
                sent_datagrams: 0,
                lost: 0,
            }
        }

        /// Offers `per_ms` messages of 1400 bytes every millisecond for
        /// `ms` milliseconds; `lose` decides per datagram whether it is lost.
        fn run(&mut self, ms: u64, per_ms: usize, mut lose: impl FnMut(u64) -> bool) -> usize {
            let mut bytes = 0;
            for _ in 0..ms {
                for _ in 0..per_ms {
                    self.pacer.push(1, FROM, vec![4; 1400], self.now);
                }
                while let Some(transmit) = self.pacer.poll_transmit(self.now, &mut self.out) {
                    assert_eq!(transmit.route, 1);
                    self.sent_datagrams += 1;
                    if lose(self.sent_datagrams) {
                        self.lost += 1;
                        continue;
                    }
                    match bundle::decode(&self.out).unwrap() {
                        bundle::Payload::Data { header, messages } => {
                            bytes += messages.iter().map(|m| m.len()).sum::<usize>();
                            if let Some(receipt) = self.receipts.record(&header, self.now) {
                                self.pacer.on_receipt(&receipt, self.now);
                            }
                        }
                        bundle::Payload::Receipt(_) => unreachable!(),
                    }
                }
                self.now += Duration::from_millis(1);
            }
            bytes
        }

        fn rate_mbit(&self) -> f64 {
            self.pacer.rate(&1).unwrap() * 8.0 / 1e6
        }
    }

    #[test]
    fn a_new_flow_starts_at_40_mbit_and_bundles_only_what_waits() {
        let mut link = Link::new();
        // One message at a time: each goes alone, at once.
        link.pacer.push(1, FROM, vec![4; 100], link.now);
        let transmit = link.pacer.poll_transmit(link.now, &mut link.out).unwrap();
        assert_eq!(transmit.messages, 1);
        assert!(link.pacer.poll_transmit(link.now, &mut link.out).is_none());
        assert_eq!(link.pacer.poll_timeout(), None);
        // An offered 100 Mbit/s for 1 s with no receipts: about 40 go.
        let mut pacer_only = Link::new();
        let mut bytes = 0;
        for _ in 0..1000 {
            for _ in 0..9 {
                pacer_only
                    .pacer
                    .push(1, FROM, vec![4; 1400], pacer_only.now);
            }
            while let Some(t) = pacer_only
                .pacer
                .poll_transmit(pacer_only.now, &mut pacer_only.out)
            {
                assert!(t.messages >= 1 && pacer_only.out.len() <= MAX_BUNDLE);
                bytes += t.messages * 1400;
            }
            pacer_only.now += Duration::from_millis(1);
        }
        let mbit = bytes as f64 * 8.0 / 1e6;
        assert!((30.0..45.0).contains(&mbit), "{mbit} Mbit/s");
        assert!(pacer_only.pacer.counters.stale_drops > 0);
    }

    #[test]
    fn the_rate_grows_while_nothing_is_lost_and_falls_with_loss() {
        let mut link = Link::new();
        // 200 Mbit/s offered, nothing lost: the rate climbs past 150 Mbit/s.
        link.run(3000, 18, |_| false);
        assert!(link.rate_mbit() > 150.0, "{} Mbit/s", link.rate_mbit());
        // Now the path carries only about 60 Mbit/s: what exceeds it is lost.
        let mut budget = 0.0_f64;
        let mut last = link.now;
        let mut delivered_late = 0;
        for second in 0..4 {
            let mut carried = 0;
            for _ in 0..1000 {
                for _ in 0..18 {
                    link.pacer.push(1, FROM, vec![4; 1400], link.now);
                }
                budget =
                    (budget + link.now.duration_since(last).as_secs_f64() * 7.5e6).min(20_000.0);
                last = link.now;
                while link.pacer.poll_transmit(link.now, &mut link.out).is_some() {
                    if budget < link.out.len() as f64 {
                        continue;
                    }
                    budget -= link.out.len() as f64;
                    if let bundle::Payload::Data { header, messages } =
                        bundle::decode(&link.out).unwrap()
                    {
                        carried += messages.len() * 1400;
                        if let Some(r) = link.receipts.record(&header, link.now) {
                            link.pacer.on_receipt(&r, link.now);
                        }
                    }
                }
                link.now += Duration::from_millis(1);
            }
            if second == 3 {
                delivered_late = carried;
            }
        }
        let rate = link.rate_mbit();
        assert!((25.0..100.0).contains(&rate), "{rate} Mbit/s after loss");
        // It still moves most of what the path carries.
        let mbit = delivered_late as f64 * 8.0 / 1e6;
        assert!(mbit > 35.0, "{mbit} Mbit/s delivered of 60");
        assert!(link.pacer.counters.cuts > 0);
    }

    #[test]
    fn the_datagram_budget_grows_only_for_full_datagrams() {
        // Many small messages: datagrams are the limit but go out far from
        // full, so bundling, not more datagrams, has to move more.
        let mut link = Link::new();
        for _ in 0..2000 {
            for _ in 0..4 {
                link.pacer.push(1, FROM, vec![4; 60], link.now);
            }
            while link.pacer.poll_transmit(link.now, &mut link.out).is_some() {
                if let Ok(bundle::Payload::Data { header, .. }) = bundle::decode(&link.out) {
                    if let Some(r) = link.receipts.record(&header, link.now) {
                        link.pacer.on_receipt(&r, link.now);
                    }
                }
            }
            link.now += Duration::from_millis(1);
        }
        assert_eq!(link.pacer.flows[&1].datagram_rate, START_DATAGRAM_RATE);
        // Full bundles at the datagram limit (2000 full ones a second carry
        // 262 Mbit/s; 450 are offered): the budget grows.
        let mut link = Link::new();
        link.pacer.flows.clear();
        link.run(5000, 40, |_| false);
        assert!(link.pacer.flows[&1].datagram_rate > START_DATAGRAM_RATE * 1.3);
    }

    #[test]
    fn losing_everything_halves_the_rate_every_second() {
        let mut link = Link::new();
        link.run(2000, 18, |_| false);
        let before = link.rate_mbit();
        link.run(3500, 18, |_| true);
        let after = link.rate_mbit();
        assert!(after < before / 4.0, "{before} -> {after}");
        assert!(after >= MIN_RATE * 8.0 / 1e6);
    }

    #[test]
    fn bundles_shrink_with_loss_and_grow_back() {
        let mut link = Link::new();
        link.run(500, 18, |n| n % 10 == 0);
        assert!(link.pacer.flows[&1].max_bundle < MAX_BUNDLE);
        assert!(link.pacer.flows[&1].max_bundle >= MIN_BUNDLE);
        link.run(3000, 18, |_| false);
        assert_eq!(link.pacer.flows[&1].max_bundle, MAX_BUNDLE);
    }

    /// A lone message goes at once; while the flow is busy, a bundle that
    /// is not full waits up to `CORK_DELAY` for more, and a full one goes.
    #[test]
    fn a_busy_flow_fills_its_bundles_for_at_most_a_millisecond() {
        let mut link = Link::new();
        let t0 = link.now;
        link.pacer.push(1, FROM, vec![4; 100], t0);
        let first = link.pacer.poll_transmit(t0, &mut link.out).unwrap();
        assert_eq!(first.messages, 1, "an idle flow sends at once");
        // Three ACK-sized messages in the next 0.6 ms wait for each other.
        for us in [200, 400, 600] {
            let at = t0 + Duration::from_micros(us);
            link.pacer.push(1, FROM, vec![4; 100], at);
            assert!(link.pacer.poll_transmit(at, &mut link.out).is_none());
        }
        let release = t0 + Duration::from_micros(200) + CORK_DELAY;
        assert_eq!(link.pacer.poll_timeout(), Some(release));
        let bundle = link.pacer.poll_transmit(release, &mut link.out).unwrap();
        assert_eq!(bundle.messages, 3);
        // More than a bundle holds: a full one goes without waiting.
        let at = release + Duration::from_micros(100);
        for _ in 0..20 {
            link.pacer.push(1, FROM, vec![4; 1400], at);
        }
        let full = link.pacer.poll_transmit(at, &mut link.out).unwrap();
        assert!(
            link.out.len() > MAX_BUNDLE - 1500,
            "{} bytes",
            link.out.len()
        );
        assert!(full.messages < 20);
        // After `BUSY` without a datagram the flow is idle again.
        let later = at + BUSY + Duration::from_millis(1);
        while link.pacer.poll_transmit(later, &mut link.out).is_some() {}
        let idle = later + BUSY + Duration::from_millis(1);
        link.pacer.push(1, FROM, vec![4; 100], idle);
        assert!(link.pacer.poll_transmit(idle, &mut link.out).is_some());
    }

    /// A short loss while the flow pushes against its budget is
    /// congestion: the rate is cut, the bundles stay whole. Loss that
    /// outlasts the cuts shrinks them (`bundles_shrink_with_loss_and_grow_back`).
    #[test]
    fn congestion_loss_cuts_the_rate_but_not_the_bundles() {
        let mut link = Link::new();
        link.run(1000, 18, |_| false);
        assert_eq!(link.pacer.flows[&1].max_bundle, MAX_BUNDLE);
        let cuts = link.pacer.counters.cuts;
        link.run(150, 18, |n| n % 4 == 0);
        assert!(link.pacer.counters.cuts > cuts, "the loss was noticed");
        assert_eq!(link.pacer.flows[&1].max_bundle, MAX_BUNDLE);
    }

    #[test]
    fn receipts_for_unknown_flows_or_unsent_datagrams_are_ignored() {
        let mut link = Link::new();
        link.run(100, 1, |_| false);
        let rate = link.rate_mbit();
        let id = link.pacer.flows[&1].id;
        let sent = link.pacer.flows[&1].next_seq;
        for receipt in [
            Receipt {
                flow: id ^ 1,
                highest: 0,
                received: 0,
            },
            Receipt {
                flow: id,
                highest: sent,
                received: 0,
            },
            Receipt {
                flow: id,
                highest: sent + 1000,
                received: 1,
            },
        ] {
            link.pacer.on_receipt(&receipt, link.now);
        }
        assert_eq!(link.pacer.counters.ignored_receipts, 3);
        assert_eq!(link.rate_mbit(), rate);
    }

    #[test]
    fn flows_take_turns_and_the_bridge_gets_a_bounded_datagram_rate() {
        let now = Instant::now();
        let mut pacer: Pacer<u32> = Pacer::new(1, now);
        let mut t = now;
        let mut per_route = [0usize; 3];
        let mut datagrams = 0;
        let mut out = Vec::new();
        for _ in 0..1000 {
            for route in 0..3 {
                for _ in 0..4 {
                    pacer.push(route, FROM, vec![1; 100], t);
                }
            }
            while let Some(transmit) = pacer.poll_transmit(t, &mut out) {
                per_route[transmit.route as usize] += transmit.messages;
                datagrams += 1;
            }
            if let Some(next) = pacer.poll_timeout() {
                assert!(next >= t - Duration::from_millis(1));
            }
            t += Duration::from_millis(1);
        }
        assert!(datagrams as f64 <= MAX_DATAGRAMS_PER_SECOND + DATAGRAM_BURST);
        let (min, max) = (
            per_route.iter().min().unwrap(),
            per_route.iter().max().unwrap(),
        );
        assert!(*max - *min <= 8, "{per_route:?}");
        assert!(pacer.queued() <= MAX_QUEUED);
    }

    #[test]
    fn receipts_are_due_every_interval_and_a_new_flow_restarts_the_count() {
        let mut receipts = Receipts::default();
        let now = Instant::now();
        let header = |flow, seq| DataHeader {
            flow,
            seq,
            from: FROM,
        };
        let first = receipts.record(&header(9, 0), now).unwrap();
        assert_eq!(
            first,
            Receipt {
                flow: 9,
                highest: 0,
                received: 1
            }
        );
        assert_eq!(receipts.record(&header(9, 2), now), None);
        assert_eq!(
            receipts.record(&header(9, 1), now + Duration::from_millis(50)),
            None
        );
        assert_eq!(
            receipts.record(&header(9, 3), now + RECEIPT_INTERVAL),
            Some(Receipt {
                flow: 9,
                highest: 3,
                received: 4
            })
        );
        assert_eq!(
            receipts.record(&header(10, 5), now + RECEIPT_INTERVAL),
            Some(Receipt {
                flow: 10,
                highest: 5,
                received: 1
            })
        );
        // Many senders: the table stays bounded.
        for i in 0..1000u32 {
            let mut from = [0; 32];
            from[..4].copy_from_slice(&i.to_be_bytes());
            receipts.record(
                &DataHeader {
                    flow: 1,
                    seq: 0,
                    from,
                },
                now,
            );
        }
        assert!(receipts.senders.len() <= MAX_SENDERS);
    }
}
