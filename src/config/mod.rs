//! sluice's TOML configuration: types, named defaults and loading.
//!
//! Loading is two steps: `parse()` turns text into `Config` (unknown keys and bad values are
//! errors with their key path), then `validate()` checks every semantic rule and reports every
//! failure at once. `Generation::build()` compiles a valid `Config` into lookup structures.

mod callers;
mod dispatch;
mod duration;
mod fleet;
mod jobs;
mod validate;

pub use callers::{CallerBy, Callers, Priority};
pub use dispatch::{
    default_retry_on, HealthCheckConfig, HedgeAfter, Http2, Mode, Outlier, Quota, RegionConfig,
    RetryBudget, RetryOn,
};
pub use duration::HumanDuration;
pub use fleet::{BreakerConfig, FleetBackend, FleetConfig, OnError, RedisUrl, RetryConfig};
pub use jobs::{secret_key, JobsConfig, Secret, Webhooks};
pub use validate::ConfigError;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The configuration used when no file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/default.toml");

/// Most `[hosts]` entries: with the defaults, each is a limits profile, whose index a host's
/// admission state keeps in 15 bits.
pub const MAX_HOST_ENTRIES: usize = (1 << 15) - 1;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    /// Static name overrides: `"api.example.test" = ["127.0.0.1:18443"]`; a key may also be
    /// `"host:port"` to pin one port only.
    pub resolve: BTreeMap<String, Vec<String>>,
    pub routes: Vec<RouteConfig>,
    /// Pacing applied to every destination host unless `[hosts]` says otherwise.
    pub defaults: HostLimits,
    /// Per-host overrides: `"api.example.com"`, `"api.example.com:8443"` or `"*.example.com"`.
    pub hosts: BTreeMap<String, HostOverride>,
    /// Egress policy and request limits.
    pub security: Security,
    /// Clients allowed to use sluice; when any is listed, every request must authenticate.
    pub clients: Vec<ClientConfig>,
    /// Who a request's caller is, for fair shares between the callers of a contended host.
    pub callers: Callers,
    /// State shared by a fleet of sluice processes (Redis), and what to do when it fails.
    pub shared: FleetConfig,
    /// TLS interception of CONNECT tunnels to chosen hosts (off unless hosts are listed).
    pub intercept: Intercept,
    /// Calls taken now and made later, their results delivered to webhooks.
    pub jobs: JobsConfig,
    /// Signing secrets and delivery policy of job webhooks.
    pub webhooks: Webhooks,
}

/// `[intercept]`: CONNECT tunnels to these hosts are terminated with a leaf certificate
/// signed by a local CA, and every request inside goes through the pipeline.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Intercept {
    /// Exact names or `*.suffix`; empty: nothing is intercepted.
    pub hosts: Vec<String>,
    /// Names (exact or `*.suffix`) never intercepted, even when `hosts` matches.
    pub exclude: Vec<String>,
    /// The CA certificate (PEM) that signs leaf certificates; clients must trust it.
    pub ca_cert: Option<String>,
    /// Its private key (PEM); a secret.
    pub ca_key: Option<String>,
    /// How long a leaf certificate is valid (it is made again before it ends).
    pub leaf_ttl: HumanDuration,
    /// Leaf certificates kept, least recently used dropped first.
    pub leaf_cache: usize,
}

impl Default for Intercept {
    fn default() -> Self {
        Intercept {
            hosts: Vec::new(),
            exclude: Vec::new(),
            ca_cert: None,
            ca_key: None,
            leaf_ttl: HumanDuration::from_secs(24 * 3600),
            leaf_cache: 1024,
        }
    }
}

impl Intercept {
    /// Warnings `--check` prints: a CA key others can read (whoever reads it can make
    /// certificates every client that trusts the CA accepts).
    pub fn warnings(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let Some(key) = &self.ca_key else {
            return Vec::new();
        };
        match std::fs::metadata(key) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => vec![format!(
                "intercept.ca_key {key} is readable by others (mode {:04o}): whoever reads it \
                 can make certificates the clients trust; chmod 600 it",
                m.permissions().mode() & 0o7777
            )],
            _ => Vec::new(),
        }
    }
}

