//! The Prometheus registry sluice exports on the admin listener. Registered once at start,
//! passed down by `Arc`; every label value comes from a closed set (way in, error code, class).

mod callers;
mod tokens;

pub use callers::CallerMetrics;
pub use tokens::TokenMetrics;

use crate::error::Code;
use crate::generation::OTHER_HOST;
use crate::target::WayIn;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Outcome label when the upstream answered (whatever its status).
pub const OUTCOME_OK: &str = "ok";

/// `1xx` .. `5xx`.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[class_index(status)]
}

/// The status classes of `sluice_upstream_responses_total`, in [`class_index`] order.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Where `status`'s class is in [`STATUS_CLASSES`] (as [`status_class`] names it).
fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The protocols of `sluice_requests_by_protocol_total`: the client's, then the upstream's.
const CLIENT_PROTOCOLS: [&str; 2] = ["http/1.1", "h2"];
const UPSTREAM_PROTOCOLS: [&str; 3] = ["http/1.1", "h2", "none"];

/// Series whose labels are all fixed sets (the way in, a status class, a protocol): each is
/// looked up by label once, when the metrics are made, not on every request.
struct Hot {
    duration: [prometheus::Histogram; WayIn::ALL.len()],
    responses: [[prometheus::IntCounter; STATUS_CLASSES.len()]; WayIn::ALL.len()],
    protocols: [[prometheus::IntCounter; UPSTREAM_PROTOCOLS.len()]; CLIENT_PROTOCOLS.len()],
}

impl Hot {
    fn new(duration: &HistogramVec, responses: &IntCounterVec, protocols: &IntCounterVec) -> Hot {
        let way = |i: usize| WayIn::ALL[i].as_str();
        Hot {
            duration: std::array::from_fn(|w| duration.with_label_values(&[way(w)])),
            responses: std::array::from_fn(|w| {
                std::array::from_fn(|c| responses.with_label_values(&[way(w), STATUS_CLASSES[c]]))
            }),
            protocols: std::array::from_fn(|c| {
                std::array::from_fn(|u| {
                    protocols.with_label_values(&[CLIENT_PROTOCOLS[c], UPSTREAM_PROTOCOLS[u]])
                })
            }),
        }
    }
}

/// Where `way` is in [`WayIn::ALL`] (a new way fails to compile here until it has a place).
fn way_index(way: WayIn) -> usize {
    match way {
        WayIn::Forward => 0,
        WayIn::Connect => 1,
        WayIn::Target => 2,
        WayIn::Route => 3,
        WayIn::Intercept => 4,
        WayIn::Jobs => 5,
        WayIn::Unknown => 6,
    }
}

/// The `result` values of `sluice_intercept_tunnels_total`.
pub const INTERCEPT_RESULTS: [&str; 8] = [
    "tls",
    "http",
    "sni_mismatch",
    "handshake_failed",
    "untrusted_ca",
    "leaf_failed",
    "not_http",
    "no_ca",
];

/// The `reason` values of `sluice_retries_total`.
pub const RETRY_REASONS: [&str; 6] = ["connect", "timeout", "reset", "refused", "status", "429"];

