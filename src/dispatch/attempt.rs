//! One attempt of a request against one endpoint (a region, or one DNS answer of a host
//! without regions): admission, connect, send the head and the body (streamed or replayed),
//! read the response head. The caller races attempts and streams the winner.

use super::body::{Piece, Source};
use super::Outbound;
use crate::admission::{AtSend, Host, Permit};
use crate::error::{self, Code};
use crate::regions::state::InFlight;
use crate::regions::Region;
use crate::upstream::Session;
use http::HeaderValue;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::RequestHeader;
use std::time::Duration;

/// How an attempt takes its admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Already admitted (the request's first attempt).
    Held,
    /// Wait for a slot like any request (a retry).
    Wait,
    /// Only if a slot is free now (a hedge or race duplicate: never queue a duplicate).
    IfFree,
}

impl Admit {
    /// How long an attempt admitted this way may wait for its slot: a duplicate never
    /// queues, it goes only if a slot is free now.
    fn wait(self, job: &Outbound<'_>) -> Duration {
        match self {
            Admit::IfFree => Duration::ZERO,
            _ => job.plan.max_wait(),
        }
    }
}

/// A response head from a region, with what is needed to stream its body.
pub struct Answer {
    pub session: Session,
    pub region: usize,
    /// When the attempt began, on the clock of region state (`Regions::now`).
    pub started: u64,
    /// The host's in-flight place, held until the body is streamed.
    pub permit: Option<Permit>,
    pub in_flight: InFlight,
}

/// Why an attempt ended without an answer.
pub struct Failed {
    pub region: usize,
    pub error: Box<pingora_error::Error>,
    /// The attempt never reached the upstream (admission refused it, or it could not connect).
    pub unsent: bool,
    /// It was sent on a kept-alive connection taken from the pool.
    pub reused: bool,
    /// Its h2 stream was refused before the upstream processed it.
    pub refused: bool,
}

pub type Outcome = std::result::Result<Answer, Failed>;

