//! The live state of one region: health of each address (active checks), passive ejection,
//! requests in flight and a latency estimate (EWMA and a decaying log-bucket sketch for
//! percentiles). Lock-free; every method that depends on time takes `now` (nanoseconds on the
//! registry's clock), so the rules are tested without sleeps.

use crate::config::Outlier;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Latency sketch buckets: bucket `i` holds samples in `[100 us * 2^(i/4), 100 us * 2^((i+1)/4))`,
/// so 64 buckets reach 6.5 s at about 19% resolution.
const BUCKETS: usize = 64;
const BASE_MICROS: f64 = 100.0;
/// The sketch halves every bucket after this many samples, so it follows recent traffic.
const DECAY_EVERY: u32 = 512;
/// Samples needed before a percentile is trusted.
pub const MIN_SAMPLES: u32 = 20;
/// Weight of a new sample in the EWMA.
const EWMA_WEIGHT: f64 = 0.2;

/// Health of one address, from active checks.
#[derive(Debug)]
struct AddrHealth {
    healthy: AtomicBool,
}

#[derive(Debug)]
pub struct RegionState {
    addrs: Box<[AddrHealth]>,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: AtomicU64,
    in_flight: AtomicU32,
    next_addr: AtomicUsize,
    /// EWMA of latency in microseconds (f64 bits); 0 = no sample yet.
    ewma_micros: AtomicU64,
    sketch: [AtomicU32; BUCKETS],
    samples: AtomicU32,
    /// When the region last told us anything about its latency (an answer, or an attempt
    /// cancelled while waiting); 0 = never.
    observed_at: AtomicU64,
    /// Exchanges open now with its upstreams, by HTTP version.
    pub open: std::sync::Arc<crate::upstream::Open>,
}

impl RegionState {
    /// A region with `addresses` addresses (at least one slot), all healthy.
    pub fn new(addresses: usize) -> RegionState {
        RegionState {
            addrs: (0..addresses.max(1))
                .map(|_| AddrHealth {
                    healthy: AtomicBool::new(true),
                })
                .collect(),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            next_addr: AtomicUsize::new(0),
            ewma_micros: AtomicU64::new(0),
            sketch: std::array::from_fn(|_| AtomicU32::new(0)),
            samples: AtomicU32::new(0),
            observed_at: AtomicU64::new(0),
            open: Default::default(),
        }
    }

    pub fn addresses(&self) -> usize {
        self.addrs.len()
    }

    /// Any address passes its health checks.
    pub fn healthy(&self) -> bool {
        self.addrs.iter().any(|a| a.healthy.load(Ordering::Relaxed))
    }

    pub fn addr_healthy(&self, i: usize) -> bool {
        self.addrs
            .get(i)
            .is_some_and(|a| a.healthy.load(Ordering::Relaxed))
    }

    /// Healthy and not ejected: may receive traffic.
    pub fn available(&self, now: u64) -> bool {
        self.healthy() && now >= self.ejected_until.load(Ordering::Relaxed)
    }

