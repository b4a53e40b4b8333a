//! A job submission, from its JSON to a [`Job`]: every field checked, unknown fields refused,
//! each error naming its field. The egress policy of webhook URLs is checked by the API, which
//! can resolve names.

use super::model::{Call, Delivery, Job, Receipt, State, Webhook};
use crate::config::{Config, Mode, RetryOn};
use crate::target::{self, Origin};
use base64::Engine;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Most webhooks one job may name.
pub const MAX_WEBHOOKS: usize = 16;
/// Largest `metadata`, as JSON text.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// `POST /_sluice/v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    pub url: String,
    #[serde(default = "get")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub body_base64: Option<String>,
    pub mode: Option<String>,
    pub regions: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub retry_on: Option<String>,
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    pub quorum: Option<usize>,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

fn get() -> String {
    "GET".into()
}

/// Headers a job may not set: sluice's own, and those of the connection, not the call.
pub fn reserved(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("sluice-")
        || matches!(
            n.as_str(),
            "host"
                | "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "upgrade"
                | "te"
                | "trailer"
                | "proxy-authorization"
                | "proxy-connection"
                | "expect"
        )
}

/// A URL a job calls or delivers to: http or https, a host, a path.
pub fn parse_url(field: &str, url: &str) -> Result<(Origin, String), String> {
    target::split_url(url).map_err(|e| format!("{field}: {e}"))
}

/// Parse and check a submission's JSON into a new job (`now`: Unix ms).
pub fn job_of(
    json: &[u8],
    config: &Config,
    client: Option<String>,
    id: String,
    now: u64,
) -> Result<Job, String> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    let s: Submission = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split_once('`'))
            .map(|(field, _)| field.to_string());
        match (path.as_str(), missing) {
            (".", Some(field)) => format!("{field}: required"),
            (".", None) => format!("job: {inner}"),
            _ => format!("{path}: {inner}"),
        }
    })?;
    let call = call_of(&s)?;
    let jobs = &config.jobs;
    let timeout = match &s.timeout {
        None => jobs.default_timeout.get(),
        Some(t) => humantime::parse_duration(t.trim())
            .map_err(|e| format!("timeout {t:?}: {e}; write e.g. \"30s\" or \"10m\""))?,
    };
    if timeout.is_zero() || timeout > jobs.max_timeout.get() {
        return Err(format!(
            "timeout: must be more than 0 and at most {}",
            humantime::format_duration(jobs.max_timeout.get())
        ));
    }
    if s.webhooks.len() > MAX_WEBHOOKS {
        return Err(format!("webhooks: at most {MAX_WEBHOOKS}"));
    }
    let mut deliveries = Vec::new();
    for (i, w) in s.webhooks.iter().enumerate() {
        parse_url(&format!("webhooks[{i}].url"), &w.url)?;
        if !config.webhooks.secrets.contains_key(&w.secret) {
            return Err(format!(
                "webhooks[{i}].secret: {:?} is not a secret in [webhooks.secrets]",
                w.secret
            ));
        }
        deliveries.push(Delivery {
            url: w.url.clone(),
            secret: w.secret.clone(),
            receipt: Receipt::Pending,
            attempts: 0,
            last_status: None,
            last_error: None,
            next_at: 0,
        });
    }
    let quorum = match s.quorum {
        None => deliveries.len(),
        Some(q) if (1..=deliveries.len()).contains(&q) => q,
        Some(q) => {
            return Err(format!(
                "quorum: {q} of {} webhooks; it must be 1 to the number of webhooks",
                deliveries.len()
            ))
        }
    };
    if serde_json::to_vec(&s.metadata).map_or(0, |v| v.len()) > MAX_METADATA_BYTES {
        return Err(format!("metadata: over {MAX_METADATA_BYTES} bytes"));
    }
    Ok(Job {
        id,
        client,
        created: now,
        deadline: now.saturating_add(millis(timeout)),
        state: State::Queued,
        next_at: now,
        attempts: 0,
        outcome: None,
        call,
        answer: None,
        quorum,
        deliveries,
        metadata: s.metadata,
        finished: None,
    })
}

