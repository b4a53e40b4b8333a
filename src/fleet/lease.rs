//! Pure arithmetic of shared pacing: how many tokens a node takes from the fleet's bucket in
//! one call (its lease), and a node's share of a host's limit while the store is away.

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
