//! Making a job's call and delivering its result, both as requests to this process's own
//! proxy listener (`Sluice-Target`), so they take the one pipeline. What each answer means
//! for the job: sluice's own `429` (a pause longer than the wait) puts the call back in the
//! queue until the pause ends; any other answer ends the call; a failure after the request
//! may have reached the upstream is `outcome_unknown` unless the call is replayable.

use super::model::{Delivery, Job, Receipt, State, StoredAnswer};
use super::Process;
use super::{now_ms, sign, spec, JobsError, Task, JOB_CLIENT, JOB_TOKEN};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Longest a job waits for a paused host before asking again.
const MAX_REQUEUE: Duration = Duration::from_secs(300);

pub struct Caller {
    http: reqwest::Client,
    /// This process's proxy listener, as reached over loopback.
    listener: SocketAddr,
}

/// What one request to the listener came to.
enum Sent {
    /// An answer (the upstream's, or sluice's own refusal).
    Answered {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        truncated: bool,
        /// `Sluice-Error` of a refusal by sluice.
        refusal: Option<String>,
        retry_after: Option<u64>,
    },
    /// The listener could not be reached: nothing was sent upstream.
    Unsent(String),
    /// Broken after the request went in: the upstream may have seen it.
    Unknown(String),
}

impl Caller {
    pub fn new(shared: &dyn Process, workers: usize) -> Result<Caller, String> {
        let listen = &shared.generation().config.server.listen;
        let addr: SocketAddr = listen
            .parse()
            .map_err(|e| format!("server.listen {listen:?}: {e}"))?;
        let ip = match addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(workers)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("job client: {e}"))?;
        Ok(Caller {
            http,
            listener: SocketAddr::new(ip, addr.port()),
        })
    }

    pub async fn run(&self, shared: &dyn Process, task: Task) {
        let result = match &task {
            Task::Call(id) => self.call(shared, id).await,
            Task::Deliver(id, n) => self.deliver(shared, id, *n).await,
        };
        if let Err(e) = result {
            // The store failed: try the task again shortly rather than lose it.
            tracing::warn!(target: "sluice::jobs", error = ?e, ?task, "job task failed; again in 1 s");
            shared
                .jobs()
                .schedule(now_ms().saturating_add(1000), task)
                .await;
        }
    }

    /// One request into the pipeline for `url`, bounded by `timeout`; the answer's body kept
    /// up to `max_body` bytes.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        shared: &dyn Process,
        client: Option<&str>,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
        timeout: Duration,
        max_body: usize,
    ) -> Sent {
        let (origin, path) = match spec::parse_url("url", url) {
            Ok(p) => p,
            Err(e) => return Sent::Unsent(e),
        };
        let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
            return Sent::Unsent(format!("bad method {method:?}"));
        };
        let target = format!("{}://{}", origin.scheme.as_str(), origin.host_port());
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", self.listener))
            .header("sluice-target", target)
            .header(
                "sluice-timeout",
                format!("{}ms", spec::millis(timeout).max(1)),
            )
            .header(JOB_TOKEN, shared.jobs().token.as_str())
            // The pipeline's own timeout answers first; this only stops a stuck connection.
            .timeout(timeout.saturating_add(Duration::from_secs(5)))
            .body(body);
        if let Some(c) = client {
            req = req.header(JOB_CLIENT, c);
        }
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Sent::Unsent(e.to_string()),
            Err(e) => return Sent::Unknown(e.to_string()),
        };
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let refusal = header("sluice-error");
        let retry_after = header("retry-after").and_then(|v| v.trim().parse().ok());
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    let room = max_body.saturating_sub(body.len());
                    if c.len() > room {
                        body.extend_from_slice(&c[..room]);
                        truncated = true;
                        break;
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => break,
                // The answer's head is in: the call was made; only its body is short.
                Err(_) => {
                    truncated = true;
                    break;
                }
            }
        }
        Sent::Answered {
            status,
            headers,
            body,
            truncated,
            refusal,
            retry_after,
        }
    }

    async fn call(&self, shared: &dyn Process, id: &str) -> Result<(), JobsError> {
        let jobs = &shared.jobs();
        let config = shared.generation().config.clone();
        let retention = config.jobs.retention.get();
        let now = now_ms();
        let fleet = jobs.in_fleet();
        // Marked running (and counted) in the store before anything is sent: after a crash,
        // that mark is how the next process knows the call may have been made.
        let started = jobs
            .change(id, now, retention, move |j| {
                let fresh = j.state == State::Queued;
                // In a fleet, a running job whose task this node claimed was left by a node
                // that died: made again only if that is safe.
                let taken_over = fleet && j.state == State::Running && j.call.replayable();
                ((fresh || taken_over) && j.deadline > now).then(|| {
                    j.state = State::Running;
                    j.attempts = j.attempts.saturating_add(1);
                    fresh
                })
            })
            .await?;
        let Some((job, fresh)) = started else {
            // Canceled, done already, out of time, or left unsafe to make again.
            let Some(j) = jobs.get(id).await? else {
                return Ok(());
            };
            let outcome = match j.state {
                State::Queued => "timeout",
                State::Running if fleet && j.deadline <= now => "timeout",
                State::Running if fleet => "outcome_unknown",
                _ if fleet => {
                    // Called already: this task was taken over from a node that died between
                    // ending the call and handing its webhooks to Redis. Owe them again (a
                    // receiver may hear twice, with one webhook-id).
                    for (n, d) in j.deliveries.iter().enumerate() {
                        if d.receipt == Receipt::Pending {
                            jobs.schedule(d.next_at, Task::Deliver(id.to_string(), n))
                                .await;
                        }
                    }
                    return Ok(());
                }
                _ => return Ok(()),
            };
            let outcome = Some(outcome.to_string());
            return jobs
                .finish(id, State::Failed, None, outcome, now, retention)
                .await;
        };
        if fresh {
            jobs.count(Some(State::Queued), State::Running);
        }
        let mut headers = job.call.headers.clone();
        let control = [
            ("sluice-mode", job.call.mode.clone()),
            (
                "sluice-regions",
                job.call.regions.as_ref().map(|r| r.join(",")),
            ),
            ("sluice-retry-on", job.call.retry_on.clone()),
            ("idempotency-key", job.call.idempotency_key.clone()),
        ];
        for (k, v) in control {
            if let Some(v) = v {
                headers.push((k.to_string(), v));
            }
        }
        let left = Duration::from_millis(job.deadline.saturating_sub(now));
        let sent = self
            .send(
                shared,
                job.client.as_deref(),
                &job.call.method,
                &job.call.url,
                &headers,
                job.call.body.clone(),
                left,
                config.jobs.max_result_bytes,
            )
            .await;
        let now = now_ms();
        // A broken call that is safe to send again is as good as one never sent.
        let sent = match sent {
            Sent::Unknown(e) if job.call.replayable() => Sent::Unsent(e),
            s => s,
        };
        match sent {
            Sent::Answered {
                status: 429,
                refusal: Some(code),
                retry_after,
                ..
            } if code == "rate_limited" => {
                // The host is paused past what one request may wait: wait it out here.
                let wait = Duration::from_secs(retry_after.unwrap_or(1).max(1)).min(MAX_REQUEUE);
                let at = now.saturating_add(spec::millis(wait)).min(job.deadline);
                jobs.requeue(id, at, retention, Some("paused".into())).await
            }
            Sent::Answered {
                status,
                headers,
                body,
                truncated,
                refusal,
                ..
            } => {
                let state = if (200..300).contains(&status) {
                    State::Succeeded
                } else {
                    State::Failed
                };
                let answer = StoredAnswer {
                    status,
                    headers,
                    body,
                    truncated,
                };
                jobs.finish(id, state, Some(answer), refusal, now, retention)
                    .await
            }
            // Never sent, or broken but safe to send again: back in the queue for a second.
            Sent::Unsent(e) => {
                tracing::warn!(target: "sluice::jobs", id, error = %e, "job call not made; again in 1 s");
                let at = now.saturating_add(1000);
                jobs.requeue(id, at, retention, None).await
            }
            Sent::Unknown(e) => {
                tracing::warn!(target: "sluice::jobs", id, error = %e, "job call broke after it was sent");
                let outcome = Some("outcome_unknown".to_string());
                jobs.finish(id, State::Failed, None, outcome, now, retention)
                    .await
            }
        }
    }

    async fn deliver(&self, shared: &dyn Process, id: &str, n: usize) -> Result<(), JobsError> {
        let jobs = &shared.jobs();
        let generation = shared.generation();
        let config = &generation.config;
        let hooks = &config.webhooks;
        let Some(job) = jobs.get(id).await? else {
            return Ok(());
        };
        let Some(d) = job
            .deliveries
            .get(n)
            .filter(|d| d.receipt == Receipt::Pending)
        else {
            return Ok(());
        };
        let now = now_ms();
        let until = job
            .finished
            .unwrap_or(now)
            .saturating_add(spec::millis(hooks.delivery_ttl.get()));
        let keys: Result<Vec<Vec<u8>>, String> = match hooks.secrets.get(&d.secret) {
            Some(secret) => secret
                .values()
                .into_iter()
                .map(crate::config::secret_key)
                .collect(),
            None => Err(format!("secret {:?} is no longer configured", d.secret)),
        };
        let outcome = if now >= until {
            Outcome::GiveUp("out of webhooks.delivery_ttl".into())
        } else {
            match keys {
                Err(e) => Outcome::GiveUp(e),
                Ok(keys) => 'signed: {
                    let body = payload(&job);
                    let ts = now / 1000;
                    let msg = format!("msg_{}", job.id);
                    let Some(signature) = sign::header(&keys, &msg, ts, &body) else {
                        break 'signed Outcome::GiveUp("a secret HMAC cannot use".into());
                    };
                    let headers = vec![
                        ("content-type".into(), "application/json".into()),
                        ("webhook-id".into(), msg.clone()),
                        ("webhook-timestamp".into(), ts.to_string()),
                        ("webhook-signature".into(), signature),
                    ];
                    let sent = self
                        .send(
                            shared,
                            job.client.as_deref(),
                            "POST",
                            &d.url,
                            &headers,
                            body,
                            hooks.timeout.get(),
                            4096,
                        )
                        .await;
                    Outcome::of(sent)
                }
            }
        };
        let backoff = sign::backoff(
            hooks.backoff_base.get(),
            hooks.backoff_max.get(),
            d.attempts,
            fastrand::f64(),
        );
        let retention = config.jobs.retention.get();
        let label = outcome.label();
        let changed = jobs
            .change(id, now, retention, move |j| {
                let d = j
                    .deliveries
                    .get_mut(n)
                    .filter(|d| d.receipt == Receipt::Pending)?;
                outcome.clone().apply(d, now, backoff, until);
                let receipt = d.receipt;
                let next = d.next_at;
                let from = j.state;
                let settled = j.settle().map(|to| (from, to));
                Some((receipt, next, settled))
            })
            .await?;
        let Some((job, (receipt, next, settled))) = changed else {
            return Ok(());
        };
        let d = &job.deliveries[n];
        jobs.metrics.deliveries.with_label_values(&[label]).inc();
        tracing::info!(
            target: "sluice::jobs",
            id,
            receiver = n,
            url = %d.url,
            attempt = d.attempts,
            status = d.last_status.unwrap_or(0),
            receipt = ?receipt,
            error = d.last_error.as_deref().unwrap_or("-"),
            "webhook delivery"
        );
        if let Some((from, to)) = settled {
            jobs.count(Some(from), to);
        }
        if receipt == Receipt::Pending {
            jobs.schedule(next, Task::Deliver(id.to_string(), n)).await;
        }
        Ok(())
    }
}