pub struct Metrics {
    registry: Registry,
    /// The series of fixed labels that every answered request touches, looked up once.
    hot: Hot,
    /// `sluice_requests_total{way, host, outcome}`: host is a name from `[hosts]` or `other`;
    /// outcome is `ok` or an error code.
    pub requests: IntCounterVec,
    /// `sluice_upstream_attempts_total{host, region, outcome}`.
    pub upstream_attempts: IntCounterVec,
    /// `sluice_upstream_responses_total{way, class}`: class is 1xx..5xx.
    pub upstream_responses: IntCounterVec,
    /// `sluice_request_duration_seconds{way}`.
    pub request_duration: HistogramVec,
    pub tunnels_opened: IntCounter,
    pub tunnels_active: IntGauge,
    /// `sluice_tunnel_bytes_total{direction="up|down"}`.
    pub tunnel_bytes: IntCounterVec,
    pub config_generation: IntGauge,
    /// `sluice_config_reloads_total{result="ok|error"}`.
    pub config_reloads: IntCounterVec,
    /// `sluice_queue_wait_seconds`: time requests and tunnels waited for admission.
    pub queue_wait: prometheus::Histogram,
    /// `sluice_admission_rejections_total{reason="pace|paused|concurrency"}`.
    pub rejections: IntCounterVec,
    /// Waits and refusals by caller at contended hosts.
    pub callers: CallerMetrics,
    /// Token budgets and the estimates of requests' tokens.
    pub tokens: TokenMetrics,
    /// `sluice_pauses_total{source="retry_after|backoff|ratelimit_headers"}`.
    pub pauses: IntCounterVec,
    /// `sluice_upstream_429_total{action="passed"}`: 429s handed to the client (a resend is a
    /// retry: `sluice_retries_total{reason="429"}`).
    pub upstream_429: IntCounterVec,
    /// `sluice_requests_by_protocol_total{client="http/1.1|h2",upstream="http/1.1|h2|none"}`.
    pub protocols: IntCounterVec,
    /// `sluice_learned_limits_total{kind="rps|max_concurrent"}`.
    pub learned: IntCounterVec,
    /// `sluice_hint_errors_total{header}`: rate-limit headers whose values did not parse.
    pub hint_errors: IntCounterVec,
    pub hosts_tracked: IntGauge,
    /// `sluice_host_pace_rps{host}`: current pace of hosts named in `[hosts]`.
    pub host_pace: prometheus::GaugeVec,
    /// `sluice_host_queued{host}`, `sluice_host_in_flight{host}` and
    /// `sluice_host_pause_remaining_seconds{host}`, of hosts named in `[hosts]`.
    pub host_queued: IntGaugeVec,
    pub host_in_flight: IntGaugeVec,
    pub host_paused: prometheus::GaugeVec,
    /// `sluice_hosts_paused`: hosts paused now, named or not.
    pub hosts_paused: IntGauge,
    /// `sluice_intercept_tunnels_total{result}`: tunnels served as HTTP by sluice
    /// (`tls`, `http`) or closed (`sni_mismatch`, `handshake_failed`, `leaf_failed`,
    /// `not_http`, `no_ca`).
    pub intercept_tunnels: IntCounterVec,
    /// `sluice_intercept_leaf_certificates_total{result="hit|miss"}`: leaf cache lookups.
    pub intercept_leaves: IntCounterVec,
    /// `sluice_intercept_leaf_cache_size`.
    pub intercept_leaf_cache: IntGauge,
    /// `sluice_dns_lookups_total{result}`: questions to the nameservers (`ok`, `nxdomain`,
    /// `no_records`, `empty`, `error`) and lookups refused over the in-flight bound
    /// (`refused`).
    pub dns_lookups: IntCounterVec,
    /// `sluice_dns_cache_total{result="hit|negative_hit|miss|coalesced"}`.
    pub dns_cache: IntCounterVec,
    /// `sluice_dns_in_flight`: lookups in flight (set at each scrape).
    pub dns_in_flight: IntGauge,
    /// `sluice_hedges_total{host, event="fired|won"}`.
    pub hedges: IntCounterVec,
    /// `sluice_races_total{host}`.
    pub races: IntCounterVec,
    /// `sluice_retries_total{host, reason="connect|timeout|reset|status|429"}`.
    pub retries: IntCounterVec,
    /// `sluice_retry_budget_exhausted_total{host}`.
    pub budget_exhausted: IntCounterVec,
    /// `sluice_region_ejections_total{host, region}`.
    pub ejections: IntCounterVec,
    /// `sluice_region_healthy{host, region}`: 1 when the region may take traffic.
    pub region_healthy: IntGaugeVec,
    /// `sluice_region_latency_seconds{host, region, stat="ewma|p95|p99"}`.
    pub region_latency: prometheus::GaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "sluice_requests_total",
                "Requests and tunnels by way in and outcome (ok, or the Sluice-Error code)",
            ),
            &["way", "host", "outcome"],
        )?;
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "sluice_upstream_attempts_total",
                "Attempts sent to upstreams, by host, region and outcome (status class or error code)",
            ),
            &["host", "region", "outcome"],
        )?;
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "sluice_upstream_responses_total",
                "Upstream responses passed to clients, by way in and status class",
            ),
            &["way", "class"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_request_duration_seconds",
                "Time from request head to the end of the response, by way in",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
            &["way"],
        )?;
        let tunnels_opened =
            IntCounter::new("sluice_tunnels_opened_total", "CONNECT tunnels established")?;
        let tunnels_active = IntGauge::new("sluice_tunnels_active", "CONNECT tunnels open now")?;
        let tunnel_bytes = IntCounterVec::new(
            Opts::new(
                "sluice_tunnel_bytes_total",
                "Bytes carried by CONNECT tunnels (up: client to upstream)",
            ),
            &["direction"],
        )?;
        let config_generation = IntGauge::new(
            "sluice_config_generation",
            "Number of the configuration generation in force",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("sluice_build_info", "Build information; always 1"),
            &["version"],
        )?;
        let queue_wait = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "sluice_queue_wait_seconds",
                "Time requests and tunnels waited for their host's admission",
            )
            .buckets(vec![
                0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
            ]),
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "sluice_admission_rejections_total",
                "Requests answered 429 by sluice because no slot was free in time, by reason",
            ),
            &["reason"],
        )?;
        let pauses = IntCounterVec::new(
            Opts::new(
                "sluice_pauses_total",
                "Host pauses started or extended, by source",
            ),
            &["source"],
        )?;
        let upstream_429 = IntCounterVec::new(
            Opts::new(
                "sluice_upstream_429_total",
                "429s from upstreams passed to the client (resends count in sluice_retries_total)",
            ),
            &["action"],
        )?;
        let protocols = IntCounterVec::new(
            Opts::new(
                "sluice_requests_by_protocol_total",
                "Requests by the HTTP version spoken with the client and with the upstream \
                 (none: sluice answered itself)",
            ),
            &["client", "upstream"],
        )?;
        let learned = IntCounterVec::new(
            Opts::new(
                "sluice_learned_limits_total",
                "Limits learned from upstream headers, by kind",
            ),
            &["kind"],
        )?;
        let hint_errors = IntCounterVec::new(
            Opts::new(
                "sluice_hint_errors_total",
                "Rate-limit headers from upstreams whose values did not parse, by header",
            ),
            &["header"],
        )?;
        let hosts_tracked = IntGauge::new(
            "sluice_hosts_tracked",
            "Destination hosts with admission state in memory",
        )?;
        let host_pace = prometheus::GaugeVec::new(
            Opts::new(
                "sluice_host_pace_rps",
                "Current pace (requests/s) of hosts named in [hosts]; 0 = unpaced",
            ),
            &["host"],
        )?;
        let host_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["host"]);
        let host_queued = host_gauge(
            "sluice_host_queued",
            "Requests waiting for their slot, of hosts named in [hosts]",
        )?;
        let host_in_flight = host_gauge(
            "sluice_host_in_flight",
            "Requests in flight to hosts named in [hosts]",
        )?;
        let host_paused = prometheus::GaugeVec::new(
            Opts::new(
                "sluice_host_pause_remaining_seconds",
                "Seconds left of the pause of hosts named in [hosts]; 0 = not paused",
            ),
            &["host"],
        )?;
        let hosts_paused = IntGauge::new(
            "sluice_hosts_paused",
            "Hosts paused now (any host, named in [hosts] or not)",
        )?;
        let intercept_tunnels = IntCounterVec::new(
            Opts::new(
                "sluice_intercept_tunnels_total",
                "CONNECT tunnels sluice served as HTTP itself (tls, http) or closed, by result",
            ),
            &["result"],
        )?;
        let intercept_leaves = IntCounterVec::new(
            Opts::new(
                "sluice_intercept_leaf_certificates_total",
                "Leaf certificate lookups for intercepted tunnels: hit (cached) or miss (made)",
            ),
            &["result"],
        )?;
        let intercept_leaf_cache = IntGauge::new(
            "sluice_intercept_leaf_cache_size",
            "Leaf certificates cached for intercepted tunnels",
        )?;
        let dns_lookups = IntCounterVec::new(
            Opts::new(
                "sluice_dns_lookups_total",
                "DNS questions sent, by result; refused: over server.dns_max_in_flight",
            ),
            &["result"],
        )?;
        let dns_cache = IntCounterVec::new(
            Opts::new(
                "sluice_dns_cache_total",
                "DNS names looked up, by how: hit, negative_hit, miss (asked), coalesced (joined a lookup in flight)",
            ),
            &["result"],
        )?;
        let dns_in_flight = IntGauge::new("sluice_dns_in_flight", "DNS lookups in flight")?;
        for r in ["ok", "nxdomain", "no_records", "empty", "error", "refused"] {
            dns_lookups.with_label_values(&[r]);
        }
        for r in ["hit", "negative_hit", "miss", "coalesced"] {
            dns_cache.with_label_values(&[r]);
        }
        for r in INTERCEPT_RESULTS {
            intercept_tunnels.with_label_values(&[r]);
        }
        for r in ["hit", "miss"] {
            intercept_leaves.with_label_values(&[r]);
        }
        let hedges = IntCounterVec::new(
            Opts::new(
                "sluice_hedges_total",
                "Hedged attempts sent (fired) and hedges whose answer was used (won), by host",
            ),
            &["host", "event"],
        )?;
        let races = IntCounterVec::new(
            Opts::new(
                "sluice_races_total",
                "Requests raced across regions, by host",
            ),
            &["host"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "sluice_retries_total",
                "Attempts sent again after a failure, by host and reason",
            ),
            &["host", "reason"],
        )?;
        let budget_exhausted = IntCounterVec::new(
            Opts::new(
                "sluice_retry_budget_exhausted_total",
                "Retries or hedges not sent because the host's retry budget was spent",
            ),
            &["host"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "sluice_region_ejections_total",
                "Regions ejected after consecutive failures, by host and region",
            ),
            &["host", "region"],
        )?;
        let region_healthy = IntGaugeVec::new(
            Opts::new(
                "sluice_region_healthy",
                "1 when the region passes its checks and is not ejected, by host and region",
            ),
            &["host", "region"],
        )?;
        let region_latency = prometheus::GaugeVec::new(
            Opts::new(
                "sluice_region_latency_seconds",
                "Time to response head observed per region (ewma, p95, p99)",
            ),
            &["host", "region", "stat"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "sluice_config_reloads_total",
                "Configuration reloads (SIGHUP or POST /reload), by result",
            ),
            &["result"],
        )?;
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        for c in [
            &rejections,
            &pauses,
            &upstream_429,
            &protocols,
            &learned,
            &hint_errors,
            &config_reloads,
            &hedges,
            &races,
            &retries,
            &budget_exhausted,
            &ejections,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(queue_wait.clone()))?;
        let callers = CallerMetrics::new(&registry)?;
        let tokens = TokenMetrics::new(&registry)?;
        registry.register(Box::new(hosts_tracked.clone()))?;
        registry.register(Box::new(host_pace.clone()))?;
        registry.register(Box::new(host_queued.clone()))?;
        registry.register(Box::new(host_in_flight.clone()))?;
        registry.register(Box::new(host_paused.clone()))?;
        registry.register(Box::new(hosts_paused.clone()))?;
        registry.register(Box::new(intercept_tunnels.clone()))?;
        registry.register(Box::new(intercept_leaves.clone()))?;
        registry.register(Box::new(intercept_leaf_cache.clone()))?;
        registry.register(Box::new(dns_lookups.clone()))?;
        registry.register(Box::new(dns_cache.clone()))?;
        registry.register(Box::new(dns_in_flight.clone()))?;
        registry.register(Box::new(region_healthy.clone()))?;
        registry.register(Box::new(region_latency.clone()))?;
        for r in ["pace", "paused", "concurrency"] {
            rejections.with_label_values(&[r]);
        }
        for src in crate::admission::PauseSource::ALL {
            pauses.with_label_values(&[src.as_str()]);
        }
        upstream_429.with_label_values(&["passed"]);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_attempts.clone()))?;
        registry.register(Box::new(upstream_responses.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(tunnels_opened.clone()))?;
        registry.register(Box::new(tunnels_active.clone()))?;
        registry.register(Box::new(tunnel_bytes.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Pre-create the series a dashboard expects so they read 0 rather than missing.
        // (and those of `Hot`, made by it).
        let hot = Hot::new(&request_duration, &upstream_responses, &protocols);
        for way in WayIn::ALL {
            requests.with_label_values(&[way.as_str(), OTHER_HOST, OUTCOME_OK]);
        }
        for dir in ["up", "down"] {
            tunnel_bytes.with_label_values(&[dir]);
        }
        for reason in crate::admission::Rejection::REASONS {
            rejections.with_label_values(&[reason]);
        }
        for source in crate::admission::PauseSource::ALL {
            pauses.with_label_values(&[source.as_str()]);
        }
        upstream_429.with_label_values(&["passed"]);
        for kind in ["rps", "max_concurrent"] {
            learned.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        Ok(Metrics {
            registry,
            hot,
            requests,
            upstream_attempts,
            upstream_responses,
            request_duration,
            tunnels_opened,
            tunnels_active,
            tunnel_bytes,
            config_generation,
            config_reloads,
            queue_wait,
            rejections,
            callers,
            tokens,
            pauses,
            upstream_429,
            protocols,
            learned,
            hint_errors,
            hosts_tracked,
            host_pace,
            host_queued,
            host_in_flight,
            host_paused,
            hosts_paused,
            intercept_tunnels,
            intercept_leaves,
            intercept_leaf_cache,
            dns_lookups,
            dns_cache,
            dns_in_flight,
            hedges,
            races,
            retries,
            budget_exhausted,
            ejections,
            region_healthy,
            region_latency,
        })
    }

    /// Register collectors kept by another module (the fleet's `sluice_shared_*`).
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// Count one finished request or tunnel.
    pub fn record(&self, way: WayIn, host: &str, outcome: Option<Code>, seconds: f64) {
        let outcome = outcome.map_or(OUTCOME_OK, Code::as_str);
        self.requests
            .with_label_values(&[way.as_str(), host, outcome])
            .inc();
        self.hot.duration[way_index(way)].observe(seconds);
    }

    /// Count an upstream response by status class.
    pub fn record_upstream_status(&self, way: WayIn, status: u16) {
        self.hot.responses[way_index(way)][class_index(status)].inc();
    }

    /// Count a request by its client's protocol and its upstream's (`None`: it reached none).
    pub fn record_protocols(&self, client: &str, upstream: Option<&str>) {
        let upstream = upstream.unwrap_or("none");
        let c = CLIENT_PROTOCOLS.iter().position(|p| *p == client);
        let u = UPSTREAM_PROTOCOLS.iter().position(|p| *p == upstream);
        match (c, u) {
            (Some(c), Some(u)) => self.hot.protocols[c][u].inc(),
            _ => self.protocols.with_label_values(&[client, upstream]).inc(),
        }
    }

    /// Count one attempt sent to an endpoint of `region` (`default` for a host without
    /// regions): its status class, or the error that ended it.
    pub fn record_region_attempt(&self, host: &str, region: &str, outcome: &str) {
        self.upstream_attempts
            .with_label_values(&[host, region, outcome])
            .inc();
    }

    /// Create the series of every `[hosts]` entry and region of `generation`, so that they read
    /// 0 rather than missing (a rate or an alert over them works from the start). Called at
    /// start and on every reload; the label sets are bounded by the configuration.
    pub fn prepare(&self, generation: &crate::generation::Generation) {
        for label in &generation.profile_names {
            for event in ["fired", "won"] {
                self.hedges.with_label_values(&[label, event]);
            }
            self.races.with_label_values(&[label]);
            for reason in RETRY_REASONS {
                self.retries.with_label_values(&[label, reason]);
            }
            self.budget_exhausted.with_label_values(&[label]);
        }
        for (name, entry) in &generation.config.hosts {
            for region in &entry.regions {
                self.ejections.with_label_values(&[name, &region.name]);
            }
        }
    }

    /// `sluice_intercept_tunnels_total` by result, for `/status`.
    pub fn intercept_by_result(&self) -> std::collections::BTreeMap<&'static str, u64> {
        INTERCEPT_RESULTS
            .iter()
            .map(|r| (*r, self.intercept_tunnels.with_label_values(&[r]).get()))
            .collect()
    }

    /// Requests answered by sluice itself, by error code (every way in and host), since start.
    pub fn refusals_by_code(&self) -> std::collections::BTreeMap<String, u64> {
        use prometheus::core::Collector;
        let mut out = std::collections::BTreeMap::new();
        for family in self.requests.collect() {
            for m in family.get_metric() {
                let outcome = m.get_label().iter().find(|l| l.get_name() == "outcome");
                if let Some(code) = outcome.map(|l| l.get_value()) {
                    if code != OUTCOME_OK {
                        *out.entry(code.to_string()).or_insert(0) +=
                            m.get_counter().get_value() as u64;
                    }
                }
            }
        }
        out
    }

    /// Set the region gauges from the regions' live state (called before each scrape).
    pub fn refresh_regions(&self, regions: &crate::regions::Regions) {
        let now = regions.now();
        self.region_healthy.reset();
        self.region_latency.reset();
        for h in regions.all() {
            for r in &h.regions {
                let labels = [h.host.as_str(), r.name.as_str()];
                self.region_healthy
                    .with_label_values(&labels)
                    .set(i64::from(r.state.available(now)));
                for (stat, value) in [
                    ("ewma", r.state.ewma()),
                    ("p95", r.state.percentile(95)),
                    ("p99", r.state.percentile(99)),
                ] {
                    if let Some(d) = value {
                        self.region_latency
                            .with_label_values(&[labels[0], labels[1], stat])
                            .set(d.as_secs_f64());
                    }
                }
            }
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn way_index_is_the_place_in_all() {
        for (i, way) in WayIn::ALL.into_iter().enumerate() {
            assert_eq!(way_index(way), i, "{way:?}");
        }
    }

    #[test]
    fn records_and_encodes() {
        let m = Metrics::new().expect("registry");
        m.record(WayIn::Forward, OTHER_HOST, None, 0.01);
        m.record(WayIn::Connect, "api.test", Some(Code::ConnectRefused), 0.02);
        m.record_upstream_status(WayIn::Forward, 204);
        let text = String::from_utf8(m.encode()).expect("utf8");
        assert!(
            text.contains("sluice_requests_total{host=\"other\",outcome=\"ok\",way=\"forward\"} 1")
        );
        assert!(text.contains(
            "sluice_requests_total{host=\"api.test\",outcome=\"connect_refused\",way=\"connect\"} 1"
        ));
        assert!(text.contains("sluice_upstream_responses_total{class=\"2xx\",way=\"forward\"} 1"));
        assert!(text.contains("sluice_build_info{version=\""));
    }
}
