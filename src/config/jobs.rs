//! `[jobs]` (calls taken now and made later, results kept for a while) and `[webhooks]` (the
//! signing secrets and delivery policy of result webhooks): types, defaults and checks.

use super::HumanDuration;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[jobs]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The jobs API (`/_sluice/v1/jobs`) and `Prefer: respond-async`; off: both answer 404.
    pub enabled: bool,
    /// Job calls and webhook deliveries in flight at once.
    pub workers: usize,
    /// Largest job submission (its JSON, or a proxied request's body).
    pub max_submission_bytes: u64,
    /// The upstream's response body is kept up to this size (the rest is cut, and said so).
    pub max_result_bytes: usize,
    /// A job's whole life (queue, pauses, retries) when the submission names no `timeout`.
    pub default_timeout: HumanDuration,
    /// Longest `timeout` a submission may ask for.
    pub max_timeout: HumanDuration,
    /// Finished jobs are kept this long, then deleted.
    pub retention: HumanDuration,
    /// In a fleet: a task a node took and has not finished or renewed for this long is
    /// taken by another node (the first one is presumed dead).
    pub claim_after: HumanDuration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            enabled: true,
            workers: 32,
            max_submission_bytes: 1024 * 1024,
            max_result_bytes: 256 * 1024,
            default_timeout: HumanDuration::from_secs(3600),
            max_timeout: HumanDuration::from_secs(24 * 3600),
            retention: HumanDuration::from_secs(24 * 3600),
            claim_after: HumanDuration::from_secs(30),
        }
    }
}

/// One named signing secret, or several during a rotation (each delivery is signed by all).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Secret {
    One(String),
    Many(Vec<String>),
}

impl Secret {
    pub fn values(&self) -> Vec<&str> {
        match self {
            Secret::One(s) => vec![s.as_str()],
            Secret::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `[webhooks]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Webhooks {
    /// Secrets by name (`whsec_` + base64 of 24 to 64 bytes); a job names one, never a value.
    pub secrets: BTreeMap<String, Secret>,
    /// A receiver is tried again until this long after the job finished.
    pub delivery_ttl: HumanDuration,
    /// Backoff between tries of one receiver: full jitter up to `backoff_base` x 2^n,
    /// at most `backoff_max`.
    pub backoff_base: HumanDuration,
    pub backoff_max: HumanDuration,
    /// Longest one delivery attempt may take.
    pub timeout: HumanDuration,
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            secrets: BTreeMap::new(),
            delivery_ttl: HumanDuration::from_secs(24 * 3600),
            backoff_base: HumanDuration::from_secs(1),
            backoff_max: HumanDuration::from_secs(600),
            timeout: HumanDuration::from_secs(10),
        }
    }
}

/// The key bytes of a `whsec_` secret.
pub fn secret_key(value: &str) -> Result<Vec<u8>, String> {
    let b64 = value
        .strip_prefix("whsec_")
        .ok_or("must start with whsec_")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("is not base64 after whsec_ ({e})"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "holds {} bytes; a secret is 24 to 64 bytes",
            key.len()
        ));
    }
    Ok(key)
}

pub(super) fn check(jobs: &JobsConfig, hooks: &Webhooks, err: &mut impl FnMut(String, String)) {
    if jobs.workers == 0 || jobs.workers > 10_000 {
        err("jobs.workers".into(), "must be 1 to 10000".into());
    }
    if jobs.max_timeout.get().is_zero() || jobs.default_timeout > jobs.max_timeout {
        err(
            "jobs.default_timeout".into(),
            "must be at most jobs.max_timeout, which must not be 0".into(),
        );
    }
    if jobs.claim_after.get() < std::time::Duration::from_millis(300) {
        err("jobs.claim_after".into(), "must be at least 300ms".into());
    }
    if jobs.max_timeout.get() > std::time::Duration::from_secs(30 * 24 * 3600) {
        err("jobs.max_timeout".into(), "must be at most 30 days".into());
    }
    for (name, secret) in &hooks.secrets {
        let values = secret.values();
        if values.is_empty() || values.len() > 2 {
            err(
                format!("webhooks.secrets.{name}"),
                "holds one secret, or two during a rotation".into(),
            );
        }
        for (i, v) in values.iter().enumerate() {
            if let Err(m) = secret_key(v) {
                err(format!("webhooks.secrets.{name}[{i}]"), m);
            }
        }
    }
    if hooks.backoff_base.get().is_zero() || hooks.backoff_base > hooks.backoff_max {
        err(
            "webhooks.backoff_base".into(),
            "must be more than 0 and at most webhooks.backoff_max".into(),
        );
    }
    if hooks.timeout.get().is_zero() {
        err("webhooks.timeout".into(), "must be more than 0".into());
    }
}
