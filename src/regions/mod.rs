//! A host's route: the regions `[hosts."name"] regions` configures, or, for any other host,
//! one implicit region made of its DNS answers (`implicit`). Each region has live state
//! (health, ejection, latency) carried across reloads by host and region name, and the route
//! says in which order a request tries them. Sending requests is `dispatch`'s job; probing is
//! `health`'s.

pub mod budget;
pub mod health;
mod implicit;
pub mod state;

pub use implicit::{HostRoute, IMPLICIT_REGION};

use crate::admission::Clock;
use crate::config::{HealthCheckConfig, RegionConfig};
use crate::generation::Generation;
use crate::target::Origin;
use arc_swap::ArcSwap;
use budget::Budget;
use state::RegionState;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

/// A latency estimate not refreshed for this long (ns) no longer ranks its region.
const STALE_AFTER: u64 = 30_000_000_000;

/// One region of a host, as configured, with its live state.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    /// Direct addresses (empty for a `via` region).
    pub addrs: Vec<SocketAddr>,
    /// TLS toward the region; `None`: as the request's scheme.
    pub tls: Option<bool>,
    pub sni: Option<String>,
    /// A sluice serving this region.
    pub via: Option<Origin>,
    pub state: Arc<RegionState>,
    /// Active health checks of its addresses (a host with `health_check`, direct regions).
    pub checks: Option<Arc<health::RegionChecks>>,
}

/// A configured host's regions, health check and retry budget.
#[derive(Debug)]
pub struct HostRegions {
    /// The `[hosts]` key.
    pub host: String,
    pub regions: Vec<Region>,
    pub health: Option<HealthCheckConfig>,
    pub budget: Arc<Mutex<Budget>>,
    /// When the next round of health checks is due (registry clock).
    pub next_check: AtomicU64,
    /// A round of checks is running.
    pub checking: AtomicBool,
    /// The implicit route of a host without configured regions: each "region" is one of
    /// its DNS answers, all named `default`, and the quota is always the host's.
    pub implicit: bool,
    /// When a request last used this route (registry clock): idle implicit routes are
    /// forgotten.
    pub used: AtomicU64,
}

impl HostRegions {
    /// Regions that may take traffic, best first: lowest latency estimate, then fewest in
    /// flight, then config order (regions without a latency sample yet come first, so each
    /// gets measured). `only` restricts and orders the choice (`Sluice-Regions`).
    pub fn order(&self, now: u64, only: Option<&[String]>) -> Vec<usize> {
        let mut picked: Vec<usize> = match only {
            Some(names) => names
                .iter()
                .filter_map(|n| {
                    self.regions
                        .iter()
                        .position(|r| r.name.eq_ignore_ascii_case(n))
                })
                .filter(|&i| self.regions[i].state.available(now))
                .collect(),
            None => (0..self.regions.len())
                .filter(|&i| self.regions[i].state.available(now))
                .collect(),
        };
        picked.dedup();
        if only.is_none() {
            picked.sort_by_key(|&i| {
                let s = &self.regions[i].state;
                (s.rank_latency(now, STALE_AFTER), s.in_flight(), i)
            });
        }
        picked
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name))
    }
}

/// Every configured host's regions, swapped as a whole on reload.
pub struct Regions {
    hosts: ArcSwap<HashMap<String, Arc<HostRegions>>>,
    /// How health checks connect (extra upstream CAs).
    options: Option<pingora_core::connectors::ConnectorOptions>,
    /// Kept implicit routes, by `host:port`.
    implicit: implicit::Kept,
    /// The clock of region state, read several times per request: admission's TSC clock, a
    /// few nanoseconds a read where the system clock costs a call into the vDSO.
    clock: Clock,
}

impl Regions {
    pub fn new(generation: &Generation) -> Regions {
        Regions::with_connector(generation, None)
    }

    /// As `new`, with health checks connecting with `options` (the upstream connector's).
    pub fn with_connector(
        generation: &Generation,
        options: Option<pingora_core::connectors::ConnectorOptions>,
    ) -> Regions {
        let r = Regions {
            hosts: ArcSwap::from_pointee(HashMap::new()),
            options,
            implicit: implicit::Kept::default(),
            clock: Clock::quanta(),
        };
        r.apply_generation(generation);
        r
    }

