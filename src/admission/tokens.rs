//! A host's token budgets: for LLM APIs the binding limit is usually tokens per minute, not
//! requests. A budget is a bucket that holds at most its limit and refills at its limit per
//! minute, of one of three kinds: `tokens` (input and output together, OpenAI's TPM),
//! `input_tokens` and `output_tokens` (Anthropic's ITPM and OTPM). A host's configured
//! budgets (`tokens_per_minute`, ...) apply to all its requests; budgets learned from the
//! upstream's `*-limit` headers apply to the requests for the model they were learned from
//! (providers limit each model on its own).
//!
//! A request is charged its estimated cost when it is admitted and settled once its answer
//! told what it used: the difference goes back (or is taken). What the upstream says is left
//! (`*-remaining`) lowers a bucket that thinks it has more; a budget it says ran out is held
//! until its reset. Every value from an upstream is bounded before it is used.
//!
//! The state is one small mutex per host with a budget: only such hosts ever touch it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest budget, per minute, that configuration or an upstream may set.
pub const MAX_PER_MINUTE: u64 = crate::config::MAX_TOKENS_PER_MINUTE;
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

/// Tokens a request is expected to use, or used, and the model they are for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub input: u64,
    pub output: u64,
    /// The model's id ([`model_id`]; 0: none named): whose learned budgets apply. Not an
    /// amount: sums keep the model of the cost added last.
    pub model: u64,
}

/// A model's id: the same on every node running the same sluice.
pub fn model_id(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    h.finish().max(1)
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

    /// `self` scaled by `num / den` (an estimate of what part of a queue costs).
    pub fn share(self, num: u64, den: u64) -> Cost {
        let f = |v: u64| {
            u64::try_from(u128::from(v) * u128::from(num) / u128::from(den.max(1)))
                .unwrap_or(u64::MAX)
        };
        Cost {
            input: f(self.input),
            output: f(self.output),
            model: self.model,
        }
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            input: self.input.saturating_add(o.input),
            output: self.output.saturating_add(o.output),
            model: o.model,
        }
    }
}

impl std::ops::Sub for Cost {
    type Output = Cost;
    fn sub(self, o: Cost) -> Cost {
        Cost {
            input: self.input.saturating_sub(o.input),
            output: self.output.saturating_sub(o.output),
            model: self.model,
        }
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

    fn take(&mut self, n: u64, now: u64) {
        if self.limit > 0 {
            self.advance(now);
            self.level = floored(self.level - n as f64, self.limit);
        }
    }

    fn settle(&mut self, charged: u64, used: u64, now: u64) {
        if self.limit > 0 {
            self.advance(now);
            self.level = floored(self.level + charged as f64 - used as f64, self.limit);
        }
    }
}

/// A level within [-limit, limit]: whatever an answer claims it used, a budget is in debt
/// by at most one minute's worth.
fn floored(level: f64, limit: u64) -> f64 {
    level.clamp(-(limit as f64), limit as f64)
}

/// One budget as `/status` and metrics show it.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub budget: Budget,
    /// The model whose learned budget it is; `None`: the host's configured one.
    pub model: Option<Arc<str>>,
    pub limit_per_minute: u64,
    pub configured: bool,
    /// Tokens sluice counts as available now (negative: used beyond the estimates).
    pub available: f64,
    /// The upstream's last `remaining`, and the time left to its reset.
    pub remaining: Option<u64>,
    pub reset_in: Duration,
}

/// The limits (per minute; 0: none) of the budgets that apply to one model's requests: the
/// host's configured ones, and the model's learned ones (with the model's id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub host: [u64; 3],
    pub model: Option<(u64, [u64; 3])>,
}

/// Models a host learns budgets for; the least recently used is forgotten past this.
const MAX_MODELS: usize = 16;

struct Learned {
    name: Arc<str>,
    buckets: [Bucket; 3],
    used_at: u64,
}

#[derive(Default)]
struct State {
    /// The host's configured budgets.
    host: [Bucket; 3],
    /// Budgets learned from the upstream's headers, per model (providers limit each model
    /// on its own).
    models: HashMap<u64, Learned>,
    /// What the upstream said last of its request budget, and when.
    requests: Option<(Told, u64)>,
}

impl State {
    /// Whose learned budgets apply to `model`'s requests: its own, else those learned from
    /// answers to requests whose model was not known (the first ones to a host, sent before
    /// it had a budget), until its own are learned.
    fn learned_for(&self, model: u64) -> Option<u64> {
        [model, 0].into_iter().find(|m| self.models.contains_key(m))
    }

