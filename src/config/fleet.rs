//! `[shared]`: where a fleet of sluice processes keeps the state they share (host pace, pauses,
//! learned limits), and what each node does when that store fails. Types, defaults and checks;
//! the store itself lives in `crate::fleet`.

use super::HumanDuration;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// "memory": this process alone (the default); "redis": shared with every node on the
    /// same Redis.
    pub backend: FleetBackend,
    /// `redis://` or `rediss://` URL; a list of URLs names the seed nodes of a Redis Cluster.
    pub redis_url: RedisUrl,
    /// What a node does while Redis is unreachable (the breaker is open).
    pub on_error: OnError,
    pub breaker: BreakerConfig,
    /// Longest wait for any one Redis call; a call that takes longer counts as a failure.
    pub timeout: HumanDuration,
    /// Every key and the event channel start with this, so fleets can share a Redis.
    pub key_prefix: String,
    /// How often a node says it is alive; a node silent for three periods is not counted.
    pub heartbeat: HumanDuration,
    /// PEM file of the CAs trusted for `rediss://`, instead of the system roots.
    pub tls_ca_file: Option<String>,
    /// A call that fails is tried again (on a new connection) within its `timeout`
    /// before it counts against the breaker.
    pub retry: RetryConfig,
}

/// `[shared] retry`: retry, then breaker, then fallback.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Further tries of a call whose error came back before its timeout; 0: none.
    pub max_retries: u32,
    /// Wait before the first retry.
    pub delay: HumanDuration,
    /// Each further wait is the previous one times this.
    pub backoff: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 1,
            delay: HumanDuration::from_millis(5),
            backoff: 2.0,
        }
    }
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            backend: FleetBackend::Memory,
            redis_url: RedisUrl::One("redis://127.0.0.1:6379".into()),
            on_error: OnError::Local,
            breaker: BreakerConfig::default(),
            timeout: HumanDuration::from_millis(50),
            key_prefix: "sluice".into(),
            heartbeat: HumanDuration::from_secs(5),
            tls_ca_file: None,
            retry: RetryConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FleetBackend {
    Memory,
    Redis,
}

/// What a node does while the shared store is unreachable.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Pace locally at this node's share of each host's limit (limit / live nodes).
    Local,
    /// Stop pacing (pauses learned by this node and concurrency limits still apply).
    Allow,
    /// Refuse with 503 `shared_state_unavailable`.
    Throttle,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Local => "local",
            OnError::Allow => "allow",
            OnError::Throttle => "throttle",
        }
    }
}

/// One URL, or the seed nodes of a Redis Cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RedisUrl {
    One(String),
    Cluster(Vec<String>),
}

impl RedisUrl {
    pub fn urls(&self) -> Vec<&str> {
        match self {
            RedisUrl::One(u) => vec![u.as_str()],
            RedisUrl::Cluster(list) => list.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failed calls that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before letting calls try again (half-open).
    pub recovery_timeout: HumanDuration,
    /// Successful calls in half-open that close the breaker.
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            recovery_timeout: HumanDuration::from_secs(30),
            success_threshold: 2,
        }
    }
}

impl FleetConfig {
    /// Report every problem with its key path.
    pub fn check(&self, err: &mut impl FnMut(String, String)) {
        let urls = self.redis_url.urls();
        if urls.is_empty() {
            err("shared.redis_url".into(), "needs at least one URL".into());
        }
        for (i, url) in urls.iter().enumerate() {
            let path = match self.redis_url {
                RedisUrl::One(_) => "shared.redis_url".to_string(),
                RedisUrl::Cluster(_) => format!("shared.redis_url[{i}]"),
            };
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                err(
                    path,
                    format!("{url:?} must start with redis:// or rediss://"),
                );
            } else if let Err(e) = redis::Client::open(*url) {
                err(path, format!("{url:?}: {e}"));
            }
        }
        if let Some(path) = &self.tls_ca_file {
            if let Err(m) = super::validate::check_ca_file(path) {
                err("shared.tls_ca_file".into(), m);
            }
        }
        if self.retry.max_retries > 10 {
            err(
                "shared.retry.max_retries".into(),
                "must be at most 10".into(),
            );
        }
        if !(1.0..=10.0).contains(&self.retry.backoff) {
            err(
                "shared.retry.backoff".into(),
                "must be between 1.0 and 10.0".into(),
            );
        }
        let timeout = self.timeout.get();
        if timeout.is_zero() || timeout > std::time::Duration::from_secs(10) {
            err(
                "shared.timeout".into(),
                "must be greater than zero and at most 10s".into(),
            );
        }
        if self.heartbeat.get() < std::time::Duration::from_millis(100)
            || self.heartbeat.get() > std::time::Duration::from_secs(60)
        {
            err(
                "shared.heartbeat".into(),
                "must be between 100ms and 60s".into(),
            );
        }
        let p = &self.key_prefix;
        if p.is_empty() || p.len() > 64 || p.contains(['{', '}', ' ', '\n', '\r']) {
            err(
                "shared.key_prefix".into(),
                "must be 1-64 characters without braces or spaces".into(),
            );
        }
        let b = &self.breaker;
        if b.failure_threshold == 0 {
            err(
                "shared.breaker.failure_threshold".into(),
                "must be at least 1".into(),
            );
        }
        if b.success_threshold == 0 {
            err(
                "shared.breaker.success_threshold".into(),
                "must be at least 1".into(),
            );
        }
        if b.recovery_timeout.get().is_zero() {
            err(
                "shared.breaker.recovery_timeout".into(),
                "must be greater than zero".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::validate::tests::errors_of;
    use crate::config::Config;

    #[test]
    fn parses_the_documented_form() {
        let c = Config::parse(
            r#"
            [shared]
            backend = "redis"
            redis_url = "rediss://cache.internal:6380/0"
            on_error = "throttle"
            breaker = { failure_threshold = 3, recovery_timeout = "5s", success_threshold = 1 }
            timeout = "20ms"
            "#,
        )
        .expect("valid");
        c.validate().expect("valid");
        assert_eq!(c.shared.backend, super::FleetBackend::Redis);
        assert_eq!(c.shared.on_error, super::OnError::Throttle);
        assert_eq!(c.shared.breaker.failure_threshold, 3);
        let cluster = Config::parse(
            "[shared]\nbackend = \"redis\"\nredis_url = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n",
        )
        .expect("valid");
        assert_eq!(cluster.shared.redis_url.urls().len(), 2);
    }

    #[test]
    fn every_bad_value_is_reported_with_its_path() {
        let paths = errors_of(
            r#"
            [shared]
            backend = "redis"
            redis_url = ["redis://ok:1", "http://nope"]
            timeout = "0s"
            key_prefix = "a{b}"
            breaker = { failure_threshold = 0, recovery_timeout = "0s", success_threshold = 0 }
            "#,
        );
        for want in [
            "shared.redis_url[1]",
            "shared.timeout",
            "shared.key_prefix",
            "shared.breaker.failure_threshold",
            "shared.breaker.recovery_timeout",
            "shared.breaker.success_threshold",
        ] {
            assert!(paths.iter().any(|p| p == want), "missing {want}: {paths:?}");
        }
        let err = Config::parse("[shared]\nbackend = \"etcd\"\n").expect_err("unknown backend");
        assert!(err.to_string().contains("shared.backend"), "{err}");
        let err = Config::parse("[shared]\nbreaker = { failures = 1 }\n").expect_err("unknown");
        assert!(err.to_string().contains("shared.breaker"), "{err}");
    }
}