    /// Nanoseconds since the registry started: the clock of region state.
    #[inline]
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The regions of a `[hosts]` key, if it has any.
    pub fn get(&self, host: &str) -> Option<Arc<HostRegions>> {
        self.hosts.load().get(host).cloned()
    }

    /// Every host with regions.
    pub fn all(&self) -> Vec<Arc<HostRegions>> {
        let mut v: Vec<_> = self.hosts.load().values().cloned().collect();
        v.sort_by(|a, b| a.host.cmp(&b.host));
        v
    }

    /// Build the regions of a new generation. A region keeps its health, ejection and latency
    /// when its host, name and addresses are unchanged; a host keeps its retry budget.
    pub fn apply_generation(&self, generation: &Generation) {
        let old = self.hosts.load_full();
        let mut map = HashMap::new();
        for (name, o) in &generation.config.hosts {
            if o.regions.is_empty() {
                continue;
            }
            let key = name.to_ascii_lowercase();
            let previous = old.get(&key);
            let regions = o
                .regions
                .iter()
                .map(|rc| {
                    let region = build_region(rc, previous.and_then(|p| p.region(&rc.name)));
                    self.with_checks(&key, region, o.health_check.as_ref(), previous)
                })
                .collect();
            let host = HostRegions {
                host: key.clone(),
                regions,
                health: o.health_check.clone(),
                budget: previous.map_or_else(
                    || Arc::new(Mutex::new(Budget::default())),
                    |p| p.budget.clone(),
                ),
                next_check: AtomicU64::new(0),
                checking: AtomicBool::new(false),
                implicit: false,
                used: AtomicU64::new(0),
            };
            map.insert(key, Arc::new(host));
        }
        self.hosts.store(Arc::new(map));
    }
}

impl Regions {
    /// Give a direct region of a host with `health_check` its checks, keeping the health of
    /// the previous generation's region of that name when its check settings are the same.
    fn with_checks(
        &self,
        host: &str,
        mut region: Region,
        cfg: Option<&HealthCheckConfig>,
        previous: Option<&Arc<HostRegions>>,
    ) -> Region {
        let Some(cfg) = cfg.filter(|_| region.via.is_none() && !region.addrs.is_empty()) else {
            return region;
        };
        let before = previous
            .and_then(|p| p.region(&region.name))
            .and_then(|r| r.checks.as_deref());
        let checks = health::RegionChecks::build(host, &region, cfg, self.options.as_ref(), before);
        region.checks = Some(Arc::new(checks));
        region
    }
}

