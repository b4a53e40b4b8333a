//! A host's token budgets: for LLM APIs the binding limit is usually tokens per minute, not
//! requests. A host may have up to three budgets, each a bucket that holds at most its limit
//! and refills at its limit per minute: `tokens` (input and output together, OpenAI's TPM),
//! `input_tokens` and `output_tokens` (Anthropic's ITPM and OTPM). A budget is configured
//! (`tokens_per_minute`, ...) or learned from the upstream's `*-limit` headers.
//!
//! A request is charged its estimated cost when it is admitted and settled once its answer
//! told what it used: the difference goes back (or is taken). What the upstream says is left
//! (`*-remaining`) lowers a bucket that thinks it has more; a budget it says ran out is held
//! until its reset. Every value from an upstream is bounded before it is used.
//!
//! The state is one small mutex per host with a budget: only such hosts ever touch it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Largest budget, per minute, that configuration or an upstream may set.
pub const MAX_PER_MINUTE: u64 = 1_000_000_000;
const MINUTE_NS: f64 = 60e9;

/// Which budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Input and output tokens together.
    Tokens = 0,
    Input = 1,
    Output = 2,
}

impl Budget {
    pub const ALL: [Budget; 3] = [Budget::Tokens, Budget::Input, Budget::Output];

    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Tokens => "tokens",
            Budget::Input => "input_tokens",
            Budget::Output => "output_tokens",
        }
    }
}

/// Tokens a request is expected to use, or used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub input: u64,
    pub output: u64,
}

impl Cost {
    pub fn of(self, b: Budget) -> u64 {
        match b {
            Budget::Tokens => self.input.saturating_add(self.output),
            Budget::Input => self.input,
            Budget::Output => self.output,
        }
    }

    pub fn is_zero(self) -> bool {
        self.input == 0 && self.output == 0
    }

    fn add(self, o: Cost) -> Cost {
        Cost {
            input: self.input.saturating_add(o.input),
            output: self.output.saturating_add(o.output),
        }
    }

    fn sub(self, o: Cost) -> Cost {
        Cost {
            input: self.input.saturating_sub(o.input),
            output: self.output.saturating_sub(o.output),
        }
    }

    /// `self` scaled by `num / den` (an estimate of what part of a queue costs).
    pub fn share(self, num: u64, den: u64) -> Cost {
        let f = |v: u64| {
            u64::try_from(u128::from(v) * u128::from(num) / u128::from(den.max(1)))
                .unwrap_or(u64::MAX)
        };
        Cost {
            input: f(self.input),
            output: f(self.output),
        }
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost::add(self, o)
    }
}

impl std::ops::Sub for Cost {
    type Output = Cost;
    fn sub(self, o: Cost) -> Cost {
        Cost::sub(self, o)
    }
}

/// What one response's headers say about one budget, bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Told {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset: Option<Duration>,
}

impl Told {
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Tokens per minute; 0: no such budget.
    limit: u64,
    configured: bool,
    /// Tokens available at `at` (ns on the admission clock); below zero when answers used
    /// more than their estimates.
    level: f64,
    at: u64,
    /// The upstream said this budget ran out: none of it is used before this time.
    held_until: u64,
    /// What the upstream said last, and when its window resets.
    remaining: Option<u64>,
    reset_at: u64,
}

impl Bucket {
    fn level_at(&self, now: u64) -> f64 {
        let refill = now.saturating_sub(self.at) as f64 * self.limit as f64 / MINUTE_NS;
        (self.level + refill).min(self.limit as f64)
    }

    fn advance(&mut self, now: u64) {
        if now > self.at {
            self.level = self.level_at(now);
            self.at = now;
        }
    }

    /// When this bucket holds `need` tokens (`now` if it does).
    fn ready_at(&self, need: u64, now: u64) -> u64 {
        if self.limit == 0 || need == 0 {
            return now;
        }
        let from = now.max(self.held_until);
        let short = need as f64 - self.level_at(from);
        if short <= 0.0 {
            return from;
        }
        let ns = (short * MINUTE_NS / self.limit as f64).ceil();
        from.saturating_add(if ns.is_finite() { ns as u64 } else { u64::MAX })
    }