/// Egress policy (checked on resolved addresses) and limits on what clients send.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Addresses allowed even inside the ranges denied by default (e.g. "10.0.0.0/8").
    pub allow_cidrs: Vec<String>,
    /// Addresses always denied.
    pub deny_cidrs: Vec<String>,
    /// When not empty, only these hosts may be reached (exact names or "*.suffix").
    pub allow_hosts: Vec<String>,
    /// Hosts never reached (exact names or "*.suffix").
    pub deny_hosts: Vec<String>,
    /// Ports CONNECT may open.
    pub connect_ports: Vec<u16>,
    /// Let CONNECT open any port (ignores `connect_ports`).
    pub connect_any_port: bool,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Longest request target.
    pub max_uri_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Client connections open at once on the proxy listener.
    pub max_connections: usize,
    /// Client connections open at once from one client address.
    pub max_connections_per_client: usize,
    /// Slowest a request body may arrive, on average, once `body_grace` has passed
    /// (bytes/s; 0: no floor). A slower body is answered `408`.
    pub min_body_rate: u64,
    /// Time a request body has before `min_body_rate` applies.
    pub body_grace: HumanDuration,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            connect_ports: vec![443],
            connect_any_port: false,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
            max_connections: 10_000,
            max_connections_per_client: 2_000,
            min_body_rate: 1024,
            body_grace: HumanDuration::from_secs(10),
        }
    }
}

/// A client allowed to use sluice.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client's name: the Basic user name, and its label in metrics and logs.
    pub name: String,
    /// Hex SHA-256 of the client's bearer token (`Proxy-Authorization: Bearer` / `Sluice-Key`).
    pub token_sha256: Option<String>,
    /// Hex SHA-256 of the client's password (`Proxy-Authorization: Basic name:password`).
    pub password_sha256: Option<String>,
    /// Pace of this client's requests, across all hosts.
    pub limits: Option<ClientLimits>,
    /// The client's share of a contended host against other callers (1-1000).
    #[serde(default = "one")]
    pub weight: u32,
    /// The class of its requests that send no `Sluice-Priority`.
    #[serde(default)]
    pub priority: Priority,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientLimits {
    pub rps: f64,
    #[serde(default = "one")]
    pub burst: u32,
    /// Longest a request waits for the client's pace before a 429.
    #[serde(default = "thirty_seconds")]
    pub max_queue_wait: HumanDuration,
}

fn one() -> u32 {
    1
}

fn thirty_seconds() -> HumanDuration {
    HumanDuration::from_secs(30)
}