fn build_region(rc: &RegionConfig, previous: Option<&Region>) -> Region {
    let addrs: Vec<SocketAddr> = rc
        .address
        .iter()
        .chain(rc.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    let via = rc.via.as_deref().and_then(|v| Origin::parse(v).ok());
    let state = match previous {
        Some(p) if p.addrs == addrs && p.via == via => p.state.clone(),
        _ => Arc::new(RegionState::new(addrs.len())),
    };
    Region {
        name: rc.name.clone(),
        addrs,
        tls: rc.tls,
        sni: rc.sni.clone(),
        via,
        state,
        checks: None,
    }
}

/// Current health of a host's regions as JSON, for `/status`.
/// Upstream exchanges open now and connections opened, per host (configured, or without
/// regions and remembered: one that opened a connection is), for `/status`.
pub fn upstream_json(regions: &Regions) -> serde_json::Value {
    let mut hosts = regions.all();
    hosts.extend(regions.kept_implicit());
    let list: Vec<serde_json::Value> = hosts
        .iter()
        .map(|h| {
            let sum = crate::upstream::Open::default();
            for r in &h.regions {
                sum.add(&r.state.open);
            }
            let mut v = sum.json();
            v["host"] = serde_json::Value::from(h.host.as_str());
            v
        })
        .collect();
    serde_json::Value::Array(list)
}

pub fn status_json(regions: &Regions) -> serde_json::Value {
    let now = regions.now();
    let hosts: Vec<serde_json::Value> = regions
        .all()
        .iter()
        .map(|h| {
            let list: Vec<serde_json::Value> = h
                .regions
                .iter()
                .map(|r| {
                    let s = &r.state;
                    let sketch = s.sketch();
                    let ms = |d: Option<std::time::Duration>| {
                        d.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0)
                    };
                    serde_json::json!({
                        "name": r.name,
                        "via": r.via.as_ref().map(|o| o.host_port()),
                        "addresses": r.addrs.iter().enumerate().map(|(i, a)| serde_json::json!({
                            "address": a.to_string(),
                            "healthy": s.addr_healthy(i),
                        })).collect::<Vec<_>>(),
                        "healthy": s.healthy(),
                        "available": s.available(now),
                        "ejected_ms": s.ejected_for(now) / 1_000_000,
                        "ejections": s.ejections(),
                        "in_flight": s.in_flight(),
                        "upstream_streams": s.open.json(),
                        "latency_ewma_ms": ms(s.ewma()),
                        "latency_p50_ms": ms(sketch.as_ref().map(|k| k.at(50))),
                        "latency_p95_ms": ms(sketch.as_ref().map(|k| k.at(95))),
                        "latency_p99_ms": ms(sketch.as_ref().map(|k| k.at(99))),
                    })
                })
                .collect();
            serde_json::json!({
                "host": h.host,
                "health_check": h.health.as_ref().map(|c| serde_json::json!({
                    "path": c.path,
                    "interval": c.interval.to_string(),
                })),
                "regions": list,
            })
        })
        .collect();
    serde_json::Value::Array(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Outlier};
    use std::time::Duration;

    fn regions() -> Regions {
        let config = Config::parse(
            r#"
            [hosts."api.test"]
            regions = [
              { name = "a", address = "10.0.0.1:443" },
              { name = "b", address = "10.0.0.2:443" },
              { name = "c", address = "10.0.0.3:443" },
            ]
            "#,
        )
        .expect("valid");
        Regions::new(&Generation::build(1, config))
    }

    #[test]
    fn the_region_clock_counts_nanoseconds() {
        // Measured against the system's monotonic clock over the same stretch: raw TSC ticks
        // (a few per nanosecond) or microseconds would be far out.
        let r = regions();
        let (a, since) = (r.now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (b, took) = (r.now(), since.elapsed());
        let ratio = (b - a) as f64 / took.as_nanos() as f64;
        assert!(
            (0.8..1.25).contains(&ratio),
            "region clock / system clock = {ratio}"
        );
    }

    #[test]
    fn order_prefers_unmeasured_then_fastest_and_skips_ejected() {
        let r = regions();
        let h = r.get("api.test").expect("host");
        assert_eq!(h.order(0, None), vec![0, 1, 2]);
        let seen = |i: usize, ms: u64, at: u64| {
            h.regions[i].state.record_latency(Duration::from_millis(ms));
            h.regions[i].state.on_success(at);
        };
        seen(0, 50, 1);
        seen(1, 10, 1);
        assert_eq!(h.order(1, None), vec![2, 1, 0], "c has no sample yet");
        seen(2, 30, 1);
        assert_eq!(h.order(1, None), vec![1, 2, 0]);
        // 31 s on, only b and c were heard from again: a's old estimate is stale, so a
        // is tried first, to be measured again.
        let later = 31_000_000_000;
        seen(1, 10, later);
        seen(2, 30, later);
        assert_eq!(h.order(later, None), vec![0, 1, 2]);
        let o = Outlier::default();
        for _ in 0..o.consecutive_failures {
            h.regions[1].state.on_failure(0, &o, false);
        }
        assert_eq!(h.order(1, None), vec![2, 0]);
        let only = ["A".to_string(), "b".to_string(), "zz".to_string()];
        assert_eq!(h.order(1, Some(&only)), vec![0], "b is ejected, zz unknown");
    }

    #[test]
    fn state_survives_a_reload_that_keeps_the_region() {
        let r = regions();
        let h = r.get("api.test").expect("host");
        h.regions[0].state.record_latency(Duration::from_millis(7));
        let config = Config::parse(
            r#"
            [hosts."api.test"]
            regions = [
              { name = "a", address = "10.0.0.1:443" },
              { name = "b", address = "10.0.9.9:443" },
            ]
            "#,
        )
        .expect("valid");
        r.apply_generation(&Generation::build(2, config));
        let h2 = r.get("api.test").expect("host");
        assert!(Arc::ptr_eq(&h.regions[0].state, &h2.regions[0].state));
        assert!(!Arc::ptr_eq(&h.regions[1].state, &h2.regions[1].state));
        assert!(Arc::ptr_eq(&h.budget, &h2.budget));
        assert_eq!(h2.regions.len(), 2);
    }
}