    /// Every bucket that applies to `model`'s requests, with its budget.
    fn each(&mut self, model: u64) -> impl Iterator<Item = (Budget, &mut Bucket)> {
        let learned = self
            .learned_for(model)
            .and_then(|m| self.models.get_mut(&m))
            .map(|m| m.buckets.iter_mut())
            .into_iter()
            .flatten();
        Budget::ALL
            .into_iter()
            .cycle()
            .zip(self.host.iter_mut().chain(learned))
            .filter(|(_, b)| b.limit > 0)
    }
}

#[derive(Default)]
pub struct Tokens {
    state: Mutex<State>,
    /// Some budget applies (read without the lock on every request to the host).
    active: AtomicBool,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while the lock is held.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_active(&self, st: &State) {
        let any = st.host.iter().any(|b| b.limit > 0) || !st.models.is_empty();
        self.active.store(any, Ordering::Release);
    }

    /// Apply the configured budgets (per minute, 0: none). They apply to every request to
    /// the host, whatever its model, besides the budgets learned for its model.
    pub fn configure(&self, limits: [u64; 3], now: u64) {
        let mut st = self.lock();
        for (bucket, limit) in st.host.iter_mut().zip(limits) {
            if limit > 0 {
                bucket.set_limit(limit, now);
            } else {
                *bucket = Bucket::default();
            }
        }
        self.note_active(&st);
    }

    /// The limits of the budgets that apply to `model`'s requests.
    pub fn limits(&self, model: u64) -> Limits {
        let st = self.lock();
        Limits {
            host: st.host.map(|b| b.limit),
            model: st
                .learned_for(model)
                .and_then(|id| st.models.get(&id).map(|m| (id, m.buckets.map(|b| b.limit)))),
        }
    }

    /// Does any budget apply?
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The first budget `cost` alone is larger than (it could never be admitted), and its
    /// limit.
    pub fn too_large(&self, cost: Cost) -> Option<(Budget, u64)> {
        let mut st = self.lock();
        let found = st
            .each(cost.model)
            .find(|(k, b)| cost.of(*k) > b.limit)
            .map(|(k, b)| (k, b.limit));
        found
    }

    /// When every budget that applies holds what `cost` needs (`now` if they do).
    pub fn ready_at(&self, cost: Cost, now: u64) -> u64 {
        let mut st = self.lock();
        let at = st
            .each(cost.model)
            .map(|(k, b)| b.ready_at(cost.of(k), now))
            .max()
            .unwrap_or(now);
        at
    }

    /// Take `cost` if every budget that applies holds it now.
    pub fn try_take(&self, cost: Cost, now: u64) -> bool {
        let mut st = self.lock();
        let ready = st
            .each(cost.model)
            .all(|(k, b)| b.ready_at(cost.of(k), now) <= now);
        if ready {
            for (k, b) in st.each(cost.model) {
                b.take(cost.of(k), now);
            }
            if let Some(m) = st.models.get_mut(&cost.model) {
                m.used_at = now;
            }
        }
        ready
    }

    /// Give back `charged` and take `used` instead (a request's answer told what it used).
    pub fn settle(&self, charged: Cost, used: Cost, now: u64) {
        let mut st = self.lock();
        for (k, b) in st.each(charged.model) {
            b.settle(charged.of(k), used.of(k), now);
        }
    }

