//! The core's timers, in one table: `Node::poll_timeout` names the one
//! that fires next, `Node::handle_timeout` runs those that are due.

use std::time::Instant;

/// What the core does at a time of its own choosing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Every `TIMER_TICK`: boringtun's timers of the awake peers (handshake
    /// retries, rekeys, keepalives), the one-way path check, and the end
    /// of the rate limiters' second.
    Tick,
    /// Path probes, punches and endpoint announcements falling due.
    Paths,
    /// A move of our presence is judged: did any peer get through?
    Move,
}

/// In the order due timers run.
const ALL: [Timer; 3] = [Timer::Tick, Timer::Paths, Timer::Move];

/// The next time the core wants `handle_timeout` called, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    pub at: Instant,
    pub timer: Timer,
}

#[derive(Debug, Default)]
pub(crate) struct TimerTable {
    at: [Option<Instant>; ALL.len()],
}

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.at[timer as usize] = at;
    }

    /// Arms `timer` for `at` unless it fires sooner already.
    pub(crate) fn fire_by(&mut self, timer: Timer, at: Instant) {
        let slot = &mut self.at[timer as usize];
        *slot = Some(slot.map_or(at, |t| t.min(at)));
    }

    /// The timer that fires first (the earlier in `ALL` on a tie).
    pub(crate) fn next(&self) -> Option<Timeout> {
        ALL.iter()
            .filter_map(|&timer| {
                Some(Timeout {
                    at: self.at[timer as usize]?,
                    timer,
                })
            })
            .min_by_key(|t| t.at)
    }

    /// A timer due at `now`, disarmed: the caller runs it (and re-arms it
    /// if it repeats). In `ALL`'s order.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let timer = ALL
            .into_iter()
            .find(|&timer| self.at[timer as usize].is_some_and(|at| at <= now))?;
        self.at[timer as usize] = None;
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_timer_fires_first_and_ties_go_in_order() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next(), None);
        table.set(Timer::Move, Some(t0));
        table.set(Timer::Tick, Some(t0));
        table.set(Timer::Paths, Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            table.next(),
            Some(Timeout {
                at: t0,
                timer: Timer::Tick
            })
        );
        assert_eq!(table.pop_due(t0), Some(Timer::Tick));
        assert_eq!(table.pop_due(t0), Some(Timer::Move));
        assert_eq!(table.pop_due(t0), None, "Paths is not due yet");
        let paths = Timeout {
            at: t0 + Duration::from_secs(1),
            timer: Timer::Paths,
        };
        assert_eq!(table.next(), Some(paths));
    }

    #[test]
    fn fire_by_only_ever_brings_a_timer_forward() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        table.fire_by(Timer::Paths, t0 + Duration::from_secs(5));
        table.fire_by(Timer::Paths, t0 + Duration::from_secs(9));
        assert_eq!(
            table.next().map(|t| t.at),
            Some(t0 + Duration::from_secs(5))
        );
        table.fire_by(Timer::Paths, t0);
        assert_eq!(table.next().map(|t| t.at), Some(t0));
    }
}