    /// Nanoseconds of ejection left.
    pub fn ejected_for(&self, now: u64) -> u64 {
        self.ejected_until
            .load(Ordering::Relaxed)
            .saturating_sub(now)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// The next address to use: the healthy ones in turn (any, if none is healthy).
    pub fn pick_addr(&self) -> usize {
        let n = self.addrs.len();
        let start = self.next_addr.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.addr_healthy(i))
            .unwrap_or(start % n)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count an attempt in flight until the guard drops.
    pub fn enter(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// An answer that is not a failure: the failure streak ends, and after an ejection has
    /// run out, each success shortens the next one by a step.
    pub fn on_success(&self, now: u64) {
        self.observed_at.store(now.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.ejections.load(Ordering::Relaxed) > 0
            && now >= self.ejected_until.load(Ordering::Relaxed)
        {
            let _ = self
                .ejections
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                    Some(e.saturating_sub(1))
                });
        }
    }

    /// A failed attempt (5xx, connect error, timeout). Returns the ejection time when this
    /// failure ejects the region. With active checks, an ejected region also needs passing
    /// checks to come back.
    pub fn on_failure(&self, now: u64, outlier: &Outlier, checked: bool) -> Option<Duration> {
        if outlier.consecutive_failures == 0 {
            return None;
        }
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < outlier.consecutive_failures || now < self.ejected_until.load(Ordering::Relaxed)
        {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let base = outlier.base_ejection.get();
        let time = base
            .checked_mul(1u32 << n)
            .unwrap_or(outlier.max_ejection.get())
            .min(outlier.max_ejection.get());
        self.ejected_until
            .store(now + time.as_nanos() as u64, Ordering::Relaxed);
        if checked {
            for a in self.addrs.iter() {
                a.healthy.store(false, Ordering::Relaxed);
            }
        }
        Some(time)
    }

    /// Keep the region out of rotation until `d` from `now` (a rate-limit signal that speaks
    /// for this region only), without counting an ejection; an existing longer hold stays.
    pub fn hold(&self, now: u64, d: Duration) {
        let until = now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Set the health of address `i` from its active checks; whether it changed.
    pub fn set_addr_health(&self, i: usize, healthy: bool) -> bool {
        self.addrs
            .get(i)
            .is_some_and(|a| a.healthy.swap(healthy, Ordering::Relaxed) != healthy)
    }

    /// Record the time to a response head.
    pub fn record_latency(&self, d: Duration) {
        let micros = d.as_secs_f64() * 1e6;
        let _ = self
            .ewma_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old == 0.0 {
                    micros.max(1.0)
                } else {
                    old + EWMA_WEIGHT * (micros - old)
                };
                Some(new.to_bits())
            });
        self.sketch[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(DECAY_EVERY) {
            for b in &self.sketch {
                let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c / 2));
            }
        }
    }

    /// An attempt cancelled after `d` without an answer: its latency is at least `d`. Raises
    /// the EWMA (never lowers it), so a region that lost a hedge or race is not preferred for
    /// lack of samples; the percentile sketch takes only real answers.
    pub fn record_censored(&self, d: Duration, now: u64) {
        self.observed_at.store(now.max(1), Ordering::Relaxed);
        let micros = d.as_secs_f64() * 1e6;
        let _ = self
            .ewma_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                if micros <= old {
                    return None;
                }
                let new = if old == 0.0 {
                    micros.max(1.0)
                } else {
                    old + EWMA_WEIGHT * (micros - old)
                };
                Some(new.to_bits())
            });
    }

    /// The latency that ranks this region (microseconds): its EWMA, or 0 (unknown, so tried
    /// first) when it has never been observed or not for `stale_after` ns. A region passed
    /// over because it once looked slow is thus measured again now and then, instead of
    /// keeping that estimate for ever.
    pub fn rank_latency(&self, now: u64, stale_after: u64) -> u64 {
        let at = self.observed_at.load(Ordering::Relaxed);
        if at == 0 || now.saturating_sub(at) > stale_after {
            return 0;
        }
        self.ewma().map_or(0, |d| d.as_micros() as u64)
    }

    /// The latency estimate (EWMA); `None` before the first sample.
    pub fn ewma(&self) -> Option<Duration> {
        let micros = f64::from_bits(self.ewma_micros.load(Ordering::Relaxed));
        (micros > 0.0).then(|| Duration::from_secs_f64(micros / 1e6))
    }

    /// The `p`th percentile of recent latency (upper bound of its bucket); `None` with fewer
    /// than `MIN_SAMPLES` samples.
    pub fn percentile(&self, p: u8) -> Option<Duration> {
        self.sketch().map(|s| s.at(p))
    }

    /// A copy of the latency sketch, to read several percentiles of one moment; `None` with
    /// fewer than `MIN_SAMPLES` samples.
    pub fn sketch(&self) -> Option<Sketch> {
        let mut counts = [0u64; BUCKETS];
        for (c, b) in counts.iter_mut().zip(self.sketch.iter()) {
            *c = u64::from(b.load(Ordering::Relaxed));
        }
        let total: u64 = counts.iter().sum();
        (total >= u64::from(MIN_SAMPLES)).then_some(Sketch { counts, total })
    }
}

/// A snapshot of a region's latency sketch.
pub struct Sketch {
    counts: [u64; BUCKETS],
    total: u64,
}

impl Sketch {
    /// The `p`th percentile (upper bound of its bucket).
    pub fn at(&self, p: u8) -> Duration {
        let rank = (self.total * u64::from(p)).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(i);
            }
        }
        bucket_upper(BUCKETS - 1)
    }
}

