//! Pure arithmetic of shared pacing: a node's lease of a share of a host's pace (what demand
//! it states, how often it renews, how it paces its share), how many tokens a node without a
//! lease takes from the fleet's bucket in one call, and a node's share of a host's limit while
//! the store is away.

use std::time::Duration;

/// A node that used a host's slots this many times within a second leases a share of its pace
/// (below that, each slot is asked of the fleet's bucket: cheap at that rate, and exact).
pub const LEASE_FROM_USES: u32 = 2;

/// Tokens a renewal should cover at the node's leased pace (fewer renewals per request as the
/// pace grows), within `RENEW_MIN`..`RENEW_MAX`.
const RENEW_COVERS: f64 = 64.0;
pub const RENEW_MIN: Duration = Duration::from_secs(1);
pub const RENEW_MAX: Duration = Duration::from_secs(5);

/// A node well short of its fair share (others hold it until they renew) asks again this soon.
pub const RENEW_SHORT: Duration = Duration::from_millis(250);

/// A node that used no slot of a host for this long gives its share back.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// A renewal sooner than this after the last one (asked by another node) states the same
/// demand: too few slots to measure.
pub const WINDOW_MIN: Duration = Duration::from_millis(500);

/// Most often a node renews because another node asked for its share.
pub const NUDGE_GAP: Duration = Duration::from_millis(250);

/// How often a node holding a lease at `rate` requests/s renews it.
pub fn renew_every(rate: f64) -> Duration {
    if !(rate.is_finite() && rate > 0.0) {
        return RENEW_MIN;
    }
    Duration::from_secs_f64(
        (RENEW_COVERS / rate).clamp(RENEW_MIN.as_secs_f64(), RENEW_MAX.as_secs_f64()),
    )
}

/// How long a lease renewed every `every` lasts: a missed renewal (a slow store) does not end
/// it, and a node that died frees its share within this.
pub fn lease_length(every: Duration) -> Duration {
    every * 2 + Duration::from_secs(1)
}

/// The demand a node states for a host whose pace is `pace`: it `used` slots in `window`, of
/// which `waited` had to wait for their slot (or were refused). A node whose requests nearly
/// all waited can use the whole pace (the fleet's max-min share decides what it gets); else
/// what it used, with room to grow.
pub fn demand(used: u32, waited: u32, window: Duration, pace: f64) -> f64 {
    let secs = window.as_secs_f64().max(0.001);
    let saturated = used >= LEASE_FROM_USES && u64::from(waited) * 10 >= u64::from(used) * 9;
    let d = if saturated {
        pace
    } else {
        f64::from(used) / secs * 1.2 + 1.0
    };
    d.min(pace).max(0.0)
}

/// The burst a node's lease of `rate` out of the host's `pace` and `burst` allows: its part
/// of the burst, at least one.
pub fn lease_burst(burst: u32, rate: f64, pace: f64) -> u32 {
    if !(pace > 0.0 && rate > 0.0) {
        return 1;
    }
    let b = (f64::from(burst) * (rate / pace).min(1.0)).floor();
    (b as u32).max(1)
}

/// Where this node's first slot falls after a pause, within its own interval: spread by its
/// place among the leases, so the fleet resumes at its pace rather than with one request from
/// every node at once.
pub fn resume_offset(rank: u32, leases: u32, rate: f64) -> Duration {
    if !(rate > 0.0 && rate.is_finite()) || leases == 0 {
        return Duration::ZERO;
    }
    let interval = 1.0 / rate;
    Duration::from_secs_f64(interval * f64::from(rank.min(leases)) / f64::from(leases))
}

/// Share of one second's worth of a host's pace that the whole fleet may hold in leases at
/// once: leased tokens are taken from the shared bucket before they are used, so this bounds
/// how far the fleet's total can drift from the limit.
pub const LEASE_SHARE: f64 = 0.05;

/// Most tokens one node takes in one call: its part (among `nodes`) of 5% of a second at the
/// host's pace, at least 1, and never more than the burst (the bucket cannot give more at once).
pub fn max_lease(rps: f64, burst: u32, nodes: u32) -> u32 {
    let per_node = rps * LEASE_SHARE / f64::from(nodes.max(1));
    let n = if per_node.is_finite() && per_node >= 1.0 {
        per_node.floor().min(f64::from(u32::MAX)) as u32
    } else {
        1
    };
    n.clamp(1, burst.max(1))
}

/// Tokens to ask for when `unmet` requests wait and no leased token is left: one per waiting
/// request, up to the lease (or always one when leases are off).
pub fn lease_size(unmet: usize, rps: f64, burst: u32, nodes: u32, leases: bool) -> u32 {
    if !leases {
        return 1;
    }
    let unmet = u32::try_from(unmet).unwrap_or(u32::MAX).max(1);
    unmet.min(max_lease(rps, burst, nodes))
}