    /// Take in what the headers of an answer to a request for `model` (`name`) told of each
    /// budget: a learned limit for that model, and a `remaining` that lowers its bucket if
    /// it thinks it has more. A budget run out on a refusal (`refused`: a 429) is held until
    /// its reset: sluice's count was wrong, and the upstream's reset is the safe bet. On an
    /// answer, none is left now and the pace refills it (providers' resets are the time until
    /// the budget is *full*, far too long to wait). Returns the longest reset of the budgets
    /// reported run out that no limit covers (that is then the host's pause).
    pub fn observe(
        &self,
        told: &[Told; 3],
        refused: bool,
        model: u64,
        name: Option<&str>,
        now: u64,
    ) -> Option<Duration> {
        let mut st = self.lock();
        if told.iter().any(|t| t.limit.is_some()) && !st.models.contains_key(&model) {
            if st.models.len() >= MAX_MODELS {
                let oldest = st
                    .models
                    .iter()
                    .min_by_key(|(_, m)| m.used_at)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    st.models.remove(&k);
                }
            }
            let name: Arc<str> = Arc::from(name.unwrap_or(if model == 0 { "(none)" } else { "?" }));
            st.models.insert(
                model,
                Learned {
                    name,
                    buckets: Default::default(),
                    used_at: now,
                },
            );
        }
        let mut uncovered: Option<Duration> = None;
        let State { host, models, .. } = &mut *st;
        let mut learned = models.get_mut(&model).map(|m| &mut m.buckets);
        for (k, t) in told.iter().enumerate() {
            if let (Some(b), Some(limit)) = (learned.as_mut(), t.limit.filter(|l| *l > 0)) {
                b[k].set_limit(limit, now);
            }
            let Some(r) = t.remaining else { continue };
            let reset_at = t.reset.map(|d| now.saturating_add(super::nanos(d)));
            // The model's learned bucket for this budget, else the host's configured one.
            let bucket = match learned.as_mut() {
                Some(b) if b[k].limit > 0 => &mut b[k],
                _ => &mut host[k],
            };
            bucket.remaining = Some(r);
            bucket.reset_at = reset_at.unwrap_or(now);
            if bucket.limit == 0 {
                if r == 0 {
                    let d = t.reset.unwrap_or(Duration::ZERO);
                    uncovered = Some(uncovered.map_or(d, |u| u.max(d)));
                }
                continue;
            }
            bucket.advance(now);
            bucket.level = bucket.level.min(r as f64);
            if let (0, true, Some(at)) = (r, refused, reset_at) {
                bucket.held_until = bucket.held_until.max(at);
            }
        }
        self.note_active(&st);
        uncovered
    }

    /// Note what an answer's headers said of the upstream's request budget.
    pub fn told_requests(&self, told: Told, now: u64) {
        self.lock().requests = Some((told, now));
    }

    /// The upstream's request budget as it last told it: its limit, what was left, and the
    /// time left to its reset.
    pub fn requests(&self, now: u64) -> Option<(Option<u64>, Option<u64>, Option<Duration>)> {
        let (t, at) = self.lock().requests?;
        let passed = Duration::from_nanos(now.saturating_sub(at));
        Some((
            t.limit,
            t.remaining,
            t.reset.map(|r| r.saturating_sub(passed)),
        ))
    }

    pub fn views(&self, now: u64) -> Vec<View> {
        let st = self.lock();
        let view = |k: Budget, b: &Bucket, model: Option<&Arc<str>>| View {
            budget: k,
            model: model.cloned(),
            limit_per_minute: b.limit,
            configured: model.is_none(),
            available: if now < b.held_until {
                b.level.min(0.0)
            } else {
                b.level_at(now)
            },
            remaining: b.remaining,
            reset_in: Duration::from_nanos(b.reset_at.saturating_sub(now)),
        };
        let mut out: Vec<View> = Budget::ALL
            .into_iter()
            .zip(&st.host)
            .filter(|(_, b)| b.limit > 0)
            .map(|(k, b)| view(k, b, None))
            .collect();
        let mut models: Vec<&Learned> = st.models.values().collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        for m in models {
            out.extend(
                Budget::ALL
                    .into_iter()
                    .zip(&m.buckets)
                    .filter(|(_, b)| b.limit > 0)
                    .map(|(k, b)| view(k, b, Some(&m.name))),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cost(input: u64, output: u64) -> Cost {
        Cost {
            input,
            output,
            model: 0,
        }
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

    fn told(limit: Option<u64>, remaining: Option<u64>, reset: u64) -> Told {
        Told {
            limit,
            remaining,
            reset: Some(Duration::from_secs(reset)),
        }
    }

    #[test]
    fn upstream_remaining_lowers_the_bucket_and_an_empty_budget_waits_for_its_reset() {
        let t = Tokens::default();
        // Learned from a limit header: full, then what the upstream says is left.
        let none = Told::default();
        let seen =
            |tokens: Told, refused, now| t.observe(&[tokens, none, none], refused, 0, None, now);
        assert_eq!(seen(told(Some(6000), Some(4000), 20), false, 0), None);
        let v = t.views(0);
        assert_eq!((v[0].limit_per_minute, v[0].available), (6000, 4000.0));
        assert!(!v[0].configured);
        // Run out on an answer: none now, refilled at the pace (the reset is the time until
        // full).
        seen(told(Some(6000), Some(0), 30), false, 0);
        assert_eq!(t.ready_at(cost(100, 0), 0), S);
        // Run out on a refusal: held until the reset even though the pace would refill
        // sooner.
        let held = seen(told(Some(6000), Some(0), 30), true, 0);
        assert_eq!(held, None, "the budget holds them, not a host pause");
        assert_eq!(t.ready_at(cost(10, 0), 0), 30 * S);
        // It refilled at its pace meanwhile; an upstream claiming more than the bucket holds
        // does not raise it, one claiming less lowers it.
        seen(told(None, Some(6000), 1), false, 31 * S);
        assert_eq!(t.views(31 * S)[0].available, 3100.0);
        seen(told(None, Some(200), 1), false, 31 * S);
        assert_eq!(t.views(31 * S)[0].available, 200.0);
        // A budget run out with no limit known is the host's pause.
        let u = Tokens::default();
        let told3 = [none, told(None, Some(0), 7), told(None, Some(0), 9)];
        assert_eq!(
            u.observe(&told3, false, 0, None, 0),
            Some(Duration::from_secs(9))
        );
        assert!(!u.active());
    }

    /// Providers limit each model on its own: a budget learned from an answer for one model
    /// applies to that model's requests; the host's configured budget to all of them.
    #[test]
    fn learned_budgets_are_each_models_and_configured_ones_the_hosts() {
        let t = Tokens::default();
        t.configure([100_000, 0, 0], 0);
        let (small, large) = (model_id("small-model"), model_id("large-model"));
        let limit = |l: u64| [told(Some(l), None, 0), Told::default(), Told::default()];
        t.observe(&limit(1_000), false, small, Some("small-model"), 0);
        t.observe(&limit(50_000), false, large, Some("large-model"), 0);
        let on = |input: u64, model: u64| Cost {
            input,
            output: 0,
            model,
        };
        // The small model's 1,000 does not hold the large one's requests.
        assert_eq!(t.too_large(on(5_000, large)), None);
        assert_eq!(t.too_large(on(5_000, small)), Some((Budget::Tokens, 1_000)));
        assert!(t.try_take(on(40_000, large), 0));
        assert!(t.try_take(on(900, small), 0));
        // The host's own budget counts both: 59,100 left of 100,000.
        let views = t.views(0);
        assert_eq!(views[0].model, None);
        assert_eq!(views[0].available, 100_000.0 - 40_900.0);
        let names: Vec<_> = views.iter().filter_map(|v| v.model.clone()).collect();
        assert_eq!(
            names,
            vec![Arc::from("large-model"), Arc::from("small-model")]
        );
        // Another model's remaining says nothing of this one's.
        let told0 = [
            told(Some(50_000), Some(0), 30),
            Told::default(),
            Told::default(),
        ];
        t.observe(&told0, true, large, Some("large-model"), 0);
        assert_eq!(t.ready_at(on(10, small), 0), 0);
        assert_eq!(t.ready_at(on(10, large), 0), 30 * S);
        // A request for a model with no learned budget: the host's only.
        assert!(t.try_take(on(50_000, model_id("other")), 0));
        assert_eq!(t.limits(small).model, Some((small, [1_000, 0, 0])));
        assert_eq!(t.limits(model_id("other")).model, None);
        // Learned from an answer to a request whose model was not known: it stands in for
        // every model until that model's own is learned.
        t.observe(&limit(2_000), false, 0, None, 0);
        assert_eq!(t.limits(model_id("other")).model, Some((0, [2_000, 0, 0])));
        assert_eq!(t.limits(small).model, Some((small, [1_000, 0, 0])));
    }

    #[test]
    fn budgets_are_bounded_and_models_few() {
        let t = Tokens::default();
        let huge = [
            told(Some(u64::MAX), None, 0),
            Told::default(),
            Told::default(),
        ];
        t.observe(&huge, false, 0, None, 0);
        assert_eq!(t.views(0)[0].limit_per_minute, MAX_PER_MINUTE);
        for i in 0..40u64 {
            let name = format!("model-{i}");
            let l = [told(Some(10), None, 0), Told::default(), Told::default()];
            t.observe(&l, false, model_id(&name), Some(&name), i);
        }
        assert_eq!(t.lock().models.len(), MAX_MODELS);
        // A configured budget removed by a reload is gone.
        t.configure([500, 0, 0], 0);
        assert!(t.views(0).iter().any(|v| v.configured));
        t.configure([0, 0, 0], 0);
        assert!(!t.views(0).iter().any(|v| v.configured));
    }
}
