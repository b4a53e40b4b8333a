//! When extra attempts go: the hedge delay from an endpoint's latency sketch (robust to a
//! two-mode tail), and the backoff with jitter before a retry to an endpoint already tried.
//! Pure functions of their inputs.

use crate::regions::state::RegionState;
use std::time::Duration;

/// Hedge delay when the endpoint has too few latency samples for a percentile.
const HEDGE_FALLBACK: Duration = Duration::from_millis(500);
/// A slow mode holding up to this many percentile points more than the hedge percentile's
/// own tail still counts as a tail to hedge around (see `hedge_from_percentiles`).
const MAX_SLOW_MODE: u8 = 15;
/// Shortest hedge delay taken from a percentile.
const HEDGE_MIN: Duration = Duration::from_millis(1);
/// First backoff before a retry to an endpoint already tried; doubles, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// The hedge delay for percentile `p` of an endpoint's latency. When the latency has two
/// modes (most answers fast, a few far slower) and `p` falls in or at the edge of the slow
/// one, the `p`th percentile is the slow mode's latency and a hedge at it never helps; worse,
/// it locks in, since a hedge that never fires lets every slow answer into the sketch. So the
/// percentiles below `p` (down to `MAX_SLOW_MODE` points under it) are searched for the gap:
/// the first that is under half the `p`th is the near edge of the fast mode, and the delay.
/// In a continuous distribution no such drop exists over a few points, and `p` stands.
pub fn hedge_from_percentiles(state: &RegionState, p: u8) -> Duration {
    let Some(sketch) = state.sketch() else {
        return HEDGE_FALLBACK;
    };
    let hi = sketch.at(p);
    let floor = p.saturating_sub(MAX_SLOW_MODE).max(50);
    let delay = (floor..p)
        .rev()
        .map(|q| sketch.at(q))
        .find(|&lo| lo * 2 < hi)
        .unwrap_or(hi);
    delay.max(HEDGE_MIN)
}

/// Backoff before the `nth` extra attempt to one endpoint: 25 ms doubling, +-50% jitter.
pub fn backoff(nth: u32) -> Duration {
    if nth == 0 {
        return Duration::ZERO;
    }
    let base = BACKOFF_BASE.saturating_mul(1 << (nth - 1).min(6));
    base.mul_f64(0.5 + jitter_fraction())
}

/// A fraction in [0, 1) from the clock's low bits: enough to spread retries apart.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    mixed as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tail(slow_per_1000: usize) -> RegionState {
        let s = RegionState::new(1);
        // Spread evenly, so that the sketch's decay keeps the proportion.
        for i in 0..1000 {
            let ms = if (i * slow_per_1000) % 1000 < slow_per_1000 {
                1000
            } else {
                10
            };
            s.record_latency(Duration::from_millis(ms));
        }
        s
    }

    #[test]
    fn a_percentile_on_the_edge_of_a_gap_hedges_on_the_near_side() {
        // 5.2% slow: p95 is a slow sample by chance; p94 is fast.
        let d = hedge_from_percentiles(&with_tail(52), 95);
        assert!(d < Duration::from_millis(20), "{d:?}");
        // 4.8% slow: p95 is fast.
        let d = hedge_from_percentiles(&with_tail(48), 95);
        assert!(d < Duration::from_millis(20), "{d:?}");
        // 8% or 15% slow (a tail grown by chance or by a hedge that stopped firing): p95
        // sits inside the slow mode; the fast mode's edge below it is the delay.
        for slow in [80, 150] {
            let d = hedge_from_percentiles(&with_tail(slow), 95);
            assert!(d < Duration::from_millis(20), "{slow}: {d:?}");
        }
        // 30% slow is not a tail: the slow mode is the distribution, and p95 is in it.
        let d = hedge_from_percentiles(&with_tail(300), 95);
        assert!(d >= Duration::from_secs(1), "{d:?}");
        // Too few samples: the fallback.
        assert_eq!(
            hedge_from_percentiles(&RegionState::new(1), 95),
            HEDGE_FALLBACK
        );
    }

    #[test]
    fn a_continuous_distribution_uses_the_percentile_itself() {
        let s = RegionState::new(1);
        for i in 1..=1000u64 {
            s.record_latency(Duration::from_micros(1000 + i * 100));
        }
        let d = hedge_from_percentiles(&s, 95);
        let p95 = s.percentile(95).expect("p95");
        assert_eq!(d, p95);
    }
}