fn call_of(s: &Submission) -> Result<Call, String> {
    parse_url("url", &s.url)?;
    let method = s.method.trim().to_ascii_uppercase();
    if method.is_empty()
        || method.len() > 32
        || !method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
        || method == "CONNECT"
    {
        return Err(format!(
            "method: {:?} is not an HTTP method sluice sends",
            s.method
        ));
    }
    let mut headers = Vec::new();
    for (k, v) in &s.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            return Err(format!("headers.{k}: not a valid header"));
        }
        if reserved(k) {
            return Err(format!(
                "headers.{k}: set by sluice, not by a job (use the job's own fields)"
            ));
        }
        headers.push((k.clone(), v.clone()));
    }
    let body = match (&s.body, &s.body_base64) {
        (Some(_), Some(_)) => return Err("body, body_base64: give one, not both".into()),
        (Some(t), None) => t.clone().into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|e| format!("body_base64: {e}"))?,
        (None, None) => Vec::new(),
    };
    if let Some(m) = &s.mode {
        Mode::parse(m).ok_or_else(|| format!("mode: {m:?}; write single, hedge or race"))?;
    }
    if let Some(r) = &s.retry_on {
        RetryOn::parse(r.split(',')).map_err(|e| format!("retry_on: {e}"))?;
    }
    if let Some(regions) = &s.regions {
        if regions.is_empty()
            || regions
                .iter()
                .any(|r| r.is_empty() || r.contains([',', '\r', '\n']))
        {
            return Err("regions: names of the host's regions, none empty".into());
        }
    }
    if let Some(k) = &s.idempotency_key {
        if k.is_empty() || k.len() > 255 || http::HeaderValue::from_str(k).is_err() {
            return Err("idempotency_key: 1 to 255 printable characters".into());
        }
    }
    Ok(Call {
        url: s.url.trim().to_string(),
        method,
        headers,
        body,
        mode: s.mode.clone(),
        regions: s.regions.clone(),
        retry_on: s.retry_on.clone(),
        idempotency_key: s.idempotency_key.clone(),
    })
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::default();
        c.webhooks.secrets.insert(
            "main".into(),
            crate::config::Secret::One("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        );
        c
    }

    fn parse(json: &str) -> Result<Job, String> {
        job_of(json.as_bytes(), &config(), None, "job_1".into(), 1_000)
    }

    #[test]
    fn a_full_submission_becomes_a_queued_job() {
        let j = parse(
            r#"{"url": "https://api.test/v1/x?y=1", "method": "post", "headers": {"X-A": "b"},
                "body": "{}", "mode": "race", "regions": ["a", "b"], "timeout": "30s",
                "retry_on": "429,5xx", "idempotency_key": "k1",
                "webhooks": [{"url": "https://hooks.test/a", "secret": "main"},
                             {"url": "https://hooks.test/b", "secret": "main"}],
                "quorum": 1, "metadata": {"order": 7}}"#,
        )
        .expect("valid");
        assert_eq!(j.state, State::Queued);
        assert_eq!(j.call.method, "POST");
        assert_eq!(j.deadline, 31_000);
        assert_eq!((j.quorum, j.deliveries.len()), (1, 2));
        assert_eq!(j.metadata["order"], 7);
        let j = parse(r#"{"url": "http://a.test/"}"#).expect("minimal");
        assert_eq!((j.call.method.as_str(), j.quorum), ("GET", 0));
    }

    #[test]
    fn each_bad_field_is_named() {
        for (json, field) in [
            (r#"{"url": "http://a.test/", "colour": 1}"#, "colour"),
            (r#"{"url": "ftp://a.test/"}"#, "url"),
            (r#"{}"#, "url"),
            (
                r#"{"url": "http://a.test/", "method": "CONNECT"}"#,
                "method",
            ),
            (
                r#"{"url": "http://a.test/", "headers": {"Sluice-Mode": "race"}}"#,
                "headers.Sluice-Mode",
            ),
            (r#"{"url": "http://a.test/", "mode": "fastest"}"#, "mode"),
            (
                r#"{"url": "http://a.test/", "timeout": "2 days"}"#,
                "timeout",
            ),
            (r#"{"url": "http://a.test/", "timeout": "soon"}"#, "timeout"),
            (
                r#"{"url": "http://a.test/", "body": "a", "body_base64": "YQ=="}"#,
                "body",
            ),
            (
                r#"{"url": "http://a.test/", "webhooks": [{"url": "http://h.test/", "secret": "other"}]}"#,
                "webhooks[0].secret",
            ),
            (
                r#"{"url": "http://a.test/", "webhooks": [{"url": "h.test", "secret": "main"}]}"#,
                "webhooks[0].url",
            ),
            (
                r#"{"url": "http://a.test/", "webhooks": [{"url": "http://h.test/", "secret": "main"}], "quorum": 2}"#,
                "quorum",
            ),
            (
                r#"{"url": "http://a.test/", "retry_on": "always"}"#,
                "retry_on",
            ),
            (r#"{"url": 5}"#, "url"),
        ] {
            let e = parse(json).expect_err(json);
            assert!(e.starts_with(field), "{json}: {e}");
        }
    }
}