/// Pacing limits of a destination host.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostLimits {
    /// Requests per second; 0 turns pacing off.
    pub rps: f64,
    /// Requests that may go at once after an idle spell (at least 1).
    pub burst: u32,
    /// Requests (and tunnels) in flight at once; 0 = unlimited.
    pub max_concurrent: u32,
    /// Requests one caller may have in flight at the host at once (waiting for its slot
    /// included); 0 = unlimited.
    pub max_concurrent_per_caller: u32,
    /// Longest a request may wait for its slot; beyond it, sluice answers 429 at once.
    pub max_queue_wait: HumanDuration,
    /// The least time sluice expects between a request's slot and its response head (the
    /// route's p90 when it is longer): a request that would wait is admitted only if its
    /// slot leaves that much before its deadline.
    pub head_time_floor: HumanDuration,
    /// Ceiling for a pace learned from upstream headers; 0 = no ceiling.
    pub max_rps: f64,
    /// The host's token budgets per minute: input and output together (OpenAI's TPM), input
    /// only and output only (Anthropic's ITPM and OTPM). 0: none configured; a budget is then
    /// learned from the upstream's rate-limit headers.
    pub tokens_per_minute: u64,
    pub input_tokens_per_minute: u64,
    pub output_tokens_per_minute: u64,
    /// How requests are sent across the host's regions.
    pub mode: Mode,
    /// When `hedge` sends its duplicate: a duration or a latency percentile ("p95").
    pub hedge_after: HedgeAfter,
    /// Most attempts (first, retries and duplicates) for one request.
    pub max_attempts: u32,
    /// Failures that send a request to another region.
    pub retry_on: RetryOn,
    /// Allow duplicates of requests that may have side effects (POST without
    /// `Idempotency-Key`).
    pub duplicate_unsafe: bool,
    /// Request bodies up to this size are kept so that they can be sent again; larger ones
    /// stream to one region.
    pub max_buffered_body: u64,
    pub retry_budget: RetryBudget,
    pub outlier: Outlier,
    /// Whose quota a 429 (or a 503 with `Retry-After`, or exhausted rate-limit headers) from
    /// one region speaks for: the host's (pause every region) or that region's only.
    pub quota: Quota,
    /// The request's deadline when the client sends no `Sluice-Timeout`: the wait for a slot,
    /// the connects and the response head (never a streamed body). 10 minutes by default: a
    /// non-streamed LLM completion answers its head only once the whole answer is written,
    /// and the OpenAI and Anthropic SDKs wait as long.
    pub request_timeout: HumanDuration,
    /// Longest silence within a response body once its head arrived (a streamed answer while
    /// the model thinks). Never cut by the deadline.
    pub body_idle_timeout: HumanDuration,
    /// HTTP/2 to the host's upstreams: `auto`, `always` or `never`.
    pub http2: Http2,
}

impl Default for HostLimits {
    fn default() -> Self {
        Self {
            rps: 2.0,
            burst: 2,
            max_concurrent: 0,
            max_concurrent_per_caller: 0,
            max_queue_wait: HumanDuration::from_secs(30),
            head_time_floor: HumanDuration::from_millis(50),
            max_rps: 0.0,
            tokens_per_minute: 0,
            input_tokens_per_minute: 0,
            output_tokens_per_minute: 0,
            mode: Mode::Single,
            hedge_after: HedgeAfter::Percentile(95),
            max_attempts: 3,
            retry_on: default_retry_on(),
            duplicate_unsafe: false,
            max_buffered_body: 1024 * 1024,
            retry_budget: RetryBudget::default(),
            outlier: Outlier::default(),
            quota: Quota::Host,
            request_timeout: HumanDuration::from_secs(600),
            body_idle_timeout: HumanDuration::from_secs(300),
            http2: Http2::Auto,
        }
    }
}

/// Largest token budget per minute a host may have, configured or learned.
pub const MAX_TOKENS_PER_MINUTE: u64 = 1_000_000_000;

impl HostLimits {
    /// The configured token budgets per minute: tokens, input tokens, output tokens.
    pub fn token_budgets(&self) -> [u64; 3] {
        [
            self.tokens_per_minute,
            self.input_tokens_per_minute,
            self.output_tokens_per_minute,
        ]
    }

    pub fn has_token_budget(&self) -> bool {
        self.token_budgets().iter().any(|t| *t > 0)
    }
}

/// A `[hosts."name"]` table: any key left out comes from `[defaults]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostOverride {
    pub rps: Option<f64>,
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_concurrent_per_caller: Option<u32>,
    pub max_queue_wait: Option<HumanDuration>,
    pub head_time_floor: Option<HumanDuration>,
    pub max_rps: Option<f64>,
    pub tokens_per_minute: Option<u64>,
    pub input_tokens_per_minute: Option<u64>,
    pub output_tokens_per_minute: Option<u64>,
    pub mode: Option<Mode>,
    pub hedge_after: Option<HedgeAfter>,
    pub max_attempts: Option<u32>,
    pub retry_on: Option<RetryOn>,
    pub duplicate_unsafe: Option<bool>,
    pub max_buffered_body: Option<u64>,
    pub retry_budget: Option<RetryBudget>,
    pub outlier: Option<Outlier>,
    pub quota: Option<Quota>,
    pub request_timeout: Option<HumanDuration>,
    pub body_idle_timeout: Option<HumanDuration>,
    pub http2: Option<Http2>,
    /// The host's regions; without any, the host is one region: its DNS answer.
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
    pub health_check: Option<HealthCheckConfig>,
}

