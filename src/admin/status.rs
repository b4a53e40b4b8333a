//! `GET /status`: what sluice knows now, as JSON (the live page at `/ui` draws it).

use crate::admission::{interval_of, rps_of, HostCell};
use crate::state::Shared;
use std::sync::Arc;

/// Most hosts `/status` lists one by one; the rest are only counted. Busy hosts come first.
const LISTED_HOSTS: usize = 200;

pub fn status_json(shared: &Shared) -> serde_json::Value {
    let generation = shared.generation();
    let config = &generation.config;
    let routes: Vec<_> = generation
        .routes
        .iter()
        .map(|r| {
            serde_json::json!({
                "prefix": r.prefix,
                "target": format!(
                    "{}://{}{}",
                    if r.origin.scheme.is_tls() { "https" } else { "http" },
                    r.origin.host_header(),
                    r.origin.base_path
                ),
            })
        })
        .collect();
    let mut known: Vec<String> = generation
        .routes
        .iter()
        .map(|r| r.origin.host_port())
        .chain(generation.resolve.keys().cloned())
        .collect();
    known.sort();
    known.dedup();
    let admission = &shared.admission;
    let now = admission.now();
    let host = |key: &str, cell: &HostCell| {
        let l = generation.limits(cell.profile());
        let paused_for_ms = cell.paused_until().saturating_sub(now) / 1_000_000;
        let rps = cell.rps();
        let configured_rps = rps_of(interval_of(l.rps));
        serde_json::json!({
            "host": key,
            "entry": cell.configured().then(|| generation.host_label(cell.profile())),
            "pace_rps": rps,
            "configured_rps": configured_rps,
            "burst": cell.burst(),
            "max_concurrent": cell.max_concurrent(),
            "configured_max_concurrent": l.max_concurrent,
            "learned": {
                "rps": (rps != configured_rps).then_some(rps),
                "max_concurrent": (cell.max_concurrent() != l.max_concurrent)
                    .then_some(cell.max_concurrent()),
            },
            "max_queue_wait_ms": l.max_queue_wait.get().as_millis() as u64,
            "queued": cell.queued(now),
            "in_flight": cell.in_flight(),
            "callers": callers(cell),
            "tokens": tokens(cell, now),
            "upstream_requests": cell.upstream_requests(now).map(|(limit, remaining, reset)| {
                serde_json::json!({
                    "limit": limit,
                    "remaining": remaining,
                    "reset_ms": reset.map(|r| r.as_millis() as u64),
                })
            }),
            "paused_for_ms": paused_for_ms,
            "pause_source": (paused_for_ms > 0)
                .then(|| cell.pause_origin().map(|o| o.as_str()))
                .flatten(),
            "used": true,
        })
    };
    let listed = admission.notable(LISTED_HOSTS);
    let mut hosts: Vec<_> = listed.iter().map(|(k, c)| host(k, c)).collect();
    // `[hosts]` entries not used yet, with the limits they will start from.
    for name in config.hosts.keys() {
        let lower = name.to_ascii_lowercase();
        let used = listed
            .iter()
            .any(|(k, _)| *k == lower || k.rsplit_once(':').is_some_and(|(h, _)| h == lower));
        if used || name.starts_with("*.") || hosts.len() >= LISTED_HOSTS {
            continue;
        }
        let (profile, _) = generation.profile_for(&lower, &lower);
        let l = generation.limits(profile);
        hosts.push(serde_json::json!({
            "host": lower,
            "entry": name,
            "pace_rps": rps_of(interval_of(l.rps)),
            "configured_rps": rps_of(interval_of(l.rps)),
            "burst": l.burst,
            "max_concurrent": l.max_concurrent,
            "configured_max_concurrent": l.max_concurrent,
            "learned": {"rps": null, "max_concurrent": null},
            "max_queue_wait_ms": l.max_queue_wait.get().as_millis() as u64,
            "queued": 0,
            "in_flight": 0,
            "callers": [],
            "tokens": crate::admission::TokenBudget::ALL
                .iter()
                .zip(l.token_budgets())
                .filter(|(_, limit)| *limit > 0)
                .map(|(b, limit)| serde_json::json!({
                    "budget": b.as_str(),
                    "model": null,
                    "limit_per_minute": limit,
                    "configured": true,
                    "available": limit,
                    "upstream_remaining": null,
                    "upstream_reset_ms": null,
                }))
                .collect::<Vec<_>>(),
            "paused_for_ms": 0,
            "pause_source": null,
            "used": false,
        }));
    }
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "config": {
            "file": shared.config_path.as_ref().map(|p| p.display().to_string()),
            "embedded_default": shared.config_path.is_none(),
            "generation": generation.number,
        },
        "listeners": {
            "proxy": config.server.listen,
            "admin": config.server.admin_listen,
        },
        "routes": routes,
        "known_hosts": known,
        "tunnels_active": shared.metrics.tunnels_active.get(),
        "defaults": {
            "rps": config.defaults.rps,
            "burst": config.defaults.burst,
            "max_concurrent": config.defaults.max_concurrent,
            "max_queue_wait_ms": config.defaults.max_queue_wait.get().as_millis() as u64,
        },
        "hosts_tracked": admission.len(),
        "hosts_listed": listed.len(),
        "shared": shared.fleet.as_ref().map_or_else(
            || serde_json::json!({"backend": "memory"}),
            |f| f.status(),
        ),
        "hosts": hosts,
        "regions": crate::regions::status_json(&shared.regions),
        "upstream_streams": shared.upstream.open.json(),
        "upstream_hosts": crate::regions::upstream_json(&shared.regions),
        "refusals": shared.metrics.refusals_by_code(),
        "intercept": intercept_json(shared),
        "jobs": shared.jobs.summary(),
        "instance": shared.instance,
    })
}

