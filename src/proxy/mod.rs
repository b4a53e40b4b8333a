//! `impl ProxyHttp`: the downstream session only. Every request is handed to the one
//! pipeline (`dispatch::serve`) from `request_filter`; this module keeps the error page that
//! answers a failure before any response head went out, and the access log and request
//! metrics. Pingora's own upstream phases are not used: the pipeline owns every attempt.

use crate::dispatch::{self, Ctx};
use crate::error::{self, Code};
use crate::state::Shared;
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::Duration;

/// The HTTP side of sluice (forward proxy, explicit target, routes).
pub struct SluiceProxy {
    shared: Arc<Shared>,
}

impl SluiceProxy {
    pub fn new(shared: Arc<Shared>) -> SluiceProxy {
        SluiceProxy { shared }
    }
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new(self.shared.generation())
    }

    /// The whole request: `Ok(true)` says the response was sent; an error before the
    /// response head went out is answered by `fail_to_proxy`.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if crate::jobs::api::claims(session.req_header()) {
            ctx.way = crate::target::WayIn::Jobs;
            crate::jobs::api::serve(&*self.shared, session, &ctx.generation.clone()).await?;
            return Ok(true);
        }
        dispatch::serve(&self.shared, session, ctx).await?;
        Ok(true)
    }

    /// Never reached: `request_filter` serves every request.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Err(error::error(
            Code::Internal,
            "the pipeline serves every request",
        ))
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = Code::of(e);
        ctx.error = Some(code);
        let status = error::status_of(e);
        // Only an interim `100 Continue` may have gone out: a final answer still can.
        let answered = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational());
        if status > 0 && !answered {
            let message = error::message_of(e);
            let retry_after = error::retry_after_of(e).filter(|_| code == Code::RateLimited);
            if let Err(werr) = write_error(session, code, status, &message, retry_after, ctx).await
            {
                tracing::debug!(error = %werr, "could not send error response");
            } else if code == Code::BodyTooLarge {
                linger(session).await;
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Refusals sluice decided itself are expected traffic, and so is a client that leaves
    /// (a stream it cancelled): the access log and metrics report them (`client_closed`);
    /// only failures of the way to the upstream go to the error log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        matches!(e.etype(), pingora_error::ErrorType::CustomCode(..))
            || Code::of(e) == Code::ClientClosed
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        crate::access::Line {
            way: ctx.way,
            host: ctx.origin.as_ref().map(|o| o.host.as_str()),
            region: ctx.region.as_deref(),
            method: Some(session.req_header().method.as_str()),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            attempts: ctx.attempts,
            queued: ctx.queued,
            elapsed: ctx.started.elapsed(),
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            error: ctx.error.or_else(|| e.map(Code::of)),
            protocol: Some((
                match session.as_downstream().is_http2() {
                    true => crate::upstream::Protocol::H2.as_str(),
                    false => crate::upstream::Protocol::H1.as_str(),
                },
                ctx.upstream_protocol.map(crate::upstream::Protocol::as_str),
            )),
            ..Default::default()
        }
        .finish(&self.shared, &ctx.generation, ctx.host_label());
    }
}

/// Most of a refused body read and dropped after the refusal, and for how long.
const LINGER_BYTES: usize = 4 * 1024 * 1024;
const LINGER_FOR: Duration = Duration::from_secs(1);

/// After refusing a request whose client is still sending its body, read and drop some of
/// it before the connection closes: closing on unread bytes sends a reset, which destroys
/// the refusal before the client reads it. Bounded in bytes and time.
async fn linger(session: &mut Session) {
    let until = tokio::time::Instant::now() + LINGER_FOR;
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(until, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => left = left.saturating_sub(chunk.len().max(1)),
            _ => break,
        }
    }
}

/// Send sluice's own error response: status, `Sluice-Error` and a JSON body.
async fn write_error(
    session: &mut Session,
    code: Code,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
    ctx: &Ctx,
) -> Result<()> {
    let body = error::json_body(code, message);
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header("Sluice-Error", code.as_str())?;
    match status {
        407 => resp.insert_header(http::header::PROXY_AUTHENTICATE, "Basic realm=\"sluice\"")?,
        401 => resp.insert_header(
            http::header::WWW_AUTHENTICATE,
            "Sluice-Key realm=\"sluice\"",
        )?,
        _ => {}
    }
    if let Some(secs) = retry_after {
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    if ctx.profile.is_some() {
        resp.insert_header("Sluice-Queued-Ms", ctx.queued.as_millis().to_string())?;
    }
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}
