//! The implicit route of a host without configured regions: one endpoint per DNS answer that
//! passed the egress filter, each with the state a region has (passive ejection, latency), so
//! that retries, hedges, races and ejection mean for such a host what they mean for one with
//! regions. Nothing is kept for a host until something needs remembering (a failure, a
//! duplicate); what is kept is bounded in count and forgotten when idle.

use super::budget::Budget;
use super::state::RegionState;
use super::{HostRegions, Region, Regions};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The region name of every endpoint of an implicit route (`Sluice-Region`, metric labels).
pub const IMPLICIT_REGION: &str = "default";

/// Most implicit routes kept at once; past it, a host behaves as one with nothing to remember
/// (DNS order, a fresh budget per request).
pub const MAX_KEPT: usize = 4096;

/// The route one request takes: a configured host's regions, or an implicit route.
pub struct HostRoute {
    pub host: Arc<HostRegions>,
}

type Map = papaya::HashMap<String, Arc<HostRegions>, foldhash::fast::RandomState>;

/// Implicit routes worth remembering, by `host:port`.
#[derive(Default)]
pub(super) struct Kept {
    map: Map,
}

impl Regions {
    /// The route of a host without configured regions over `addrs` (DNS order). A kept route
    /// is used while the DNS answer is the same; a changed answer keeps the state of the
    /// addresses still in it.
    pub fn implicit(&self, key: &str, addrs: &[SocketAddr]) -> HostRoute {
        let now = self.now();
        let map = self.implicit.map.pin();
        let Some(kept) = map.get(key) else {
            return HostRoute {
                host: Arc::new(build(key, addrs, None, now)),
            };
        };
        kept.used.store(now, Ordering::Relaxed);
        let same = kept.regions.len() == addrs.len()
            && kept
                .regions
                .iter()
                .zip(addrs)
                .all(|(r, a)| r.addrs.first() == Some(a));
        if same {
            return HostRoute { host: kept.clone() };
        }
        let host = Arc::new(build(key, addrs, Some(kept), now));
        map.insert(key.to_string(), host.clone());
        HostRoute { host }
    }

    /// Remember an implicit route (an address failed, or a duplicate drew on its budget), so
    /// the next request knows. Configured routes and routes already kept are left as they are.
    pub fn keep(&self, host: &Arc<HostRegions>) {
        if !host.implicit {
            return;
        }
        let map = self.implicit.map.pin();
        if map.get(host.host.as_str()).is_some() || map.len() >= MAX_KEPT {
            return;
        }
        host.used.store(self.now(), Ordering::Relaxed);
        map.insert(host.host.clone(), host.clone());
    }

    /// Forget implicit routes unused for `ttl`; returns how many.
    pub fn evict_idle(&self, ttl: Duration) -> usize {
        let now = self.now();
        let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        let map = self.implicit.map.pin();
        let before = map.len();
        map.retain(|_, h| now.saturating_sub(h.used.load(Ordering::Relaxed)) < ttl);
        before.saturating_sub(map.len())
    }

    /// Implicit routes kept now.
    pub fn kept_implicit(&self) -> Vec<Arc<HostRegions>> {
        let map = self.implicit.map.pin();
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.host.cmp(&b.host));
        v
    }
}

/// An implicit route over `addrs`, taking over the state of `previous`'s addresses.
fn build(key: &str, addrs: &[SocketAddr], previous: Option<&HostRegions>, now: u64) -> HostRegions {
    let regions = addrs
        .iter()
        .map(|a| {
            let state = previous
                .and_then(|p| p.regions.iter().find(|r| r.addrs.first() == Some(a)))
                .map_or_else(|| Arc::new(RegionState::new(1)), |r| r.state.clone());
            Region {
                name: IMPLICIT_REGION.to_string(),
                addrs: vec![*a],
                tls: None,
                sni: None,
                via: None,
                state,
                checks: None,
            }
        })
        .collect();
    HostRegions {
        host: key.to_string(),
        regions,
        health: None,
        budget: previous.map_or_else(
            || Arc::new(Mutex::new(Budget::default())),
            |p| p.budget.clone(),
        ),
        next_check: AtomicU64::new(0),
        checking: AtomicBool::new(false),
        implicit: true,
        used: AtomicU64::new(now),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::generation::Generation;
    use crate::regions::Regions;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().expect("addr")).collect()
    }

    #[test]
    fn nothing_is_kept_until_asked_and_state_follows_the_addresses() {
        let r = Regions::new(&Generation::build(1, Config::default()));
        let two = addrs(&["10.0.0.1:443", "10.0.0.2:443"]);
        let a = r.implicit("api.test:443", &two);
        assert_eq!(a.host.regions.len(), 2);
        assert!(
            r.kept_implicit().is_empty(),
            "nothing kept for a quiet host"
        );
        let b = r.implicit("api.test:443", &two);
        assert!(!Arc::ptr_eq(&a.host, &b.host));
        r.keep(&a.host);
        let c = r.implicit("api.test:443", &two);
        assert!(Arc::ptr_eq(&a.host, &c.host), "a kept route is reused");
        // DNS now answers 10.0.0.2 and 10.0.0.3: .2 keeps its state, .3 starts fresh.
        let d = r.implicit("api.test:443", &addrs(&["10.0.0.2:443", "10.0.0.3:443"]));
        assert!(Arc::ptr_eq(
            &d.host.regions[0].state,
            &a.host.regions[1].state
        ));
        assert!(Arc::ptr_eq(&d.host.budget, &a.host.budget));
        assert_eq!(r.kept_implicit().len(), 1);
        assert_eq!(r.evict_idle(Duration::from_secs(3600)), 0);
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        assert!(r.kept_implicit().is_empty());
    }
}
