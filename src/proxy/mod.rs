//! `impl ProxyHttp`: a thin dispatcher. Each phase calls one module (target, resolve, headers,
//! error) and keeps its state in `Ctx`.

mod ctx;
pub mod headers;
pub mod pace;

pub use ctx::Ctx;

use crate::config::Generation;
use crate::error::{self, Code};
use crate::policy::auth::{AuthError, SLUICE_KEY};
use crate::resolve::resolve;
use crate::state::Shared;
use crate::target::{self, WayIn};
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::Duration;

/// Reads from the upstream get at least this long, even when the deadline is nearer.
const MIN_READ_TIMEOUT: Duration = Duration::from_millis(1);

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

    /// Find the destination and resolve it; refusals end here with a clear status.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if headers::came_through(session.req_header(), &self.shared.instance) {
            return Err(error::error(
                Code::LoopDetected,
                format!(
                    "this request already passed through this sluice (instance {}): a peer loop",
                    self.shared.instance
                ),
            ));
        }
        let dest = match target::destination(session.req_header(), &ctx.generation) {
            Ok(d) => d,
            Err((way, code, message)) => {
                ctx.way = way;
                return Err(error::error(code, message));
            }
        };
        ctx.way = dest.way;
        if ctx.generation.clients.enabled() {
            self.authenticate(session, ctx)?;
        }
        if let Some(v) = session.req_header().headers.get(pace::SLUICE_TIMEOUT) {
            let t = pace::parse_timeout(v).map_err(|m| error::error(Code::BadRequest, m))?;
            ctx.deadline = Some(ctx.started + t);
        }
        let security = &ctx.generation.config.security;
        if session.req_header().raw_path().len() > security.max_uri_bytes {
            return Err(error::error(
                Code::UriTooLong,
                format!("request target over {} bytes", security.max_uri_bytes),
            ));
        }
        if let Some(len) = content_length(session.req_header()) {
            if len > security.max_body_bytes {
                return Err(error::error(
                    Code::BodyTooLarge,
                    format!("request body over {} bytes", security.max_body_bytes),
                ));
            }
        }
        let egress = &ctx.generation.egress;
        egress
            .check_host(&dest.origin.host)
            .map_err(|(code, m)| error::error(code, m))?;
        let key = dest.origin.host_port();
        let regions = if ctx.generation.has_regions {
            let (profile, named) = ctx.generation.profile_for(&dest.origin.host, &key);
            named
                .then(|| self.shared.regions.get(ctx.generation.host_label(profile)))
                .flatten()
        } else {
            None
        };
        if regions.is_none() {
            // Configured regions carry their own addresses (trusted as configured): DNS is
            // only for hosts without them.
            let timeout = ctx.generation.config.server.dns_timeout.get();
            let addrs = resolve(
                &ctx.generation,
                &dest.origin.host,
                dest.origin.port,
                timeout,
            )
            .await?;
            ctx.addrs = egress
                .filter(&dest.origin.host, addrs)
                .map_err(|(code, m)| error::error(code, m))?;
        }
        ctx.upstream_path = dest.path;
        ctx.cell = Some(
            self.shared
                .admission
                .host(key, &dest.origin.host, &ctx.generation),
        );
        ctx.origin = Some(dest.origin);
        if let Some(host) = regions {
            crate::dispatch::run(&self.shared, session, ctx, host).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Bodies without a `Content-Length` (chunked) are held to the same cap as they stream.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            let max = ctx.generation.config.security.max_body_bytes;
            if ctx.body_bytes > max {
                return Err(error::error(
                    Code::BodyTooLarge,
                    format!("request body over {max} bytes"),
                ));
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        pace::before_attempt(&self.shared, ctx).await?;
        let Some(origin) = ctx.origin.as_ref() else {
            return Err(error::error(Code::Internal, "no destination chosen"));
        };
        if ctx.addrs.is_empty() {
            return Err(error::error(
                Code::Dns,
                format!("no address for {}", origin.host),
            ));
        }
        let addr = ctx.addrs[ctx.attempts as usize % ctx.addrs.len()];
        ctx.attempts += 1;
        let mut peer = HttpPeer::new(addr, origin.scheme.is_tls(), origin.host.clone());
        let read_timeout = ctx.generation.config.server.read_timeout.get();
        let read_timeout = ctx.time_left().map_or(read_timeout, |left| {
            left.min(read_timeout).max(MIN_READ_TIMEOUT)
        });
        peer_options(&mut peer, &ctx.generation, read_timeout);
        Ok(Box::new(peer))
    }

    /// Try the origin's next address while there is one not yet tried.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.shared
            .metrics
            .record_attempt(ctx.host_label(), Code::of(&e).as_str());
        if (ctx.attempts as usize) < ctx.addrs.len() {
            e.set_retry(true);
            ctx.connect_failed = true;
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream_head(upstream, ctx, &self.shared.via)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.shared.metrics.record_attempt(
            ctx.host_label(),
            crate::metrics::status_class(resp.status.as_u16()),
        );
        let req = session.req_header();
        let idempotent = req.method.is_idempotent() || req.headers.contains_key("idempotency-key");
        let replayable = !session.as_ref().retry_buffer_truncated();
        pace::after_response(&self.shared, resp, ctx, idempotent, replayable)
    }

    /// Pingora's default policy (no retry for non-idempotent methods or a body too large to
    /// replay), except that a request sent again after an upstream 429 is retried whatever its
    /// method: the upstream refused it, so nothing is duplicated.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if !matches!(e.etype(), pingora_error::ErrorType::CustomCode(..)) {
            self.shared
                .metrics
                .record_attempt(ctx.host_label(), Code::of(&e).as_str());
        }
        let mut e = e.more_context(format!("peer {peer}"));
        let resend = matches!(e.etype(), pingora_error::ErrorType::CustomCode(c, _) if *c == Code::RateLimited.as_str());
        if session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else if resend {
            // keep the retry decided by pace::after_response
        } else if !session.req_header().method.is_idempotent() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        client_head(&self.shared, resp, ctx, crate::metrics::IMPLICIT_REGION)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = Code::of(e);
        ctx.error = Some(code);
        let status = error::status_of(e);
        if status > 0 && session.response_written().is_none() {
            let message = error::message_of(e);
            let retry_after = ctx.retry_after.filter(|_| code == Code::RateLimited);
            if let Err(werr) = write_error(session, code, status, &message, retry_after, ctx).await
            {
                tracing::debug!(error = %werr, "could not send error response");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Refusals sluice decided itself are expected traffic, reported by the access log and
    /// metrics; only failures of the way to the upstream go to the error log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        matches!(e.etype(), pingora_error::ErrorType::CustomCode(..))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let outcome = ctx.error.or_else(|| e.map(Code::of));
        let elapsed = ctx.started.elapsed();
        self.shared
            .metrics
            .record(ctx.way, ctx.host_label(), outcome, elapsed.as_secs_f64());
        if ctx.generation.config.server.access_log {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            tracing::info!(
                target: "sluice::access",
                way = ctx.way.as_str(),
                host = ctx.origin.as_ref().map_or("-", |o| o.host.as_str()),
                region = ctx.region.as_deref().unwrap_or("-"),
                method = session.req_header().method.as_str(),
                status,
                attempts = ctx.attempts,
                queued_ms = ctx.queued.as_millis() as u64,
                ms = elapsed.as_millis() as u64,
                bytes_in = session.body_bytes_read(),
                bytes_out = session.body_bytes_sent(),
                error = outcome.map_or("-", Code::as_str),
            );
        }
    }
}