/// What one delivery attempt came to.
#[derive(Clone)]
enum Outcome {
    Acked(u16),
    Gone,
    /// Try again (after the backoff, or at `Retry-After` for sluice's own 429).
    Again {
        status: Option<u16>,
        error: String,
        at_least: Option<u64>,
    },
    /// sluice's own pace or pause held it back: nothing was sent; again at `Retry-After`.
    Held {
        retry_after: u64,
    },
    GiveUp(String),
}

impl Outcome {
    /// Its `sluice_job_deliveries_total` label.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Acked(_) => "acked",
            Outcome::Gone => "gone",
            Outcome::GiveUp(_) => "gave_up",
            Outcome::Again { .. } => "failed",
            Outcome::Held { .. } => "held",
        }
    }

    fn of(sent: Sent) -> Outcome {
        match sent {
            Sent::Answered { status, .. } if (200..300).contains(&status) => Outcome::Acked(status),
            Sent::Answered {
                status: 410,
                refusal: None,
                ..
            } => Outcome::Gone,
            Sent::Answered {
                status: 429,
                refusal: Some(code),
                retry_after,
                ..
            } if code == "rate_limited" => Outcome::Held {
                retry_after: retry_after.unwrap_or(1).clamp(1, 3600),
            },
            Sent::Answered {
                refusal: Some(code),
                ..
            } if code.starts_with("forbidden_") => {
                Outcome::GiveUp(format!("refused by sluice's egress policy ({code})"))
            }
            Sent::Answered {
                status,
                refusal,
                retry_after,
                ..
            } => Outcome::Again {
                status: Some(status),
                error: refusal.unwrap_or_else(|| format!("answered {status}")),
                at_least: retry_after.map(|s| s.min(3600).saturating_mul(1000)),
            },
            Sent::Unsent(e) | Sent::Unknown(e) => Outcome::Again {
                status: None,
                error: e,
                at_least: None,
            },
        }
    }

    fn apply(self, d: &mut Delivery, now: u64, backoff: Duration, until: u64) {
        if let Outcome::Held { retry_after } = self {
            d.next_at = now.saturating_add(retry_after * 1000).min(until);
            return;
        }
        d.attempts = d.attempts.saturating_add(1);
        match self {
            Outcome::Acked(status) => {
                d.receipt = Receipt::Acked;
                d.last_status = Some(status);
                d.last_error = None;
            }
            Outcome::Gone => {
                d.receipt = Receipt::Gone;
                d.last_status = Some(410);
            }
            Outcome::GiveUp(e) => {
                d.receipt = Receipt::GaveUp;
                d.last_error = Some(e);
            }
            Outcome::Held { .. } => {}
            Outcome::Again {
                status,
                error,
                at_least,
            } => {
                d.last_status = status;
                d.last_error = Some(error);
                let wait = spec::millis(backoff).max(at_least.unwrap_or(0));
                // Past the TTL, one last visit at its end gives up.
                d.next_at = now.saturating_add(wait).min(until);
            }
        }
    }
}