impl HostOverride {
    /// These overrides applied on top of `base`.
    pub fn apply(&self, base: &HostLimits) -> HostLimits {
        HostLimits {
            rps: self.rps.unwrap_or(base.rps),
            burst: self.burst.unwrap_or(base.burst),
            max_concurrent: self.max_concurrent.unwrap_or(base.max_concurrent),
            max_concurrent_per_caller: self
                .max_concurrent_per_caller
                .unwrap_or(base.max_concurrent_per_caller),
            max_queue_wait: self.max_queue_wait.unwrap_or(base.max_queue_wait),
            head_time_floor: self.head_time_floor.unwrap_or(base.head_time_floor),
            max_rps: self.max_rps.unwrap_or(base.max_rps),
            tokens_per_minute: self.tokens_per_minute.unwrap_or(base.tokens_per_minute),
            input_tokens_per_minute: self
                .input_tokens_per_minute
                .unwrap_or(base.input_tokens_per_minute),
            output_tokens_per_minute: self
                .output_tokens_per_minute
                .unwrap_or(base.output_tokens_per_minute),
            mode: self.mode.unwrap_or(base.mode),
            hedge_after: self.hedge_after.unwrap_or(base.hedge_after),
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            retry_on: self.retry_on.unwrap_or(base.retry_on),
            duplicate_unsafe: self.duplicate_unsafe.unwrap_or(base.duplicate_unsafe),
            max_buffered_body: self.max_buffered_body.unwrap_or(base.max_buffered_body),
            retry_budget: self.retry_budget.unwrap_or(base.retry_budget),
            outlier: self.outlier.unwrap_or(base.outlier),
            quota: self.quota.unwrap_or(base.quota),
            request_timeout: self.request_timeout.unwrap_or(base.request_timeout),
            body_idle_timeout: self.body_idle_timeout.unwrap_or(base.body_idle_timeout),
            http2: self.http2.unwrap_or(base.http2),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// The proxy listener (all four ways in).
    pub listen: String,
    /// The admin listener: /metrics, /healthz, /status.
    pub admin_listen: String,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// PEM file of extra CAs trusted for upstream TLS, on top of the system roots.
    pub upstream_ca_file: Option<String>,
    /// Time to establish a TCP (and TLS) connection to an upstream.
    pub connect_timeout: HumanDuration,
    /// A cap on each single read from an upstream (response head or body piece), for every
    /// host; unset by default, since a host's `request_timeout` bounds the wait for the head
    /// and its `body_idle_timeout` the silences within a body.
    pub read_timeout: Option<HumanDuration>,
    /// Longest wait for each write to an upstream.
    pub write_timeout: HumanDuration,
    /// Longest wait for a DNS answer.
    pub dns_timeout: HumanDuration,
    /// Nameservers (`"ip"` or `"ip:port"`); empty: those of `/etc/resolv.conf`.
    pub dns_servers: Vec<String>,
    /// DNS answers kept (each for its TTL, failures for their negative TTL).
    pub dns_cache_size: usize,
    /// Lookups in flight at once (one per name); past it, a new name fails at once.
    pub dns_max_in_flight: usize,
    /// Longest wait for a client to send the first bytes of a request or a CONNECT head.
    pub header_read_timeout: HumanDuration,
    /// A CONNECT tunnel with no bytes in either direction for this long is closed.
    pub tunnel_idle_timeout: HumanDuration,
    /// On SIGTERM, listeners close at once; in-flight requests have this long to finish.
    pub grace_period: HumanDuration,
    /// After the grace period, how long the runtimes get to wind down.
    pub graceful_shutdown_timeout: HumanDuration,
    /// Hosts not named in `[hosts]` and unused this long are forgotten (their pace state).
    pub idle_host_ttl: HumanDuration,
    /// Upstream keep-alive pool size (connections kept idle across all destinations).
    pub upstream_keepalive_pool_size: usize,
    /// Log filter (`RUST_LOG` syntax); `RUST_LOG` in the environment wins.
    pub log_level: String,
    /// One line per request and tunnel on the `sluice::access` log target.
    pub access_log: bool,
    /// Log line format: "text" or "json".
    pub log_format: LogFormat,
    /// PID file, written in daemon mode.
    pub pid_file: String,
    /// Socket through which a new process (`--upgrade`) takes over the listeners.
    pub upgrade_sock: String,
    /// Directory of sluice's durable state (the job store); made when missing.
    pub state_dir: String,
    /// Bearer token the admin listener asks for on `/status` and `POST /reload` (and on
    /// `/metrics` with `metrics_auth`); `/healthz` never needs it. Unset: no token.
    pub admin_token: Option<String>,
    /// `/metrics` needs `admin_token` too (off by default, for scrapers without one).
    pub metrics_auth: bool,
}

impl Server {
    /// Warnings `--check` prints for a configuration that is valid but risky.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let loopback = self
            .admin_listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !loopback && self.admin_token.is_none() {
            out.push(format!(
                "server.admin_listen {} is not on loopback and server.admin_token is not set: \
                 anyone who reaches it can read /status and reload the configuration",
                self.admin_listen
            ));
        }
        out
    }
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            threads: 0,
            upstream_ca_file: None,
            connect_timeout: HumanDuration::from_secs(5),
            read_timeout: None,
            write_timeout: HumanDuration::from_secs(30),
            dns_timeout: HumanDuration::from_secs(5),
            dns_servers: Vec::new(),
            dns_cache_size: 10_000,
            dns_max_in_flight: 256,
            header_read_timeout: HumanDuration::from_secs(10),
            tunnel_idle_timeout: HumanDuration::from_secs(300),
            grace_period: HumanDuration::from_secs(5),
            graceful_shutdown_timeout: HumanDuration::from_secs(10),
            idle_host_ttl: HumanDuration::from_secs(600),
            upstream_keepalive_pool_size: 256,
            log_level: "info".into(),
            access_log: true,
            log_format: LogFormat::Text,
            pid_file: "/tmp/sluice.pid".into(),
            upgrade_sock: "/tmp/sluice_upgrade.sock".into(),
            state_dir: "sluice-state".into(),
            admin_token: None,
            metrics_auth: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix on sluice, e.g. "/openai"; stripped before forwarding.
    pub prefix: String,
    /// Destination, e.g. "https://api.openai.com" (an optional base path is prepended).
    pub target: String,
}

impl Config {
    /// Parse TOML text. Errors name the key path, e.g. `server.connect_timeout: invalid duration`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_reporting(text).map_err(|(errors, _)| errors)
    }

