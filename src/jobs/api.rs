//! The jobs API on the proxy listener, under `/_sluice/v1/`: `POST jobs` (`202`), `GET
//! jobs/{id}`, `DELETE jobs/{id}`; and a proxied request that asks to be a job (`Prefer:
//! respond-async` with `Sluice-Webhook`, or a `Sluice-Webhook` request that would otherwise
//! get sluice's `429`). Errors are returned for the proxy's error page (`Sluice-Error`).

use super::model::{Call, Delivery, Job, Receipt, State};
use super::Process;
use super::{now_ms, spec, Jobs, JobsError};
use crate::error::{self, Code};
use crate::generation::Generation;
use crate::policy::auth::{self, SLUICE_KEY};
use crate::target::Origin;
use bytes::Bytes;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

/// The API's path prefix.
pub const PREFIX: &str = "/_sluice/v1/";
/// Where a proxied request asks for its result to go.
pub const SLUICE_WEBHOOK: &str = "sluice-webhook";
/// Which `[webhooks.secrets]` entry signs it (default: `default`, or the only one).
pub const SLUICE_WEBHOOK_SECRET: &str = "sluice-webhook-secret";

/// Is this request for the API (origin-form, under the prefix, for no other destination)?
pub fn claims(req: &RequestHeader) -> bool {
    req.uri.scheme().is_none()
        && req.uri.path().starts_with(PREFIX)
        && !req.headers.contains_key(crate::target::SLUICE_TARGET)
}

fn jobs_error(e: JobsError) -> Box<pingora_error::Error> {
    match e {
        JobsError::Unavailable(m) => error::error(Code::JobsUnavailable, m),
        JobsError::Store(e) => {
            tracing::error!(target: "sluice::jobs", error = %e, "job store");
            error::error(Code::JobsUnavailable, e.to_string())
        }
    }
}

fn status_url(id: &str) -> String {
    format!("{PREFIX}jobs/{id}")
}

/// Serve an API request.
pub async fn serve(
    shared: &dyn Process,
    session: &mut Session,
    generation: &Generation,
) -> Result<()> {
    if !generation.config.jobs.enabled {
        return Err(error::error(
            Code::NotFound,
            "jobs are off (jobs.enabled = false)",
        ));
    }
    let client = client_of(session, generation)?;
    let req = session.req_header();
    let path = req.uri.path()[PREFIX.len()..].to_string();
    let method = req.method.as_str().to_string();
    let jobs = &shared.jobs();
    match (
        method.as_str(),
        path.split('/').collect::<Vec<_>>().as_slice(),
    ) {
        ("POST", ["jobs"]) => {
            let body = read_body(session, generation).await?;
            let job = spec::job_of(&body, &generation.config, client, Jobs::new_id(), now_ms())
                .map_err(|m| error::error(Code::BadRequest, m))?;
            accept(shared, session, generation, job).await
        }
        ("GET", ["jobs", id]) => {
            let job = jobs.get(id).await.map_err(jobs_error)?;
            let job = visible(job, client.as_deref(), id)?;
            write_json(session, 200, &view(&job), None).await
        }
        ("DELETE", ["jobs", id]) => {
            let owner = jobs.get(id).await.map_err(jobs_error)?;
            visible(owner, client.as_deref(), id)?;
            match jobs
                .cancel(generation.config.jobs.retention.get(), id)
                .await
                .map_err(jobs_error)?
            {
                Some(Ok(job)) => write_json(session, 200, &view(&job), None).await,
                Some(Err(job)) => Err(error::error(
                    Code::JobStarted,
                    format!(
                        "job {} is {}: only a queued job can be canceled",
                        job.id,
                        job.state.as_str()
                    ),
                )),
                None => Err(not_found(id)),
            }
        }
        (_, ["jobs"]) | (_, ["jobs", _]) => Err(error::error_with_status(
            Code::BadRequest,
            405,
            format!(
                "{method} is not allowed here: POST {PREFIX}jobs, GET or DELETE {PREFIX}jobs/ID"
            ),
        )),
        _ => Err(error::error(
            Code::NotFound,
            format!("no such API path: {PREFIX}{path}"),
        )),
    }
}

fn not_found(id: &str) -> Box<pingora_error::Error> {
    error::error(Code::NotFound, format!("no job {id:?}"))
}

/// A job is seen only by the client that submitted it.
fn visible(job: Option<Job>, client: Option<&str>, id: &str) -> Result<Job> {
    match job {
        Some(j) if j.client.as_deref() == client => Ok(j),
        _ => Err(not_found(id)),
    }
}