/// The webhook body: the same bytes on every try of one job (Standard Webhooks' shape:
/// `type`, `timestamp`, `data`).
pub fn payload(job: &Job) -> Vec<u8> {
    let finished = job.finished.unwrap_or(job.created);
    let timestamp = httpdate_rfc3339(finished);
    let state = match job.state {
        State::Delivered | State::Dead => {
            if job
                .answer
                .as_ref()
                .is_some_and(|a| (200..300).contains(&a.status))
            {
                State::Succeeded
            } else {
                State::Failed
            }
        }
        s => s,
    };
    let value = serde_json::json!({
        "type": format!("job.{}", state.as_str()),
        "timestamp": timestamp,
        "data": {
            "id": job.id,
            "state": state.as_str(),
            "outcome": job.outcome,
            "attempts": job.attempts,
            "url": job.call.url,
            "method": job.call.method,
            "status": job.answer.as_ref().map(|a| a.status),
            "headers": job.answer.as_ref().map(|a| &a.headers),
            "body_base64": job.answer.as_ref().map(|a| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&a.body)
            }),
            "truncated": job.answer.as_ref().is_some_and(|a| a.truncated),
            "metadata": job.metadata,
        }
    });
    value.to_string().into_bytes()
}

/// Unix ms as RFC 3339 UTC (`2026-12-02T10:00:00.123Z`).
fn httpdate_rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH
        + time::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX));
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&format).unwrap_or_default()
}