    fn set_limit(&mut self, limit: u64, now: u64) {
        let limit = limit.min(MAX_PER_MINUTE);
        self.advance(now);
        if self.limit == 0 {
            // A new budget starts full.
            self.level = limit as f64;
            self.at = now;
        }
        self.limit = limit;
        self.level = self.level.min(limit as f64);
    }
}

/// One budget as `/status` and metrics show it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub budget: Budget,
    pub limit_per_minute: u64,
    pub configured: bool,
    /// Tokens sluice counts as available now (negative: used beyond the estimates).
    pub available: f64,
    /// The upstream's last `remaining`, and the time left to its reset.
    pub remaining: Option<u64>,
    pub reset_in: Duration,
}

#[derive(Default)]
pub struct Tokens {
    buckets: Mutex<[Bucket; 3]>,
    /// Some budget applies (read without the lock on every request to the host).
    active: AtomicBool,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, [Bucket; 3]> {
        // Nothing panics while the lock is held.
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply the configured budgets (per minute, 0: none configured, learn it). A budget
    /// the configuration no longer names is forgotten until an upstream tells it again.
    pub fn configure(&self, limits: [u64; 3], now: u64) {
        let mut b = self.lock();
        for (bucket, limit) in b.iter_mut().zip(limits) {
            if limit > 0 {
                bucket.set_limit(limit, now);
                bucket.configured = true;
            } else if bucket.configured {
                *bucket = Bucket::default();
            }
        }
        self.note_active(&b);
    }

    /// The budgets' limits per minute (0: none): tokens, input, output.
    pub fn limits(&self) -> [u64; 3] {
        self.lock().map(|b| b.limit)
    }

    /// Does any budget apply?
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn note_active(&self, b: &[Bucket; 3]) {
        self.active
            .store(b.iter().any(|b| b.limit > 0), Ordering::Release);
    }

    /// The first budget `cost` alone is larger than (it could never be admitted), and its
    /// limit.
    pub fn too_large(&self, cost: Cost) -> Option<(Budget, u64)> {
        let b = self.lock();
        Budget::ALL
            .into_iter()
            .find(|k| {
                let l = b[*k as usize].limit;
                l > 0 && cost.of(*k) > l
            })
            .map(|k| (k, b[k as usize].limit))
    }

    /// When every budget holds what `cost` needs (`now` if they do).
    pub fn ready_at(&self, cost: Cost, now: u64) -> u64 {
        let b = self.lock();
        Budget::ALL
            .into_iter()
            .map(|k| b[k as usize].ready_at(cost.of(k), now))
            .max()
            .unwrap_or(now)
    }

    /// Take `cost` if every budget holds it now.
    pub fn try_take(&self, cost: Cost, now: u64) -> bool {
        let mut b = self.lock();
        let ready = Budget::ALL
            .into_iter()
            .all(|k| b[k as usize].ready_at(cost.of(k), now) <= now);
        if ready {
            take(&mut b, cost, now);
        }
        ready
    }

    /// Give back `charged` and take `used` instead (a request's answer told what it used).
    pub fn settle(&self, charged: Cost, used: Cost, now: u64) {
        let mut b = self.lock();
        for k in Budget::ALL {
            let bucket = &mut b[k as usize];
            if bucket.limit == 0 {
                continue;
            }
            bucket.advance(now);
            let delta = charged.of(k) as f64 - used.of(k) as f64;
            bucket.level = floored(bucket.level + delta, bucket.limit);
        }
    }

    /// Take in what a response's headers told of each budget: a learned limit (unless
    /// configured), and a `remaining` that lowers a bucket thinking it has more. A budget run
    /// out on a refusal (`refused`: a 429) is held until its reset: sluice's count was wrong,
    /// and the upstream's reset is the safe bet. On an answer, none is left now and the pace
    /// refills it (providers' resets are the time until the budget is *full*, far too long
    /// to wait). Returns the longest reset of the budgets reported run out that no limit
    /// covers (that is then the host's pause).
    pub fn observe(&self, told: &[Told; 3], refused: bool, now: u64) -> Option<Duration> {
        let mut b = self.lock();
        let mut uncovered: Option<Duration> = None;
        for (bucket, t) in b.iter_mut().zip(told) {
            if let (Some(limit), false) = (t.limit, bucket.configured) {
                if limit > 0 {
                    bucket.set_limit(limit, now);
                }
            }
            let reset_at = t.reset.map(|d| now.saturating_add(super::nanos(d)));
            if let Some(r) = t.remaining {
                bucket.remaining = Some(r);
                bucket.reset_at = reset_at.unwrap_or(now);
            }
            let Some(r) = t.remaining else { continue };
            if bucket.limit == 0 {
                if r == 0 {
                    let d = t.reset.unwrap_or(Duration::ZERO);
                    uncovered = Some(uncovered.map_or(d, |u| u.max(d)));
                }
                continue;
            }
            bucket.advance(now);
            bucket.level = bucket.level.min(r as f64);
            if r == 0 && refused {
                if let Some(at) = reset_at {
                    bucket.held_until = bucket.held_until.max(at);
                }
            }
        }
        self.note_active(&b);
        uncovered
    }

    pub fn views(&self, now: u64) -> Vec<View> {
        let b = self.lock();
        Budget::ALL
            .into_iter()
            .filter(|k| b[*k as usize].limit > 0)
            .map(|k| {
                let bucket = &b[k as usize];
                View {
                    budget: k,
                    limit_per_minute: bucket.limit,
                    configured: bucket.configured,
                    available: if now < bucket.held_until {
                        bucket.level.min(0.0)
                    } else {
                        bucket.level_at(now)
                    },
                    remaining: bucket.remaining,
                    reset_in: Duration::from_nanos(bucket.reset_at.saturating_sub(now)),
                }
            })
            .collect()
    }
}

fn take(b: &mut [Bucket; 3], cost: Cost, now: u64) {
    for k in Budget::ALL {
        let bucket = &mut b[k as usize];
        if bucket.limit > 0 {
            bucket.advance(now);
            bucket.level = floored(bucket.level - cost.of(k) as f64, bucket.limit);
        }
    }
}

/// A level within [-limit, limit]: whatever an answer claims it used, a budget is in debt
/// by at most one minute's worth.
fn floored(level: f64, limit: u64) -> f64 {
    level.clamp(-(limit as f64), limit as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cost(input: u64, output: u64) -> Cost {
        Cost { input, output }
    }

    #[test]
    fn a_budget_starts_full_and_refills_at_its_limit_per_minute() {
        let t = Tokens::default();
        t.configure([600, 0, 0], 0);
        assert!(t.try_take(cost(400, 100), 0));
        assert!(!t.try_take(cost(100, 50), 0), "100 left");
        // 50 more are needed: 600 a minute is 10 a second.
        assert_eq!(t.ready_at(cost(100, 50), 0), 5 * S);
        assert!(t.try_take(cost(100, 50), 5 * S));
        // Never above the limit, however long idle.
        assert_eq!(t.ready_at(cost(600, 0), 5 * S), 65 * S);
        assert_eq!(t.too_large(cost(500, 101)), Some((Budget::Tokens, 600)));
        assert_eq!(t.too_large(cost(500, 100)), None);
    }

    #[test]
    fn settling_gives_back_what_the_estimate_overcharged_and_takes_what_it_missed() {
        let t = Tokens::default();
        t.configure([1000, 0, 0], 0);
        assert!(t.try_take(cost(300, 500), 0));
        t.settle(cost(300, 500), cost(280, 120), 0);
        assert_eq!(t.views(0)[0].available, 600.0);
        // Used more than charged: the bucket goes below zero and the next waits for it.
        t.settle(cost(0, 0), cost(0, 700), 0);
        assert_eq!(t.views(0)[0].available, -100.0);
        assert_eq!(t.ready_at(cost(50, 0), 0), 9 * S);
        // Never more than the limit back.
        t.settle(cost(5000, 0), cost(0, 0), 0);
        assert_eq!(t.views(0)[0].available, 1000.0);
        // And never more than a minute's worth in debt, whatever an answer claims.
        t.settle(cost(0, 0), cost(0, 1_000_000_000), 0);
        assert_eq!(t.views(0)[0].available, -1000.0);
        assert_eq!(t.ready_at(cost(1, 0), 0), 60 * S + 60_000_000);
    }

    #[test]
    fn input_and_output_budgets_each_hold_their_part() {
        let t = Tokens::default();
        t.configure([0, 600, 60], 0);
        assert!(t.try_take(cost(100, 60), 0));
        // Input has plenty, output none: one output token a second.
        assert_eq!(t.ready_at(cost(100, 10), 0), 10 * S);
        assert_eq!(t.ready_at(cost(100, 0), 0), 0);
        assert_eq!(t.too_large(cost(10, 61)), Some((Budget::Output, 60)));
    }

    #[test]
    fn upstream_remaining_lowers_the_bucket_and_an_empty_budget_waits_for_its_reset() {
        let t = Tokens::default();
        let told = |limit, remaining, reset: u64| Told {
            limit,
            remaining,
            reset: Some(Duration::from_secs(reset)),
        };
        // Learned from a limit header: full, then what the upstream says is left.
        let none = Told::default();
        assert_eq!(
            t.observe(&[told(Some(6000), Some(4000), 20), none, none], false, 0),
            None
        );
        let v = t.views(0);
        assert_eq!((v[0].limit_per_minute, v[0].available), (6000, 4000.0));
        assert!(!v[0].configured);
        // Run out on an answer: none now, refilled at the pace (the reset is the time until
        // full).
        t.observe(&[told(Some(6000), Some(0), 30), none, none], false, 0);
        assert_eq!(t.ready_at(cost(100, 0), 0), S);
        // Run out on a refusal: held until the reset even though the pace would refill
        // sooner.
        let held = t.observe(&[told(Some(6000), Some(0), 30), none, none], true, 0);
        assert_eq!(held, None, "the budget holds them, not a host pause");
        assert_eq!(t.ready_at(cost(10, 0), 0), 30 * S);
        // It refilled at its pace meanwhile; an upstream claiming more than the bucket holds
        // does not raise it, one claiming less lowers it.
        t.observe(&[told(None, Some(6000), 1), none, none], false, 31 * S);
        assert_eq!(t.views(31 * S)[0].available, 3100.0);
        t.observe(&[told(None, Some(200), 1), none, none], false, 31 * S);
        assert_eq!(t.views(31 * S)[0].available, 200.0);
        // A budget run out with no limit known is the host's pause.
        let u = Tokens::default();
        assert_eq!(
            u.observe(
                &[none, told(None, Some(0), 7), told(None, Some(0), 9)],
                false,
                0
            ),
            Some(Duration::from_secs(9))
        );
        assert!(!u.active());
    }

    #[test]
    fn a_configured_budget_is_not_overridden_by_headers_and_is_forgotten_when_removed() {
        let t = Tokens::default();
        t.configure([1000, 0, 0], 0);
        let told = Told {
            limit: Some(50),
            remaining: None,
            reset: None,
        };
        t.observe(&[told, Told::default(), Told::default()], false, 0);
        assert_eq!(t.views(0)[0].limit_per_minute, 1000);
        t.configure([0, 0, 0], 0);
        assert!(!t.active());
        t.observe(&[told, Told::default(), Told::default()], false, 0);
        assert_eq!(t.views(0)[0].limit_per_minute, 50);
        // Bounded.
        let huge = Told {
            limit: Some(u64::MAX),
            ..told
        };
        t.configure([0, 0, 0], 0);
        t.observe(&[huge, Told::default(), Told::default()], false, 0);
        assert_eq!(t.views(0)[0].limit_per_minute, MAX_PER_MINUTE);
    }
}