/// Run one attempt to `region` (index into the host's regions) after `delay` (backoff).
pub async fn run(
    job: &Outbound<'_>,
    region: usize,
    admit: Admit,
    permit: Option<Permit>,
    delay: Duration,
    head: RequestHeader,
    body: Source,
) -> Outcome {
    let fail = |error: Box<pingora_error::Error>, unsent: bool| Failed {
        region,
        error,
        unsent,
        reused: false,
        refused: false,
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut permit = match (admit, permit) {
        (Admit::Held, p) => p,
        (_, Some(p)) => Some(p),
        (how, None) => Some(
            admit_attempt(job, &job.plan.cell, how.wait(job))
                .await
                .map_err(|e| fail(e, true))?,
        ),
    };
    let r = &job.plan.route.host.regions[region];
    let in_flight = r.state.enter();
    let mut pending = Pending {
        state: &r.state,
        regions: &job.shared.regions,
        started: job.shared.regions.now(),
        armed: true,
    };
    let peer = match peer_for(job, r).await {
        Ok(p) => p,
        Err(e) => return Err(fail(e, true)),
    };
    let (mut session, reused) = loop {
        let (session, pooled) = match job.shared.upstream.session(&peer, &r.state.open).await {
            Ok(s) => s,
            Err(e) => return Err(fail(e.into_up(), true)),
        };
        if !pooled {
            // A host without regions that holds connections is remembered (its counts in
            // `/status`).
            job.shared.regions.keep(&job.plan.route.host);
        }
        let Some(p) = permit.as_ref() else {
            break (session, pooled);
        };
        let cell = &job.plan.cell;
        let look = job.shared.regions.now();
        let send = job
            .shared
            .admission
            .before_send(cell, p, job.generation())
            .await;
        // Time spent waiting for its place among the host's sends is not the region's
        // latency: it is the request's wait.
        job.waited(pending.set_aside(look));
        if send == AtSend::Go {
            break (session, pooled);
        }
        // Paused since it was admitted: the unused connection goes back to the pool while
        // the request waits out the pause like a new one.
        session.release().await;
        // Its in-flight place is given back first (a host with room for one would wait on
        // itself).
        drop(permit.take());
        let wait = admit.wait(job);
        let look = job.shared.regions.now();
        permit = Some(
            admit_attempt(job, cell, wait)
                .await
                .map_err(|e| fail(e, true))?,
        );
        pending.set_aside(look);
    };
    // The deadline bounds the wait for the head (exec's deadline arm); each read only by
    // `server.read_timeout` when one is set.
    session.set_read_timeout(job.read_timeout());
    session.set_write_timeout(Some(job.generation().config.server.write_timeout.get()));
    let head = match request_head(job, r, head).and_then(|h| for_version(job, &session, h)) {
        Ok(h) => h,
        Err(e) => return Err(fail(e, true)),
    };
    // A stream the upstream refused (or left past its GOAWAY) was never processed: it goes
    // again, to the same endpoint on another connection, whatever its method.
    let after_send = |error: Box<pingora_error::Error>| match never_processed(&error) {
        true => Failed {
            region,
            error: error::error(
                Code::UpstreamClosed,
                "the upstream refused the h2 stream before processing it",
            ),
            unsent: true,
            reused: true,
            refused: true,
        },
        false => Failed {
            reused,
            ..fail(error.into_up(), false)
        },
    };
    // From here the upstream may count the request's tokens: they are kept if it fails.
    if let Some(p) = &mut permit {
        p.mark_sent();
    }
    let read = match send(&mut session, head, body).await {
        Ok(()) => read_final_head(&mut session).await,
        // An h2 stream that stopped taking the body ended for a reason its answer tells: an
        // answer sent early (the upstream stops the upload), or the stream's own error.
        Err(e) if head_sent_on_h2(&session) => {
            match tokio::time::timeout(STREAM_END_WAIT, read_final_head(&mut session)).await {
                Ok(read) => read,
                Err(_) => Err(e),
            }
        }
        Err(e) => return Err(after_send(e)),
    };
    pending.armed = false;
    if let Err(e) = read {
        return Err(after_send(e));
    }
    // A 429 used no tokens (whether it is retried or passed on).
    if let (Some(p), Some(h)) = (&mut permit, session.response_header()) {
        if h.status.as_u16() == 429 || super::pace::grpc_exhausted(&h.headers).is_some() {
            job.shared
                .admission
                .settle(p, crate::admission::TokenCost::default());
        }
    }
    Ok(Answer {
        session,
        region,
        started: pending.started,
        permit,
        in_flight,
    })
}

/// Admission for an attempt that has none yet (a retry, a duplicate, or one whose host was
/// paused since its first admission), at most `wait`.
async fn admit_attempt(
    job: &Outbound<'_>,
    cell: &Host,
    wait: Duration,
) -> std::result::Result<Permit, Box<pingora_error::Error>> {
    crate::gate::admit(
        job.shared,
        || job.plan.origin.host_port(),
        cell,
        &job.plan.ask(wait),
    )
    .await
    .inspect(|p| job.waited(p.queued))
    .map_err(crate::gate::Refusal::into_error)
}

/// While armed, dropping it (the attempt was cancelled) records the time waited as a lower
/// bound of the region's latency.
struct Pending<'a> {
    state: &'a crate::regions::state::RegionState,
    regions: &'a crate::regions::Regions,
    /// On the clock of region state.
    started: u64,
    armed: bool,
}

impl Pending<'_> {
    /// The time since `since` (on the clock of region state) was the request's wait, not the
    /// region's latency: set it aside, and return it.
    fn set_aside(&mut self, since: u64) -> Duration {
        let waited = self.regions.now().saturating_sub(since);
        self.started = self.started.saturating_add(waited);
        Duration::from_nanos(waited)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            let now = self.regions.now();
            let waited = Duration::from_nanos(now.saturating_sub(self.started));
            self.state.record_censored(waited, now);
        }
    }
}

