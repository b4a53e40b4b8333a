//! The retry budget of a host: extra attempts (retries, hedges, race duplicates) are allowed
//! while they stay under a share of the requests seen over the last 10 seconds, and a few are
//! always allowed in flight so that a lone sequential client can still fail over. A plain
//! struct that takes `now`; the caller keeps it behind a short lock.

use crate::config::RetryBudget;

/// Width of one slot of the sliding window, in nanoseconds.
const SLOT_NANOS: u64 = 1_000_000_000;
/// Slots in the window (10 s).
const SLOTS: usize = 10;

#[derive(Debug, Default)]
pub struct Budget {
    /// Per slot: (slot number, requests, extra attempts).
    window: [(u64, u32, u32); SLOTS],
    /// Extra attempts in flight now.
    in_flight: u32,
}

impl Budget {
    fn slot(&mut self, now: u64) -> &mut (u64, u32, u32) {
        let n = now / SLOT_NANOS;
        let s = &mut self.window[(n % SLOTS as u64) as usize];
        if s.0 != n {
            *s = (n, 0, 0);
        }
        s
    }

    fn totals(&self, now: u64) -> (u64, u64) {
        let n = now / SLOT_NANOS;
        self.window
            .iter()
            .filter(|s| s.0 + SLOTS as u64 > n && s.0 <= n)
            .fold((0, 0), |(r, e), s| (r + u64::from(s.1), e + u64::from(s.2)))
    }

    /// Count a request (its first attempt).
    pub fn request(&mut self, now: u64) {
        let s = self.slot(now);
        s.1 = s.1.saturating_add(1);
    }

    /// Take one extra attempt if the budget allows it; pair with `done` when it ends.
    pub fn try_extra(&mut self, now: u64, cfg: &RetryBudget) -> bool {
        let (requests, extras) = self.totals(now);
        let within = (extras + 1) as f64 <= cfg.ratio * requests as f64;
        if self.in_flight < cfg.min_in_flight || within {
            self.in_flight += 1;
            let s = self.slot(now);
            s.2 = s.2.saturating_add(1);
            true
        } else {
            false
        }
    }

    /// An extra attempt ended.
    pub fn done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = SLOT_NANOS;

    fn cfg() -> RetryBudget {
        RetryBudget {
            ratio: 0.2,
            min_in_flight: 3,
        }
    }

    #[test]
    fn a_lone_sequential_client_can_always_retry() {
        let mut b = Budget::default();
        for i in 0..100 {
            b.request(i * S / 10);
            assert!(b.try_extra(i * S / 10, &cfg()));
            b.done();
        }
    }

    #[test]
    fn concurrent_extras_stay_within_the_ratio_beyond_the_floor() {
        let mut b = Budget::default();
        for _ in 0..100 {
            b.request(0);
        }
        let taken = (0..100).filter(|_| b.try_extra(0, &cfg())).count();
        assert_eq!(taken, 20);
        // None ended: nothing more, until requests come in.
        assert!(!b.try_extra(0, &cfg()));
        for _ in 0..5 {
            b.request(S);
        }
        assert!(b.try_extra(S, &cfg()));
        assert!(!b.try_extra(S, &cfg()));
    }

    #[test]
    fn the_window_forgets_after_ten_seconds() {
        let mut b = Budget::default();
        let zero = RetryBudget {
            ratio: 0.5,
            min_in_flight: 0,
        };
        for _ in 0..10 {
            b.request(0);
        }
        let taken = (0..10).filter(|_| b.try_extra(0, &zero)).count();
        assert_eq!(taken, 5);
        for _ in 0..5 {
            b.done();
        }
        // 11 s later the old requests and extras are gone.
        assert!(!b.try_extra(11 * S, &zero));
        b.request(11 * S);
        b.request(11 * S);
        assert!(b.try_extra(11 * S, &zero));
    }
}