/// A host's token budgets: the limit per minute (configured for the host, or learned for a
/// model), what sluice counts as left, and what the upstream said last.
fn tokens(cell: &HostCell, now: u64) -> Vec<serde_json::Value> {
    cell.token_views(now)
        .into_iter()
        .map(|v| {
            serde_json::json!({
                "budget": v.budget.as_str(),
                "model": v.model.as_deref(),
                "limit_per_minute": v.limit_per_minute,
                "configured": v.configured,
                "available": v.available.floor() as i64,
                "upstream_remaining": v.remaining,
                "upstream_reset_ms": v.remaining.map(|_| v.reset_in.as_millis() as u64),
            })
        })
        .collect()
}

/// Cells of the hosts named exactly in `[hosts]` (bounded by the config, so safe as labels):
/// `name:port` entries directly, bare names on their HTTPS and HTTP ports.
pub fn configured_cells(shared: &Shared) -> Vec<(String, Arc<HostCell>)> {
    let generation = shared.generation();
    let mut out = Vec::new();
    for name in generation.config.hosts.keys() {
        if name.starts_with("*.") {
            continue;
        }
        let name = name.to_ascii_lowercase();
        let keys = if name.contains(':') {
            vec![name]
        } else {
            vec![format!("{name}:443"), format!("{name}:80")]
        };
        for key in keys {
            if let Some(cell) = shared.admission.get(&key) {
                out.push((key, cell));
            }
        }
    }
    out
}

/// Tunnels served by sluice, by result; when clients rejected sluice's certificate, what to
/// do about it.
fn intercept_json(shared: &Shared) -> serde_json::Value {
    let by_result = shared.metrics.intercept_by_result();
    let untrusted = by_result.get("untrusted_ca").copied().unwrap_or(0);
    let hint = (untrusted > 0).then(|| {
        format!(
            "clients rejected sluice's certificate {untrusted} times: they do not trust the \
             interception CA (intercept.ca_cert); `sluice ca init` prints how to make curl, \
             Python, Node.js and the system store trust it"
        )
    });
    serde_json::json!({ "tunnels": by_result, "hint": hint })
}

/// Callers listed per host in `/status`, busiest first.
const LISTED_CALLERS: usize = 10;

/// A contended host's queue by caller: who waits, and who holds places under a per-caller cap.
fn callers(cell: &HostCell) -> serde_json::Value {
    let lines = cell.room_if_any().map(|r| r.lines()).unwrap_or_default();
    lines
        .iter()
        .take(LISTED_CALLERS)
        .map(|l| {
            serde_json::json!({
                "caller": &*l.caller,
                "waiting": l.waiting,
                "in_flight": l.in_flight,
            })
        })
        .collect()
}