/// Send the head and the whole body, ending the body once, after its last byte. An empty
/// write would end a chunked body early (pingora-core encodes it as the last chunk), so none
/// is made. Returns an error, and so never an answer whose connection could be pooled, when
/// the streamed body stopped before its end.
async fn send(session: &mut HttpSession, head: RequestHeader, body: Source) -> Result<()> {
    session.write_request_header(Box::new(head)).await?;
    match body {
        Source::Whole(b) => {
            if !b.is_empty() {
                session.write_request_body(b, true).await?;
            }
        }
        Source::Stream(mut rx) => loop {
            match rx.recv().await {
                Some(Piece::Data(b)) if b.is_empty() => {}
                Some(Piece::Data(b)) => session.write_request_body(b, false).await?,
                Some(Piece::End) => break,
                None => {
                    return Err(error::error(
                        Code::ClientClosed,
                        "the request body stopped before its end",
                    ))
                }
            }
        },
    }
    session.finish_request_body().await
}

/// Did the head go out on an h2 stream (so that its answer, or its error, can be read)?
fn head_sent_on_h2(session: &HttpSession) -> bool {
    matches!(session, HttpSession::H2(h2) if h2.request_header().is_some())
}

/// Longest wait for the answer (or the error) of an h2 stream whose body could not be sent.
const STREAM_END_WAIT: Duration = Duration::from_secs(1);

/// Did this error say the upstream never processed the request: its h2 stream refused
/// (`REFUSED_STREAM`), or past the last stream a graceful `GOAWAY` kept (RFC 9113 8.7)?
fn never_processed(e: &pingora_error::Error) -> bool {
    let Some(h2) = e.root_cause().downcast_ref::<h2::Error>() else {
        return false;
    };
    let refused = h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
    let past_goaway = h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
    h2.is_remote() && (refused || past_goaway)
}

/// The head as the session's version carries it. Over HTTP/1.1, that version. Over h2: the target with its scheme and
/// authority (from `Host`, then dropped: `:authority` says it), no HTTP/1.1 framing, and
/// `te: trailers` when the client accepts trailers (gRPC needs it).
fn for_version(
    job: &Outbound<'_>,
    session: &Session,
    mut head: RequestHeader,
) -> Result<RequestHeader> {
    if session.protocol() != crate::upstream::Protocol::H2 {
        // A request that came over h2 goes on as HTTP/1.1 (an HTTP/1.0 one stays 1.0).
        if head.version != http::Version::HTTP_10 {
            head.set_version(http::Version::HTTP_11);
        }
        if job.plan.unsized_body {
            head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        // An h2 client may send its cookies as several fields; HTTP/1.1 has one (RFC 9113
        // 8.2.3).
        let cookies: Vec<&[u8]> = head
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if cookies.len() > 1 {
            let joined = cookies.join(&b"; "[..]);
            head.insert_header(http::header::COOKIE, joined)?;
        }
        return Ok(head);
    }
    let authority = head
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| job.plan.origin.host_header());
    let scheme = if session.peer().is_tls() {
        "https"
    } else {
        "http"
    };
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|e| {
            error::error(
                Code::BadTarget,
                format!("no h2 target from {authority:?} and {path:?}: {e}"),
            )
        })?;
    head.set_uri(uri);
    // h2 carries none of HTTP/1.1's connection-specific headers (RFC 9113 8.2.2): the
    // hop-by-hop ones went with `headers::clean_request` (an upgrade, which adds its own
    // back, never goes over h2); the framing is h2's own.
    head.remove_header(&http::header::HOST);
    head.remove_header(&http::header::TRANSFER_ENCODING);
    if job.plan.trailers {
        head.insert_header(http::header::TE, "trailers")?;
    }
    Ok(head)
}

/// Most interim (1xx) responses read before the final one.
const MAX_INTERIM: usize = 16;

