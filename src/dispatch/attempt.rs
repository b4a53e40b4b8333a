//! One attempt of a request against one endpoint (a region, or one DNS answer of a host
//! without regions): admission, connect, send the head and the body (streamed or replayed),
//! read the response head. The caller races attempts and streams the winner.

use super::body::{Piece, Source};
use super::Outbound;
use crate::admission::{AtSend, Host, Permit};
use crate::error::{self, Code};
use crate::regions::state::InFlight;
use crate::regions::Region;
use http::HeaderValue;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::RequestHeader;
use std::time::{Duration, Instant};

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
    pub session: HttpSession,
    pub peer: HttpPeer,
    pub region: usize,
    pub started: Instant,
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
        started: Instant::now(),
        armed: true,
    };
    let peer = match peer_for(job, r).await {
        Ok(p) => p,
        Err(e) => return Err(fail(e, true)),
    };
    let (mut session, reused) = loop {
        let (session, pooled) = match job.shared.upstream.get_http_session(&peer).await {
            Ok(s) => s,
            Err(e) => return Err(fail(e.into_up(), true)),
        };
        let Some(p) = permit.as_ref() else {
            break (session, pooled);
        };
        let cell = &job.plan.cell;
        let look = Instant::now();
        let send = job
            .shared
            .admission
            .before_send(cell, p, job.generation())
            .await;
        // Time spent waiting for its place among the host's sends is not the region's
        // latency: it is the request's wait.
        pending.started += look.elapsed();
        job.waited(look.elapsed());
        if send == AtSend::Go {
            break (session, pooled);
        }
        // Paused since it was admitted: the unused connection goes back to the pool while
        // the request waits out the pause like a new one.
        job.shared
            .upstream
            .release_http_session(session, &peer, peer.options.idle_timeout)
            .await;
        // Its in-flight place is given back first (a host with room for one would wait on
        // itself).
        drop(permit.take());
        let wait = admit.wait(job);
        let look = Instant::now();
        permit = Some(
            admit_attempt(job, cell, wait)
                .await
                .map_err(|e| fail(e, true))?,
        );
        pending.started += look.elapsed();
    };
    // The deadline bounds the wait for the head (exec's deadline arm); each read only by
    // `server.read_timeout` when one is set.
    session.set_read_timeout(job.read_timeout());
    session.set_write_timeout(Some(job.generation().config.server.write_timeout.get()));
    let head = match request_head(job, r, head) {
        Ok(h) => h,
        Err(e) => return Err(fail(e, true)),
    };
    let sent_fail = |error: Box<pingora_error::Error>| Failed {
        reused,
        ..fail(error, false)
    };
    // From here the upstream may count the request's tokens: they are kept if it fails.
    if let Some(p) = &mut permit {
        p.mark_sent();
    }
    if let Err(e) = send(&mut session, head, body).await {
        return Err(sent_fail(e.into_up()));
    }
    let read = read_final_head(&mut session).await;
    pending.armed = false;
    if let Err(e) = read {
        return Err(sent_fail(e.into_up()));
    }
    // A 429 used no tokens (whether it is retried or passed on).
    if let (Some(p), Some(h)) = (&mut permit, session.response_header()) {
        if h.status.as_u16() == 429 {
            job.shared
                .admission
                .settle(p, crate::admission::TokenCost::default());
        }
    }
    Ok(Answer {
        session,
        peer,
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
    started: Instant,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state
                .record_censored(self.started.elapsed(), self.regions.now());
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
