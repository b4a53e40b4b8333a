//! Where an attempt's end is written down: the endpoint's state (latency, failures,
//! ejection, a region held out by its own quota), the attempt metrics, and what the answer
//! teaches admission. One recorder for every attempt of one request.

use super::{pace, Ctx};
use crate::config::Quota;
use crate::error::Code;
use crate::regions::HostRegions;
use crate::state::Shared;
use std::sync::Arc;
use std::time::Duration;

/// Where an attempt's end is written down: its endpoint's state (latency, failures,
/// ejection), the metrics, and what the host's answer teaches admission.
pub struct Recorder<'a> {
    pub shared: &'a Shared,
    pub host: &'a Arc<HostRegions>,
    /// The destination host's admission state, which responses teach.
    pub cell: &'a crate::admission::Host,
    pub label: &'a str,
    pub outlier: crate::config::Outlier,
    pub quota: Quota,
    /// The model the request asked for (token budgets are learned per model).
    pub model: Option<&'a Arc<str>>,
}

impl Recorder<'_> {
    /// A response head from `region`, `started` when the attempt began (on the clock of
    /// region state); returns its status and whether it paused the host.
    pub fn answered(
        &self,
        ctx: &Ctx,
        region: usize,
        session: &pingora_core::protocols::http::client::HttpSession,
        started: u64,
    ) -> (u16, bool) {
        let r = &self.host.regions[region];
        let head = session.response_header();
        let status = head.map_or(0, |h| h.status.as_u16());
        self.shared.metrics.record_region_attempt(
            self.label,
            &r.name,
            crate::metrics::status_class(status),
        );
        let mut paused = false;
        if let Some(h) = head {
            let host_quota = self.quota == Quota::Host;
            let model = self.model;
            match pace::learn(
                self.shared,
                self.cell,
                &ctx.generation,
                h,
                host_quota,
                model,
            ) {
                pace::PauseEffect::HostPaused => paused = pace::pause_signal(h),
                pace::PauseEffect::RegionPaused(d) => {
                    r.state.hold(self.shared.regions.now(), d);
                    tracing::info!(host = %self.host.host, region = %r.name, held_for = ?d,
                        "region paused by its own rate-limit signal (quota = \"region\")");
                }
                pace::PauseEffect::Nothing => {}
            }
        }
        if (500..600).contains(&status) {
            self.failed_in(region, false);
        } else {
            let now = self.shared.regions.now();
            r.state
                .record_latency(Duration::from_nanos(now.saturating_sub(started)));
            r.state.on_success(now);
        }
        (status, paused)
    }

    /// An attempt to `region` that ended in an error (`code`).
    pub fn failed(&self, region: usize, code: Code) {
        let r = &self.host.regions[region];
        self.shared
            .metrics
            .record_region_attempt(self.label, &r.name, code.as_str());
        let connect = matches!(
            code,
            Code::ConnectRefused | Code::ConnectTimeout | Code::ConnectFailed
        );
        self.failed_in(region, connect);
    }

    /// Count a failure against the endpoint; eject it after enough in a row. One DNS answer
    /// that refuses connections is out at once: the next request goes to another address
    /// instead of waiting for its connect to fail again.
    fn failed_in(&self, region: usize, connect: bool) {
        self.shared.regions.keep(self.host);
        let r = &self.host.regions[region];
        let now = self.shared.regions.now();
        let checked = self.host.health.is_some();
        let mut outlier = self.outlier;
        if connect && self.host.implicit && self.host.regions.len() > 1 {
            outlier.consecutive_failures = outlier.consecutive_failures.min(1);
        }
        if let Some(t) = r.state.on_failure(now, &outlier, checked) {
            self.shared
                .metrics
                .ejections
                .with_label_values(&[self.label, &r.name])
                .inc();
            tracing::warn!(
                host = %self.host.host,
                region = %r.name,
                address = ?self.host.implicit.then(|| r.addrs[0]),
                ejected_for = ?t,
                "endpoint ejected after consecutive failures"
            );
        }
    }
}