    /// Parse, reporting every unknown key and wrong type rather than the first: each error's
    /// line is commented out and the text parsed again (so later lines keep their numbers),
    /// up to `MAX_PARSE_ERRORS`. A TOML syntax error, or one whose line cannot be set aside,
    /// ends the search. On error, also the configuration that parsed once every bad line was
    /// set aside, if one did: its validation errors are worth reporting too.
    pub fn parse_reporting(text: &str) -> Result<Config, (ConfigError, Option<Box<Config>>)> {
        const MAX_PARSE_ERRORS: usize = 50;
        let mut text = text.to_string();
        let mut errors = Vec::new();
        loop {
            let de = toml::Deserializer::new(&text);
            let e = match serde_path_to_error::deserialize::<_, Config>(de) {
                Ok(config) if errors.is_empty() => return Ok(config),
                Ok(config) => return Err((ConfigError { errors }, Some(Box::new(config)))),
                Err(e) => e,
            };
            let path = e.path().to_string();
            let inner = e.into_inner();
            let start = inner.span().map(|span| span.start.min(text.len()));
            let message = match start {
                Some(at) => format!(
                    "{} (line {})",
                    inner.message(),
                    text[..at].matches('\n').count() + 1
                ),
                None => inner.message().to_string(),
            };
            errors.push((path, message));
            // Set the line aside: only a whole `key = value` on one line (commenting out the
            // first line of a longer value would break the file's syntax).
            let line_start = start.map(|at| text[..at].rfind('\n').map_or(0, |i| i + 1));
            let set_aside = line_start.filter(|&ls| {
                let line = text[ls..].lines().next().unwrap_or("");
                !line.trim_start().starts_with('[')
                    && toml::from_str::<toml::Table>(line).is_ok_and(|t| t.len() == 1)
            });
            match set_aside {
                Some(ls) if errors.len() < MAX_PARSE_ERRORS => text.insert(ls, '#'),
                _ => return Err((ConfigError { errors }, None)),
            }
        }
    }

