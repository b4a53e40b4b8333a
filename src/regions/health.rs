//! Active health checks: one background service probes every address of every region of the
//! hosts that configure `health_check`, on each host's interval, whatever set of hosts the
//! current generation holds (a reload adds or drops hosts without a restart). A probe is an
//! HTTP GET with the region's SNI and the host's `Host` (2xx or 3xx passes), or a TCP connect
//! when no path is set. `via` regions are checked passively only.

use super::{HostRegions, Region};
use crate::config::HealthCheckConfig;
use crate::state::Shared;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the manager looks for checks that are due.
const TICK: Duration = Duration::from_millis(50);

pub struct HealthChecker {
    shared: Arc<Shared>,
}

impl HealthChecker {
    pub fn new(shared: Arc<Shared>) -> HealthChecker {
        HealthChecker { shared }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = self.shared.regions.now();
            for host in self.shared.regions.all() {
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
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    check_host(&shared, &host, &cfg).await;
                    host.checking.store(false, Ordering::Release);
                });
            }
        }
    }
}

/// Probe every address of every direct region of `host` at once and apply the results.
async fn check_host(shared: &Shared, host: &HostRegions, cfg: &HealthCheckConfig) {
    let mut probes = Vec::new();
    for region in host.regions.iter().filter(|r| r.via.is_none()) {
        for (i, addr) in region.addrs.iter().enumerate() {
            probes.push(async move {
                let passed = probe(shared, host, region, *addr, cfg).await;
                (region, i, *addr, passed)
            });
        }
    }
    for (region, i, addr, result) in futures_util::future::join_all(probes).await {
        let passed = result.is_ok();
        if let Some(healthy) = region.state.check_result(i, passed, cfg) {
            let why = result.err().unwrap_or_default();
            if healthy {
                tracing::info!(host = %host.host, region = %region.name, %addr, "address passes its health checks again");
            } else {
                tracing::warn!(host = %host.host, region = %region.name, %addr, why, "address failed its health checks");
            }
        }
    }
}

/// One probe; `Err` says why it failed.
async fn probe(
    shared: &Shared,
    host: &HostRegions,
    region: &Region,
    addr: SocketAddr,
    cfg: &HealthCheckConfig,
) -> Result<(), String> {
    let timeout = cfg.timeout.get();
    let Some(path) = &cfg.path else {
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err(format!("connect: no answer within {timeout:?}")),
        };
    };
    let name = host_name(&host.host);
    let tls = region.tls.unwrap_or(addr.port() == 443);
    let sni = region.sni.clone().unwrap_or_else(|| name.to_string());
    let mut peer = HttpPeer::new(addr, tls, sni);
    peer.options.connection_timeout = Some(timeout);
    peer.options.total_connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    let exchange = async {
        let (mut session, _) = shared
            .upstream
            .get_http_session(&peer)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut req =
            RequestHeader::build("GET", path.as_bytes(), None).map_err(|e| e.to_string())?;
        req.insert_header(http::header::HOST, host.host.as_str())
            .map_err(|e| e.to_string())?;
        req.insert_header(http::header::USER_AGENT, "sluice-health-check")
            .map_err(|e| e.to_string())?;
        req.insert_header(http::header::CONNECTION, "close")
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| format!("send: {e}"))?;
        session
            .finish_request_body()
            .await
            .map_err(|e| format!("send: {e}"))?;
        session
            .read_response_header()
            .await
            .map_err(|e| format!("read: {e}"))?;
        let status = session.response_header().map_or(0, |h| h.status.as_u16());
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
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