/// With clients configured, the API needs a `Sluice-Key` (or `Proxy-Authorization`).
fn client_of(session: &Session, generation: &Generation) -> Result<Option<String>> {
    if !generation.clients.enabled() {
        return Ok(None);
    }
    let h = &session.req_header().headers;
    let proxy = h
        .get(http::header::PROXY_AUTHORIZATION)
        .map(|v| v.as_bytes());
    let client = auth::authenticate(
        &generation.clients,
        proxy.is_some(),
        proxy,
        h.get(SLUICE_KEY).map(|v| v.as_bytes()),
    )
    .map_err(|(code, status, m)| error::error_with_status(code, status, m))?;
    Ok(Some(client.name.clone()))
}

/// The request body, at most `jobs.max_submission_bytes`.
async fn read_body(session: &mut Session, generation: &Generation) -> Result<Vec<u8>> {
    let cap = generation.config.jobs.max_submission_bytes;
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if (body.len() + chunk.len()) as u64 > cap {
            return Err(error::error(
                Code::BodyTooLarge,
                format!("a job submission is at most {cap} bytes (jobs.max_submission_bytes)"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Check the webhooks' destinations against the egress policy, store the job, answer `202`.
async fn accept(
    shared: &dyn Process,
    session: &mut Session,
    generation: &Generation,
    job: Job,
) -> Result<()> {
    for (i, d) in job.deliveries.iter().enumerate() {
        allowed(shared, generation, &d.url)
            .await
            .map_err(|m| error::error(Code::BadRequest, format!("webhooks[{i}].url: {m}")))?;
    }
    let (job, new) = shared.jobs().submit(job).await.map_err(jobs_error)?;
    let body = serde_json::json!({
        "id": job.id,
        "status_url": status_url(&job.id),
        "state": job.state.as_str(),
        "existing": !new,
    });
    write_json(session, 202, &body, Some(&status_url(&job.id))).await
}

/// May sluice send to this URL? The same policy as every request: names denied or not
/// allowed, and addresses in denied ranges (resolved now; checked again when sent).
async fn allowed(
    shared: &dyn Process,
    generation: &Generation,
    url: &str,
) -> std::result::Result<(), String> {
    let (origin, _) = spec::parse_url("url", url)?;
    let egress = &generation.egress;
    egress.check_host(&origin.host).map_err(|(_, m)| m)?;
    let timeout = generation.config.server.dns_timeout.get();
    let addrs = shared
        .dns()
        .resolve(
            generation,
            shared.metrics(),
            &origin.host,
            origin.port,
            timeout,
        )
        .await
        .map_err(|e| error::message_of(&e))?;
    egress.filter(&origin.host, addrs).map_err(|(_, m)| m)?;
    Ok(())
}

/// The webhooks a proxied request names (`Sluice-Webhook`, one or more, comma-separated).
pub fn webhooks_of(req: &RequestHeader) -> Vec<String> {
    req.headers
        .get_all(SLUICE_WEBHOOK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Does the request prefer an asynchronous answer (RFC 7240 `Prefer: respond-async`)?
pub fn prefers_async(req: &RequestHeader) -> bool {
    req.headers
        .get_all(http::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// A proxied request taken as a job: its destination already passed the policy and its
/// client is authenticated; its body is read here (at most `jobs.max_submission_bytes`),
/// unless it was read already (`early`, to estimate its tokens).
#[allow(clippy::too_many_arguments)]
pub async fn accept_proxied(
    shared: &dyn Process,
    session: &mut Session,
    generation: &Generation,
    client: Option<String>,
    origin: &Origin,
    path: &str,
    webhooks: Vec<String>,
    early: Option<bytes::Bytes>,
) -> Result<()> {
    let config = &generation.config;
    if !config.jobs.enabled {
        return Err(error::error(
            Code::BadRequest,
            "Sluice-Webhook: jobs are off (jobs.enabled = false)",
        ));
    }
    let req = session.req_header();
    let secret =
        match req
            .headers
            .get(SLUICE_WEBHOOK_SECRET)
            .and_then(|v| v.to_str().ok())
        {
            Some(name) => name.trim().to_string(),
            None if config.webhooks.secrets.contains_key("default") => "default".into(),
            None if config.webhooks.secrets.len() == 1 => config
                .webhooks
                .secrets
                .keys()
                .next()
                .cloned()
                .unwrap_or_default(),
            None => return Err(error::error(
                Code::BadRequest,
                "Sluice-Webhook-Secret: name the [webhooks.secrets] entry that signs the result",
            )),
        };
    if !config.webhooks.secrets.contains_key(&secret) {
        return Err(error::error(
            Code::BadRequest,
            format!("Sluice-Webhook-Secret: {secret:?} is not a secret in [webhooks.secrets]"),
        ));
    }
    if webhooks.len() > spec::MAX_WEBHOOKS {
        return Err(error::error(
            Code::BadRequest,
            format!("Sluice-Webhook: at most {} URLs", spec::MAX_WEBHOOKS),
        ));
    }
    for (i, w) in webhooks.iter().enumerate() {
        spec::parse_url(&format!("Sluice-Webhook[{i}]"), w)
            .map_err(|m| error::error(Code::BadRequest, m))?;
    }
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    };
    let timeout = match header("sluice-timeout") {
        Some(t) => humantime::parse_duration(&t)
            .map_err(|e| error::error(Code::BadRequest, format!("Sluice-Timeout {t:?}: {e}")))?
            .min(config.jobs.max_timeout.get()),
        None => config.jobs.default_timeout.get(),
    };
    let mut headers = Vec::new();
    for (k, v) in req.headers.iter() {
        let name = k.as_str();
        if spec::reserved(name) || name == "prefer" || name == "idempotency-key" {
            continue;
        }
        if let Ok(v) = v.to_str() {
            headers.push((name.to_string(), v.to_string()));
        }
    }
    let method = req.method.as_str().to_string();
    let call = Call {
        url: format!("{}://{}{path}", origin.scheme.as_str(), origin.host_port()),
        method,
        headers,
        body: Vec::new(),
        mode: header("sluice-mode"),
        regions: header("sluice-regions")
            .map(|r| r.split(',').map(|n| n.trim().to_string()).collect()),
        retry_on: header("sluice-retry-on"),
        idempotency_key: header("idempotency-key"),
    };
    let body = match early {
        Some(b) if b.len() as u64 > config.jobs.max_submission_bytes => {
            return Err(error::error(
                Code::BodyTooLarge,
                format!(
                    "a job submission is at most {} bytes (jobs.max_submission_bytes)",
                    config.jobs.max_submission_bytes
                ),
            ))
        }
        Some(b) => b.to_vec(),
        None => read_body(session, generation).await?,
    };
    let now = now_ms();
    let deliveries = webhooks
        .into_iter()
        .map(|url| Delivery {
            url,
            secret: secret.clone(),
            receipt: Receipt::Pending,
            attempts: 0,
            last_status: None,
            last_error: None,
            next_at: 0,
        })
        .collect::<Vec<_>>();
    let job = Job {
        id: Jobs::new_id(),
        client,
        created: now,
        deadline: now.saturating_add(spec::millis(timeout)),
        state: State::Queued,
        next_at: now,
        attempts: 0,
        outcome: None,
        call: Call { body, ..call },
        answer: None,
        quorum: deliveries.len(),
        deliveries,
        metadata: serde_json::Value::Null,
        finished: None,
    };
    accept(shared, session, generation, job).await
}

/// A job as the API shows it (the call's body left out).
pub fn view(job: &Job) -> serde_json::Value {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    serde_json::json!({
        "id": job.id,
        "state": job.state.as_str(),
        "status_url": status_url(&job.id),
        "created_ms": job.created,
        "deadline_ms": job.deadline,
        "finished_ms": job.finished,
        "attempts": job.attempts,
        "outcome": job.outcome,
        "url": job.call.url,
        "method": job.call.method,
        "idempotency_key": job.call.idempotency_key,
        "result": job.answer.as_ref().map(|a| serde_json::json!({
            "status": a.status,
            "headers": a.headers,
            "body_base64": b64(&a.body),
            "truncated": a.truncated,
        })),
        "quorum": job.quorum,
        "acked": job.acked(),
        "webhooks": job.deliveries.iter().map(|d| serde_json::json!({
            "url": d.url,
            "state": d.receipt,
            "attempts": d.attempts,
            "last_status": d.last_status,
            "last_error": d.last_error,
            "next_at_ms": (d.receipt == Receipt::Pending).then_some(d.next_at),
        })).collect::<Vec<_>>(),
        "metadata": job.metadata,
    })
}

async fn write_json(
    session: &mut Session,
    status: u16,
    value: &serde_json::Value,
    location: Option<&str>,
) -> Result<()> {
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(l) = location {
        resp.insert_header(http::header::LOCATION, l)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}