    /// Parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(
                "(file)".into(),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let config = match Config::parse_reporting(&text) {
            Ok(config) => config,
            Err((mut e, Some(partial))) => {
                // What the rest of the file would still get wrong.
                if let Err(more) = partial.validate() {
                    e.errors.extend(more.errors);
                }
                return Err(e);
            }
            Err((e, None)) => return Err(e),
        };
        config.validate()?;
        Ok(config)
    }

    /// The embedded default, parsed and validated.
    pub fn embedded() -> Result<Config, ConfigError> {
        let config = Config::parse(EMBEDDED_DEFAULT)?;
        config.validate()?;
        Ok(config)
    }

    /// Worker threads to run: the configured number, or one per core.
    pub fn worker_threads(&self) -> usize {
        if self.server.threads > 0 {
            self.server.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_with_its_line() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\nthreds = 2\n\n[defaults]\nrps = \"fast\"\n\
                    burst = 3\n[hosts.\"api.test\"]\nretry_on = { connect = true }\nmax_rps = 5.0\n\
                    colour = \"red\"\n";
        let (errors, partial) = super::Config::parse_reporting(text).expect_err("four errors");
        let got: Vec<String> = errors
            .errors
            .iter()
            .map(|(path, message)| format!("{path}: {message}"))
            .collect();
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(
            got[0].starts_with("server.threds: unknown field `threds`")
                && got[0].ends_with("(line 3)"),
            "{got:?}"
        );
        assert!(
            got[1].starts_with("defaults.rps: invalid type") && got[1].ends_with("(line 6)"),
            "{got:?}"
        );
        assert!(
            got[2].contains("retry_on: invalid type") && got[2].ends_with("(line 9)"),
            "{got:?}"
        );
        assert!(
            got[3].contains("unknown field `colour`") && got[3].ends_with("(line 11)"),
            "{got:?}"
        );
        // The rest of the file parsed: its limits are there for validation.
        let partial = partial.expect("the rest parses");
        assert_eq!(partial.defaults.burst, 3);
        assert_eq!(partial.hosts["api.test"].max_rps, Some(5.0));
    }

    #[test]
    fn a_bad_value_over_several_lines_ends_the_report_cleanly() {
        let text = "[server]\nthreads = [\n  1,\n]\nnope = 1\n";
        let (errors, partial) = super::Config::parse_reporting(text).expect_err("an error");
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert!(errors.errors[0].1.contains("invalid type"), "{errors}");
        assert!(partial.is_none());
    }

    use super::*;

    #[test]
    fn embedded_default_is_valid_and_matches_code_defaults() {
        let config = Config::embedded().expect("embedded default must be valid");
        assert_eq!(config.server, Server::default());
        assert!(config.routes.is_empty());
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n")
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("server"), "{text}");
        assert!(text.contains("lisen"), "{text}");
    }

    #[test]
    fn bad_duration_names_its_path() {
        let err = Config::parse("[server]\nconnect_timeout = \"fast\"\n").expect_err("bad");
        assert!(err.to_string().contains("server.connect_timeout"), "{err}");
    }

    #[test]
    fn route_table_parses() {
        let config = Config::parse(
            "[[routes]]\nprefix = \"/openai\"\ntarget = \"https://api.openai.com\"\n",
        )
        .expect("valid");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.routes[0].prefix, "/openai");
    }
}
