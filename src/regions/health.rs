//! Active health checks through `pingora-load-balancing`: each direct region of a host that
//! configures `health_check` is one `Backends` view (its addresses) on a `HealthRegistry` of
//! its own, probed by the crate's `HttpHealthCheck` (with the region's SNI and the host's
//! `Host`; 2xx or 3xx passes) or `TcpHealthCheck` (no path). The crate owns the probe and the
//! consecutive-result thresholds; a registry is kept across reloads while its host, region
//! and check settings stay, so health survives a reload. One background service drives the
//! checks of whatever hosts the current generation holds and mirrors each address's health
//! into the region state that requests read. `via` regions are checked passively only.

use super::{HostRegions, Region};
use crate::config::HealthCheckConfig;
use pingora_core::connectors::http::Connector as HttpConnector;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::discovery::Static;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::{Backend, Backends, HealthRegistry};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the manager looks for checks that are due.
const TICK: Duration = Duration::from_millis(50);

/// The checks of one region: its addresses as one view on its own registry.
pub struct RegionChecks {
    registry: Arc<HealthRegistry>,
    view: Backends,
    /// The region's addresses in config order, as the crate's backends.
    backends: Vec<Backend>,
    /// What the registry was built for (a reload with other settings builds a new one).
    built_for: (HealthCheckConfig, Option<bool>, Option<String>),
    /// The view's membership has been published (once, by the checker).
    published: AtomicBool,
}

impl std::fmt::Debug for RegionChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionChecks")
            .field("backends", &self.backends.len())
            .finish()
    }
}

impl RegionChecks {
    /// The checks of `region` of `host` (its `[hosts]` key); `previous` keeps its registry
    /// (and so its health) when built for the same settings.
    pub fn build(
        host: &str,
        region: &Region,
        cfg: &HealthCheckConfig,
        options: Option<&ConnectorOptions>,
        previous: Option<&RegionChecks>,
    ) -> RegionChecks {
        let built_for = (cfg.clone(), region.tls, region.sni.clone());
        let registry = match previous {
            Some(p) if p.built_for == built_for => p.registry.clone(),
            _ => {
                let r = Arc::new(HealthRegistry::new());
                r.set_health_check(check_for(host, region, cfg, options));
                r
            }
        };
        let backends: Vec<Backend> = region
            .addrs
            .iter()
            .map(|a| Backend {
                addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*a),
                weight: 1,
                ext: Default::default(),
            })
            .collect();
        let set: BTreeSet<Backend> = backends.iter().cloned().collect();
        let view = Backends::new_with_health_registry(Static::new(set), registry.clone());
        RegionChecks {
            registry,
            view,
            backends,
            built_for,
            published: AtomicBool::new(false),
        }
    }

    /// One round of checks; the health of each address, in config order.
    async fn run(&self) -> Vec<bool> {
        if !self.published.load(Ordering::Acquire) {
            match self.view.update(|_| {}).await {
                Ok(()) => self.published.store(true, Ordering::Release),
                Err(e) => tracing::warn!(error = %e, "health check membership not published"),
            }
        }
        self.view.run_health_check(true).await;
        self.backends.iter().map(|b| self.view.ready(b)).collect()
    }
}

/// The crate's check for one region: HTTP(S) GET of `cfg.path` with the host's `Host` and
/// the region's SNI, or a TCP (and TLS) connect when no path is set.
fn check_for(
    host: &str,
    region: &Region,
    cfg: &HealthCheckConfig,
    options: Option<&ConnectorOptions>,
) -> Box<dyn HealthCheck + Send + Sync> {
    let name = host_name(host);
    let tls = region
        .tls
        .unwrap_or_else(|| region.addrs.first().is_some_and(|a| a.port() == 443));
    let sni = region.sni.clone().unwrap_or_else(|| name.to_string());
    let timeout = Some(cfg.timeout.get());
    let (success, failure) = (cfg.healthy.max(1) as usize, cfg.unhealthy.max(1) as usize);
    let Some(path) = &cfg.path else {
        let mut check = TcpHealthCheck::new();
        check.consecutive_success = success;
        check.consecutive_failure = failure;
        check.peer_template.options.connection_timeout = timeout;
        check.peer_template.options.total_connection_timeout = timeout;
        check.set_connector(TransportConnector::new(options.cloned()));
        return check;
    };
    let mut check = HttpHealthCheck::new(name, tls);
    check.consecutive_success = success;
    check.consecutive_failure = failure;
    check.peer_template.sni = if tls { sni } else { String::new() };
    let o = &mut check.peer_template.options;
    o.connection_timeout = timeout;
    o.total_connection_timeout = timeout;
    o.read_timeout = timeout;
    o.write_timeout = timeout;
    check.set_connector(HttpConnector::new(options.cloned()));
    match probe_request(name, path) {
        Ok(req) => check.req = req,
        Err(e) => tracing::warn!(host, error = %e, "health check request; probing / instead"),
    }
    check.validator = Some(Box::new(|resp: &pingora_http::ResponseHeader| {
        let status = resp.status.as_u16();
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("health check status", status),
                format!("health check answered {status}"),
            )
        }
    }));
    Box::new(check)
}

fn probe_request(host: &str, path: &str) -> pingora_error::Result<RequestHeader> {
    let mut req = RequestHeader::build("GET", path.as_bytes(), None)?;
    req.insert_header(http::header::HOST, host)?;
    req.insert_header(http::header::USER_AGENT, "sluice-health-check")?;
    req.insert_header(http::header::CONNECTION, "close")?;
    Ok(req)
}

/// Start the checks that are due (each host's round runs on its own task); called by the
/// background service every `TICK`.
pub fn start_due(regions: &super::Regions) {
    let now = regions.now();
    for host in regions.all() {
        let Some(cfg) = host.health.clone() else {
            continue;
        };
        if now < host.next_check.load(Ordering::Relaxed)
            || host.checking.swap(true, Ordering::AcqRel)
        {
            continue;
        }
        host.next_check.store(
            now + cfg.interval.get().as_nanos() as u64,
            Ordering::Relaxed,
        );
        tokio::spawn(async move {
            check_host(&host).await;
            host.checking.store(false, Ordering::Release);
        });
    }
}

/// How often the background service looks for checks that are due.
pub const EVERY: Duration = TICK;

/// One round of checks of every direct region of `host`, at once; mirror the results into
/// the regions' state.
async fn check_host(host: &HostRegions) {
    let rounds = host
        .regions
        .iter()
        .filter_map(|r| r.checks.as_ref().map(|c| (r, c)))
        .map(|(region, checks)| async move { (region, checks.run().await) });
    for (region, health) in futures_util::future::join_all(rounds).await {
        apply(host, region, &health);
    }
}

fn apply(host: &HostRegions, region: &Region, health: &[bool]) {
    for (i, &healthy) in health.iter().enumerate() {
        if region.state.set_addr_health(i, healthy) {
            let addr = region
                .addrs
                .get(i)
                .map(|a| a.to_string())
                .unwrap_or_default();
            if healthy {
                tracing::info!(host = %host.host, region = %region.name, addr, "address passes its health checks again");
            } else {
                tracing::warn!(host = %host.host, region = %region.name, addr, "address failed its health checks");
            }
        }
    }
}

/// The host name of a `[hosts]` key (`name` or `name:port`).
fn host_name(key: &str) -> &str {
    match key.rsplit_once(':') {
        Some((name, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (name.ends_with(']') || !name.contains(':')) =>
        {
            name
        }
        _ => key,
    }
}
