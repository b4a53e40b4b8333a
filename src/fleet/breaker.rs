//! The circuit breaker in front of the shared store: a plain state machine that takes `now`
//! (nanoseconds on the admission clock) and never sleeps or reads a clock itself.
//!
//! closed -> open after `failure_threshold` consecutive failures; open -> half-open once
//! `recovery_timeout` has passed (on the next call asked for); half-open -> closed after
//! `success_threshold` successes, -> open again on any failure.

use crate::config::BreakerConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn from_u8(v: u8) -> BreakerState {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Breaker {
    state: BreakerState,
    failure_threshold: u32,
    success_threshold: u32,
    recovery_ns: u64,
    /// Consecutive failures while closed.
    failures: u32,
    /// Successes while half-open.
    successes: u32,
    /// When the breaker last opened.
    opened_at: u64,
}

impl Breaker {
    pub fn new(config: &BreakerConfig) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            failure_threshold: config.failure_threshold.max(1),
            success_threshold: config.success_threshold.max(1),
            recovery_ns: config.recovery_timeout.get().as_nanos() as u64,
            failures: 0,
            successes: 0,
            opened_at: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// May a call go to the store at `now`? An open breaker turns half-open here once its
    /// recovery timeout has passed.
    pub fn allow(&mut self, now: u64) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open => {
                if now.saturating_sub(self.opened_at) >= self.recovery_ns {
                    self.state = BreakerState::HalfOpen;
                    self.successes = 0;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A call succeeded.
    pub fn success(&mut self, _now: u64) {
        match self.state {
            BreakerState::Closed => self.failures = 0,
            BreakerState::HalfOpen => {
                self.successes += 1;
                if self.successes >= self.success_threshold {
                    self.state = BreakerState::Closed;
                    self.failures = 0;
                }
            }
            // A call let through before the breaker opened; it proves little.
            BreakerState::Open => {}
        }
    }

    /// A call failed or timed out.
    pub fn failure(&mut self, now: u64) {
        match self.state {
            BreakerState::Closed => {
                self.failures += 1;
                if self.failures >= self.failure_threshold {
                    self.open(now);
                }
            }
            BreakerState::HalfOpen => self.open(now),
            BreakerState::Open => {}
        }
    }

    fn open(&mut self, now: u64) {
        self.state = BreakerState::Open;
        self.opened_at = now;
        self.successes = 0;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    const S: u64 = 1_000_000_000;

    fn breaker() -> Breaker {
        Breaker::new(&BreakerConfig {
            failure_threshold: 3,
            recovery_timeout: HumanDuration::from_secs(30),
            success_threshold: 2,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = breaker();
        b.failure(0);
        b.failure(0);
        b.success(0);
        b.failure(0);
        b.failure(0);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.failure(S);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(S));
        assert!(
            !b.allow(S + 30 * S - 1),
            "still within the recovery timeout"
        );
    }

    #[test]
    fn half_opens_after_the_recovery_timeout_and_closes_after_successes() {
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(10 * S);
        }
        assert!(b.allow(40 * S));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.success(40 * S);
        assert_eq!(b.state(), BreakerState::HalfOpen, "one success of two");
        b.success(41 * S);
        assert_eq!(b.state(), BreakerState::Closed);
        // Closed again: it takes the full threshold to open.
        b.failure(42 * S);
        b.failure(42 * S);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn any_failure_in_half_open_opens_again_with_a_fresh_timeout() {
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(0);
        }
        assert!(b.allow(30 * S));
        b.success(30 * S);
        b.failure(31 * S);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(60 * S), "the timeout counts from the new opening");
        assert!(b.allow(61 * S));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn late_results_while_open_change_nothing() {
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(0);
        }
        b.success(S);
        b.failure(2 * S);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(
            b.allow(30 * S),
            "opened at 0, not moved by the late failure"
        );
    }
}