/// Read the final response head, skipping interim (1xx) responses (at most `MAX_INTERIM`).
/// A `101` ends the head for a request that asked to upgrade; any other is one the client did
/// not ask for: refused.
pub async fn read_final_head(session: &mut HttpSession) -> Result<()> {
    for _ in 0..=MAX_INTERIM {
        session.read_response_header().await?;
        let status = session.response_header().map_or(0, |h| h.status.as_u16());
        if !(100..=599).contains(&status) {
            return Err(error::error(
                Code::UpstreamProtocol,
                format!("the upstream answered status {status}, outside 100-599"),
            ));
        }
        let asked = match &*session {
            HttpSession::H1(h1) => h1.is_upgrade_req(),
            // h2 passes no interim response on, and its head is read once.
            _ if status < 200 => {
                return Err(error::error(
                    Code::UpstreamProtocol,
                    format!("the upstream answered status {status} over h2"),
                ))
            }
            _ => false,
        };
        if status == 101 && asked {
            return Ok(());
        }
        if status == 101 {
            return Err(error::error(
                Code::UpstreamProtocol,
                "the upstream switched protocols (101) although no upgrade was asked for",
            ));
        }
        if !(100..200).contains(&status) {
            return Ok(());
        }
    }
    Err(error::error(
        Code::UpstreamProtocol,
        format!("the upstream sent more than {MAX_INTERIM} interim (1xx) responses"),
    ))
}

/// The peer for one attempt: the region's next address, or the peer sluice of a `via` region.
pub async fn peer_for(job: &Outbound<'_>, r: &Region) -> Result<HttpPeer> {
    let server = &job.generation().config.server;
    let mut peer = match &r.via {
        Some(via) => {
            let addrs = job
                .shared
                .dns
                .resolve(
                    job.generation(),
                    &job.shared.metrics,
                    &via.host,
                    via.port,
                    server.dns_timeout.get(),
                )
                .await?;
            let Some(addr) = addrs.first() else {
                return Err(error::error(
                    Code::Dns,
                    format!("no address for {}", via.host_port()),
                ));
            };
            HttpPeer::new(*addr, false, String::new())
        }
        None => {
            let i = r.state.pick_addr();
            let Some(addr) = r.addrs.get(i) else {
                return Err(error::error(
                    Code::Internal,
                    format!("region {} has no address", r.name),
                ));
            };
            let tls = r.tls.unwrap_or(job.plan.origin.scheme.is_tls());
            let sni = r
                .sni
                .clone()
                .unwrap_or_else(|| job.plan.origin.host.clone());
            HttpPeer::new(*addr, tls, sni)
        }
    };
    super::peer_options(&mut peer, job.generation(), job.read_timeout());
    let tls = peer.is_tls();
    peer.options.alpn = match job.plan.upgrade {
        // An upgrade (a WebSocket) is an HTTP/1.1 exchange.
        true => pingora_core::upstreams::peer::ALPN::H1,
        false => crate::upstream::alpn(job.plan.limits.http2, tls, job.plan.grpc),
    };
    peer.options.max_h2_streams = crate::upstream::MAX_H2_STREAMS;
    Ok(peer)
}

/// The head sent to a region: the cleaned request, or for a `via` region the same request
/// addressed to the peer sluice, pinned to its own copy of the region.
fn request_head(job: &Outbound<'_>, r: &Region, mut head: RequestHeader) -> Result<RequestHeader> {
    if r.via.is_some() {
        let target = format!(
            "{}://{}",
            job.plan.origin.scheme.as_str(),
            job.plan.origin.host_port()
        );
        head.insert_header("Sluice-Target", target)?;
        head.insert_header(
            "Sluice-Regions",
            HeaderValue::from_str(&r.name).map_err(|_| {
                error::error(
                    Code::Internal,
                    format!("region name {:?} is not a header value", r.name),
                )
            })?,
        )?;
        head.insert_header("Sluice-Mode", "single")?;
    }
    Ok(head)
}