/// An attempt counted in its region's in-flight number.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<RegionState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bucket_of(micros: f64) -> usize {
    if micros <= BASE_MICROS {
        return 0;
    }
    let i = (4.0 * (micros / BASE_MICROS).log2()).floor();
    (i as usize).min(BUCKETS - 1)
}

fn bucket_upper(i: usize) -> Duration {
    Duration::from_secs_f64(BASE_MICROS * 2f64.powf((i + 1) as f64 / 4.0) / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    const MS: u64 = 1_000_000;

    fn outlier() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection: HumanDuration::from_secs(1),
            max_ejection: HumanDuration::from_secs(4),
        }
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_time() {
        let s = RegionState::new(1);
        let o = outlier();
        assert_eq!(s.on_failure(0, &o, false), None);
        s.on_success(0);
        assert_eq!(s.on_failure(0, &o, false), None);
        assert_eq!(s.on_failure(0, &o, false), None);
        assert_eq!(s.on_failure(0, &o, false), Some(Duration::from_secs(1)));
        assert!(!s.available(999 * MS));
        assert!(s.available(1000 * MS));
        for _ in 0..2 {
            assert_eq!(s.on_failure(1000 * MS, &o, false), None);
        }
        assert_eq!(
            s.on_failure(1000 * MS, &o, false),
            Some(Duration::from_secs(2))
        );
        for _ in 0..3 {
            s.on_failure(3000 * MS, &o, false);
        }
        for _ in 0..3 {
            s.on_failure(7000 * MS, &o, false);
        }
        // Capped at max_ejection.
        assert_eq!(s.ejected_for(7000 * MS), 4000 * MS);
    }

    #[test]
    fn an_ejection_with_checks_waits_for_passing_checks() {
        let s = RegionState::new(2);
        let o = outlier();
        for _ in 0..3 {
            s.on_failure(0, &o, true);
        }
        assert!(!s.available(5000 * MS), "needs checks to pass");
        // The next round of checks (thresholds are the health check crate's) passes.
        assert!(s.set_addr_health(0, true));
        assert!(s.available(5000 * MS));
        assert!(!s.available(500 * MS), "still ejected");
    }

    #[test]
    fn unhealthy_addresses_are_passed_over_and_the_region_is_down_when_all_are() {
        let s = RegionState::new(2);
        assert!(!s.set_addr_health(0, true), "no change");
        assert!(s.set_addr_health(0, false));
        assert!(s.healthy(), "address 1 is still healthy");
        assert_eq!(s.pick_addr(), 1);
        assert_eq!(s.pick_addr(), 1);
        s.set_addr_health(1, false);
        assert!(!s.healthy());
        assert!(!s.available(0));
    }

    #[test]
    fn an_estimate_nobody_refreshed_goes_stale() {
        let s = RegionState::new(1);
        assert_eq!(s.rank_latency(0, 30_000 * MS), 0);
        s.record_latency(Duration::from_millis(40));
        s.on_success(1000 * MS);
        assert_eq!(s.rank_latency(2000 * MS, 30_000 * MS), 40_000);
        assert_eq!(s.rank_latency(31_001 * MS, 30_000 * MS), 0, "stale");
        s.record_censored(Duration::from_millis(100), 31_001 * MS);
        assert!(s.rank_latency(31_002 * MS, 30_000 * MS) > 40_000);
    }

    #[test]
    fn percentiles_follow_the_samples() {
        let s = RegionState::new(1);
        assert_eq!(s.percentile(95), None);
        for i in 0..1000u64 {
            let ms = if i % 20 == 0 { 1000 } else { 10 };
            s.record_latency(Duration::from_millis(ms));
        }
        let p50 = s.percentile(50).expect("enough samples");
        let p99 = s.percentile(99).expect("enough samples");
        assert!(p50 >= Duration::from_millis(10) && p50 < Duration::from_millis(13));
        assert!(p99 >= Duration::from_millis(1000) && p99 < Duration::from_millis(1200));
        // 5% of samples are slow: p94 is fast, p96 is slow.
        assert!(s.percentile(94).expect("p94") < Duration::from_millis(13));
        assert!(s.percentile(96).expect("p96") >= Duration::from_millis(1000));
        let ewma = s.ewma().expect("ewma");
        assert!(ewma > Duration::from_millis(5), "{ewma:?}");
    }
}