impl SluiceProxy {
    /// Authenticate the client: `Proxy-Authorization` on forward-proxy requests, `Sluice-Key`
    /// on explicit-target and route requests (401 there, as sluice is not their proxy).
    fn authenticate(&self, session: &Session, ctx: &mut Ctx) -> Result<()> {
        let clients = &ctx.generation.clients;
        let headers = &session.req_header().headers;
        let proxy_way = matches!(ctx.way, WayIn::Forward | WayIn::Connect);
        let result = if proxy_way {
            clients.proxy_authorization(
                headers
                    .get(http::header::PROXY_AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            )
        } else {
            clients.sluice_key(headers.get(SLUICE_KEY).map(|v| v.as_bytes()))
        };
        match result {
            Ok(client) => {
                if let Some(l) = &client.limits {
                    let cell = self
                        .shared
                        .admission
                        .client_cell(&client.name, l.rps, l.burst);
                    ctx.client_cell = Some(crate::admission::Host::Cell(cell));
                }
                ctx.client = Some(client.name.clone());
                Ok(())
            }
            Err(e) => {
                let (code, message) = match e {
                    AuthError::Required if proxy_way => (
                        Code::AuthRequired,
                        "authenticate with Proxy-Authorization (Basic or Bearer)",
                    ),
                    AuthError::Required => {
                        (Code::AuthRequired, "authenticate with a Sluice-Key header")
                    }
                    AuthError::Failed => (Code::AuthFailed, "credentials not accepted"),
                };
                let status = if proxy_way { 407 } else { 401 };
                Err(error::error_with_status(code, status, message))
            }
        }
    }
}

/// Turn the client's request head into the one sent upstream: the upstream path, no
/// hop-by-hop or control headers, this hop in `Via`, and the destination's `Host`.
pub fn upstream_head(upstream: &mut RequestHeader, ctx: &Ctx, via: &str) -> Result<()> {
    let Some(origin) = ctx.origin.as_ref() else {
        return Err(error::error(Code::Internal, "no destination chosen"));
    };
    let uri = http::Uri::try_from(ctx.upstream_path.as_str()).map_err(|e| {
        error::error(
            Code::BadTarget,
            format!("invalid upstream path {:?}: {e}", ctx.upstream_path),
        )
    })?;
    upstream.set_uri(uri);
    headers::clean_request(upstream, via);
    upstream.insert_header(http::header::HOST, origin.host_header())?;
    Ok(())
}

/// Turn an upstream response head into the one the client gets: counted, no hop-by-hop
/// headers, this hop in `Via`, and which region answered after how many attempts and how
/// long a wait.
pub fn client_head(
    shared: &Shared,
    resp: &mut ResponseHeader,
    ctx: &Ctx,
    region: &str,
) -> Result<()> {
    shared
        .metrics
        .record_upstream_status(ctx.way, resp.status.as_u16());
    headers::clean_response(resp, &shared.via);
    resp.insert_header("Sluice-Region", region)?;
    resp.insert_header("Sluice-Attempts", ctx.attempts.to_string())?;
    resp.insert_header("Sluice-Queued-Ms", ctx.queued.as_millis().to_string())?;
    Ok(())
}

/// Timeouts of a connection to an upstream or region.
pub fn peer_options(peer: &mut HttpPeer, generation: &Generation, read_timeout: Duration) {
    let server = &generation.config.server;
    peer.options.connection_timeout = Some(server.connect_timeout.get());
    peer.options.total_connection_timeout = Some(server.connect_timeout.get());
    peer.options.read_timeout = Some(read_timeout);
    peer.options.write_timeout = Some(server.write_timeout.get());
    peer.options.idle_timeout = Some(Duration::from_secs(60));
}

/// The request's declared body length.
fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
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
    if ctx.cell.is_some() {
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