/// A node's share of a host's pace and burst while the shared store is away.
pub fn local_share(rps: f64, burst: u32, nodes: u32) -> (f64, u32) {
    let nodes = nodes.max(1);
    let burst = burst.max(1).div_ceil(nodes).max(1);
    (rps / f64::from(nodes), burst)
}

/// Where a new lease's first slot falls: one step of its place among the leases into its own
/// interval, never at once (the fleet's bucket may just have given this node a token).
pub fn start_offset(rank: u32, leases: u32, rate: f64) -> Duration {
    if !(rate > 0.0 && rate.is_finite()) || leases == 0 {
        return Duration::ZERO;
    }
    let step = 1.0 / rate / f64::from(leases);
    Duration::from_secs_f64(step * f64::from(rank.min(leases - 1) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_host_is_leased_one_token_at_a_time() {
        assert_eq!(max_lease(10.0, 1, 3), 1);
        assert_eq!(max_lease(10.0, 50, 1), 1, "5% of 10/s is under one token");
        assert_eq!(lease_size(40, 10.0, 50, 1, true), 1);
    }

    #[test]
    fn leases_grow_with_demand_up_to_five_percent_split_among_nodes() {
        // 1000/s: the fleet may hold 50 tokens; each of 2 nodes up to 25.
        assert_eq!(max_lease(1000.0, 100, 2), 25);
        assert_eq!(lease_size(3, 1000.0, 100, 2, true), 3);
        assert_eq!(lease_size(500, 1000.0, 100, 2, true), 25);
        // Never beyond the burst.
        assert_eq!(lease_size(500, 1000.0, 10, 1, true), 10);
        // Leases off: one token per call.
        assert_eq!(lease_size(500, 1000.0, 100, 2, false), 1);
        // Demand of zero still asks for one (the caller only asks when someone waits).
        assert_eq!(lease_size(0, 1000.0, 100, 1, true), 1);
    }

    #[test]
    fn renewals_cover_many_tokens_within_bounds() {
        assert_eq!(
            renew_every(100.0),
            RENEW_MIN,
            "64 tokens at 100/s: under a second"
        );
        assert_eq!(renew_every(12.8), Duration::from_secs(5));
        assert_eq!(renew_every(32.0), Duration::from_secs(2));
        assert_eq!(renew_every(0.5), RENEW_MAX);
        assert_eq!(renew_every(0.0), RENEW_MIN);
        assert_eq!(renew_every(f64::NAN), RENEW_MIN);
        assert_eq!(lease_length(Duration::from_secs(2)), Duration::from_secs(5));
    }

    #[test]
    fn a_saturated_node_states_the_whole_pace_and_a_light_one_what_it_used() {
        let s = Duration::from_secs(1);
        assert_eq!(demand(20, 20, s, 100.0), 100.0);
        assert_eq!(demand(20, 18, s, 100.0), 100.0);
        // Most slots came without waiting: what was used, and a fifth more, and one.
        assert!((demand(20, 10, s, 100.0) - 25.0).abs() < 1e-9);
        assert!((demand(10, 0, Duration::from_secs(2), 100.0) - 7.0).abs() < 1e-9);
        // Never more than the pace; nothing used: one request a second.
        assert_eq!(demand(500, 0, s, 100.0), 100.0);
        assert_eq!(demand(0, 0, s, 100.0), 1.0);
        // One slot that waited is not saturation.
        assert!((demand(1, 1, s, 100.0) - 2.2).abs() < 1e-9);
    }

    #[test]
    fn a_lease_paces_its_part_of_the_burst_and_resumes_at_its_place() {
        assert_eq!(lease_burst(1, 12.5, 100.0), 1);
        assert_eq!(lease_burst(40, 25.0, 100.0), 10);
        assert_eq!(lease_burst(40, 0.0, 100.0), 1);
        assert_eq!(lease_burst(40, 200.0, 100.0), 40);
        assert_eq!(resume_offset(0, 3, 10.0), Duration::ZERO);
        assert_eq!(resume_offset(2, 4, 10.0), Duration::from_millis(50));
        assert_eq!(resume_offset(1, 0, 10.0), Duration::ZERO);
        assert_eq!(start_offset(0, 2, 10.0), Duration::from_millis(50));
        assert_eq!(start_offset(1, 2, 10.0), Duration::from_millis(100));
        assert_eq!(start_offset(0, 0, 10.0), Duration::ZERO);
    }

    #[test]
    fn local_share_divides_pace_and_burst() {
        assert_eq!(local_share(10.0, 1, 3).1, 1);
        assert!((local_share(10.0, 1, 3).0 - 10.0 / 3.0).abs() < 1e-9);
        assert_eq!(local_share(10.0, 5, 2), (5.0, 3));
        assert_eq!(
            local_share(10.0, 5, 0),
            (10.0, 5),
            "no count yet: the whole limit"
        );
        assert_eq!(max_lease(f64::INFINITY, 4, 1), 1);
    }
}
