//! Sending a request to a host's regions: `single` (best region, another after a retryable
//! failure), `hedge` (a duplicate to the next region when no answer came in time) and `race`
//! (every region at once). The first good answer is streamed to the client and the other
//! attempts are cancelled (their connections closed). Duplicates are sent only when they
//! cannot repeat a side effect, and extra attempts stay within the host's retry budget.

mod attempt;
pub mod budget;
mod control;

use crate::admission::Host;
use crate::config::{Generation, HedgeAfter, HostLimits, Mode};
use crate::error::{self, Code};
use crate::proxy::{pace, Ctx};
use crate::regions::HostRegions;
use crate::state::Shared;
use crate::target::Origin;
use attempt::{Admit, Answer, Failed, Outcome};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use control::Control;

/// Hedge delay when the region has too few latency samples for a percentile.
const HEDGE_FALLBACK: Duration = Duration::from_millis(500);
/// Shortest hedge delay taken from a percentile.
const HEDGE_MIN: Duration = Duration::from_millis(1);
/// First backoff before a retry in a region already tried; doubles, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// What every attempt of one request shares.
pub struct Job<'a> {
    pub shared: &'a Shared,
    pub ctx: &'a Ctx,
    pub host: &'a HostRegions,
    pub origin: &'a Origin,
    pub cell: Option<Host>,
    /// The cleaned request head sent to every region.
    pub head: RequestHeader,
    /// The request body, when it is kept whole (every attempt sends it).
    pub body: Option<Bytes>,
}

impl Job<'_> {
    pub fn generation(&self) -> &Generation {
        &self.ctx.generation
    }

    fn limits(&self) -> &HostLimits {
        match &self.cell {
            Some(c) => self.ctx.generation.limits(c.profile()),
            None => self.ctx.generation.limits(0),
        }
    }

    /// Longest wait for admission now: the host's queue wait within the deadline.
    pub fn max_wait(&self) -> Duration {
        let limit = self.limits().max_queue_wait.get();
        self.ctx.time_left().map_or(limit, |left| left.min(limit))
    }

    /// Read timeout of an attempt: the configured one within the deadline.
    pub fn read_timeout(&self) -> Duration {
        let t = self.ctx.generation.config.server.read_timeout.get();
        self.ctx
            .time_left()
            .map_or(t, |left| left.min(t).max(Duration::from_millis(1)))
    }
}

/// Send the request to the host's regions and stream the winning answer to the client.
/// Errors before the answer's head is sent are answered by `fail_to_proxy`.
pub async fn run(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    host: Arc<HostRegions>,
) -> Result<()> {
    let Some(origin) = ctx.origin.clone() else {
        return Err(error::error(Code::Internal, "no destination chosen"));
    };
    let limits = match &ctx.cell {
        Some(c) => ctx.generation.limits(c.profile()).clone(),
        None => ctx.generation.limits(0).clone(),
    };
    let control = Control::read(session.req_header(), &limits)
        .map_err(|m| error::error(Code::BadRequest, m))?;
    let now = shared.regions.now();
    let order = host.order(now, control.regions.as_deref());
    if order.is_empty() {
        let which = match &control.regions {
            Some(names) => format!("of {}", names.join(",")),
            None => "at all".to_string(),
        };
        return Err(error::error(
            Code::NoHealthyRegion,
            format!("{}: no healthy region {which}", origin.host_port()),
        ));
    }
    let req = session.req_header();
    // May this request be sent more than once?
    let duplicable = req.method.is_idempotent()
        || req.headers.contains_key("idempotency-key")
        || limits.duplicate_unsafe;
    let body = read_body(session, ctx, limits.max_buffered_body).await?;
    let mut head = session.req_header().clone();
    crate::proxy::upstream_head(&mut head, ctx, &shared.via)?;
    // The body is read before any attempt, so no attempt waits for a 100 Continue.
    head.remove_header(&http::header::EXPECT);
    let body = match body {
        Body::Whole(b) => b,
        Body::Partial(prefix) => {
            // Too large to keep for a second attempt: it streams to one region.
            pace::before_attempt(shared, ctx).await?;
            return stream_single(shared, session, ctx, &host, &order, head, prefix).await;
        }
    };
    let mode = if duplicable {
        control.mode
    } else {
        Mode::Single
    };
    let mut retry_on = control.retry_on;
    if !duplicable {
        // Nothing may be sent twice: only a connection that was never made is retried
        // (and a 429, which the upstream refused without processing).
        retry_on = retry_on.unsafe_subset();
    }
    pace::before_attempt(shared, ctx).await?;
    let first_permit = ctx.permit.take();
    let job = Job {
        shared,
        ctx,
        host: &host,
        origin: &origin,
        cell: ctx.cell.clone(),
        head,
        body: Some(body),
    };
    let label = ctx.host_label();
    let exec = Exec {
        job: &job,
        mode,
        order,
        retry_on,
        max_attempts: control.max_attempts,
        hedge_after: control.hedge_after,
        label,
        record: Recorder {
            shared,
            host: &host,
            label,
            outlier: limits.outlier,
        },
    };
    let result = exec.go(first_permit).await;
    drop(job);
    match result {
        Ok((answer, attempts)) => {
            ctx.attempts = attempts;
            stream(shared, session, ctx, &host, answer).await
        }
        Err((failed, attempts)) => {
            ctx.attempts = attempts;
            Err(failed)
        }
    }
}

struct Exec<'a, 'j> {
    job: &'a Job<'j>,
    mode: Mode,
    order: Vec<usize>,
    retry_on: crate::config::RetryOn,
    max_attempts: u32,
    hedge_after: HedgeAfter,
    label: &'a str,
    record: Recorder<'a>,
}

/// Why an attempt was sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    First,
    Retry,
    Hedge,
    Race,
}

impl Exec<'_, '_> {
    /// Run the attempts; the first good answer, or the last failure as an error.
    async fn go(
        &self,
        first_permit: Option<crate::admission::Permit>,
    ) -> std::result::Result<(Answer, u32), (Box<pingora_error::Error>, u32)> {
        let job = self.job;
        let shared = job.shared;
        let m = &shared.metrics;
        let now = shared.regions.now();
        if let Ok(mut b) = job.host.budget.lock() {
            b.request(now);
        }
        let mut running = FuturesUnordered::new();
        let mut extras = Extras::new(&job.host.budget);
        let mut sent = 0u32;
        // Regions in the order they will be used; a retry after all were tried goes round.
        let mut used = 0usize;
        let mut per_region = vec![0u32; job.host.regions.len()];
        let mut next_region = |per_region: &mut Vec<u32>| {
            let r = self.order[used % self.order.len()];
            used += 1;
            per_region[r] += 1;
            (r, per_region[r] - 1)
        };
        let (r, _) = next_region(&mut per_region);
        running.push(tagged(
            Why::First,
            job,
            r,
            Admit::Held,
            first_permit,
            Duration::ZERO,
        ));
        sent += 1;
        if self.mode == Mode::Race {
            m.races.with_label_values(&[self.label]).inc();
            // The fan-out is what race means (one attempt per region, up to max_attempts):
            // the retry budget bounds retries and hedges, not this.
            while (sent as usize) < self.order.len() && sent < self.max_attempts {
                let (r, _) = next_region(&mut per_region);
                running.push(tagged(
                    Why::Race,
                    job,
                    r,
                    Admit::IfFree,
                    None,
                    Duration::ZERO,
                ));
                sent += 1;
            }
        }
        let hedge_delay = self.hedge_delay(self.order[0]);
        let mut hedge_at = (self.mode == Mode::Hedge).then(|| Instant::now() + hedge_delay);
        let deadline = job.ctx.deadline;
        let mut last: Option<Box<pingora_error::Error>> = None;
        let mut fallback: Option<Answer> = None;
        loop {
            let hedge_sleep = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let deadline_sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                done = running.next(), if !running.is_empty() => {
                    let Some((why, outcome)) = done else { continue };
                    match self.judge(outcome) {
                        Judged::Win(answer) => {
                            if why == Why::Hedge {
                                m.hedges.with_label_values(&[self.label, "won"]).inc();
                            }
                            return Ok((answer, sent));
                        }
                        Judged::Retry { reason, answer, error } => {
                            if let Some(a) = answer {
                                fallback = Some(a);
                            }
                            if let Some(e) = error {
                                last = Some(e);
                            }
                            // A retry only when nothing else is in flight: a hedge or a
                            // raced attempt still running may yet answer.
                            let can = running.is_empty()
                                && sent < self.max_attempts
                                && deadline.is_none_or(|d| Instant::now() < d);
                            if can && extras.take(shared, &job.limits().retry_budget) {
                                let (r, nth) = next_region(&mut per_region);
                                let delay = backoff(nth);
                                m.retries.with_label_values(&[self.label, reason]).inc();
                                running.push(tagged(Why::Retry, job, r, Admit::Wait, None, delay));
                                sent += 1;
                            } else if can {
                                m.budget_exhausted.with_label_values(&[self.label]).inc();
                            }
                        }
                        Judged::Lost(e) => last = Some(e),
                        Judged::Refused(e) => {
                            sent -= 1;
                            last = Some(e);
                        }
                    }
                    if running.is_empty() {
                        break;
                    }
                }
                _ = hedge_sleep, if hedge_at.is_some() => {
                    hedge_at = None;
                    if sent < self.max_attempts {
                        if extras.take(shared, &job.limits().retry_budget) {
                            let (r, _) = next_region(&mut per_region);
                            m.hedges.with_label_values(&[self.label, "fired"]).inc();
                            running.push(tagged(Why::Hedge, job, r, Admit::IfFree, None, Duration::ZERO));
                            sent += 1;
                            if sent < self.max_attempts {
                                hedge_at = Some(Instant::now() + hedge_delay);
                            }
                        } else {
                            m.budget_exhausted.with_label_values(&[self.label]).inc();
                        }
                    }
                }
                _ = deadline_sleep, if deadline.is_some() => {
                    return Err((
                        error::error(Code::UpstreamTimeout, format!(
                            "{}: no answer from any region within Sluice-Timeout",
                            job.origin.host_port()
                        )),
                        sent,
                    ));
                }
            }
        }
        match fallback {
            Some(a) => Ok((a, sent)),
            None => Err((
                last.unwrap_or_else(|| error::error(Code::Internal, "no attempt was made")),
                sent,
            )),
        }
    }

    /// The hedge delay for a first attempt in `region`.
    fn hedge_delay(&self, region: usize) -> Duration {
        match self.hedge_after {
            HedgeAfter::Fixed(d) => d,
            HedgeAfter::Percentile(p) => {
                hedge_from_percentiles(&self.job.host.regions[region].state, p)
            }
        }
    }

    /// Record an attempt's end and decide what it means.
    fn judge(&self, outcome: Outcome) -> Judged {
        let job = self.job;
        match outcome {
            Ok(answer) => {
                let status =
                    self.record
                        .answered(job.ctx, answer.region, &answer.session, answer.started);
                if self.retry_on.status(status) {
                    let reason = if status == 429 { "429" } else { "status" };
                    Judged::Retry {
                        reason,
                        answer: Some(answer),
                        error: None,
                    }
                } else {
                    Judged::Win(answer)
                }
            }
            Err(Failed {
                region,
                error,
                unsent,
            }) => {
                let code = Code::of(&error);
                if unsent && matches!(code, Code::RateLimited | Code::SharedStateUnavailable) {
                    // Admission refused it: nothing was sent, so it is no attempt.
                    return Judged::Refused(error);
                }
                self.record.failed(region, code);
                let (retry, reason) = match code {
                    Code::ConnectRefused
                    | Code::ConnectTimeout
                    | Code::ConnectFailed
                    | Code::UpstreamTls
                    | Code::Dns => (self.retry_on.connect, "connect"),
                    Code::UpstreamTimeout => (self.retry_on.timeout, "timeout"),
                    _ if unsent => (self.retry_on.connect, "connect"),
                    _ => (self.retry_on.timeout, "reset"),
                };
                let name = &job.host.regions[region].name;
                let error = error.more_context(format!("region {name}"));
                if retry {
                    Judged::Retry {
                        reason,
                        answer: None,
                        error: Some(error),
                    }
                } else {
                    Judged::Lost(error)
                }
            }
        }
    }
}

/// Where an attempt's end is written down: its region's state (latency, failures, ejection),
/// the metrics, and what the host's answer teaches admission. One place for both dispatch
/// paths (buffered and streamed bodies).
struct Recorder<'a> {
    shared: &'a Shared,
    host: &'a HostRegions,
    label: &'a str,
    outlier: crate::config::Outlier,
}

impl Recorder<'_> {
    /// A response head from `region`, `started` when the attempt began; returns its status.
    fn answered(
        &self,
        ctx: &Ctx,
        region: usize,
        session: &pingora_core::protocols::http::client::HttpSession,
        started: Instant,
    ) -> u16 {
        let r = &self.host.regions[region];
        let head = session.response_header();
        let status = head.map_or(0, |h| h.status.as_u16());
        self.shared.metrics.record_region_attempt(
            self.label,
            &r.name,
            crate::metrics::status_class(status),
        );
        if let Some(h) = head {
            pace::learn(self.shared, ctx, h);
        }
        if (500..600).contains(&status) {
            self.failed_in(region);
        } else {
            r.state.record_latency(started.elapsed());
            r.state.on_success(self.shared.regions.now());
        }
        status
    }

    /// An attempt to `region` that ended in an error (`code`).
    fn failed(&self, region: usize, code: Code) {
        let r = &self.host.regions[region];
        self.shared
            .metrics
            .record_region_attempt(self.label, &r.name, code.as_str());
        self.failed_in(region);
    }

    /// Count a failure against the region; eject it after enough in a row.
    fn failed_in(&self, region: usize) {
        let r = &self.host.regions[region];
        let now = self.shared.regions.now();
        let checked = self.host.health.is_some();
        if let Some(t) = r.state.on_failure(now, &self.outlier, checked) {
            self.shared
                .metrics
                .ejections
                .with_label_values(&[self.label, &r.name])
                .inc();
            tracing::warn!(
                host = %self.host.host,
                region = %r.name,
                ejected_for = ?t,
                "region ejected after consecutive failures"
            );
        }
    }
}

enum Judged {
    Win(Answer),
    Retry {
        reason: &'static str,
        answer: Option<Answer>,
        error: Option<Box<pingora_error::Error>>,
    },
    Lost(Box<pingora_error::Error>),
    /// Admission gave no slot for this attempt (a duplicate, or a retry past its wait).
    Refused(Box<pingora_error::Error>),
}

/// Extra attempts taken from the host's budget by this request, given back when it ends.
struct Extras<'a> {
    budget: &'a std::sync::Mutex<budget::Budget>,
    held: u32,
}

impl<'a> Extras<'a> {
    fn new(budget: &'a std::sync::Mutex<budget::Budget>) -> Self {
        Extras { budget, held: 0 }
    }

    fn take(&mut self, shared: &Shared, cfg: &crate::config::RetryBudget) -> bool {
        let now = shared.regions.now();
        let ok = self.budget.lock().is_ok_and(|mut b| b.try_extra(now, cfg));
        if ok {
            self.held += 1;
        }
        ok
    }
}

impl Drop for Extras<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.budget.lock() {
            for _ in 0..self.held {
                b.done();
            }
        }
    }
}

/// An attempt that says why it was sent (one future type for every kind).
async fn tagged(
    why: Why,
    job: &Job<'_>,
    region: usize,
    admit: Admit,
    permit: Option<crate::admission::Permit>,
    delay: Duration,
) -> (Why, Outcome) {
    (why, attempt::run(job, region, admit, permit, delay).await)
}

/// The hedge delay for percentile `p` of a region's latency. When the latency has two modes
/// (most answers fast, a few far slower) and `p` falls at the gap between them, whether the
/// `p`th sample lands in the fast or the slow mode is sampling noise: a tail of exactly 5% puts
/// p95 on either side from one window to the next, and on the slow side no hedge ever fires.
/// So when the `p - 1`th percentile is less than half the `p`th, the gap is taken to start
/// above `p` and the delay is the near edge. In a continuous distribution one percentile
/// point never doubles the latency, and the rule does not apply.
fn hedge_from_percentiles(state: &crate::regions::state::RegionState, p: u8) -> Duration {
    let at = |q: u8| state.percentile(q);
    let delay = match (at(p), at(p.saturating_sub(1))) {
        (Some(hi), Some(lo)) if hi > lo * 2 => lo,
        (Some(hi), _) => hi,
        (None, _) => HEDGE_FALLBACK,
    };
    delay.max(HEDGE_MIN)
}

/// Backoff before the `nth` extra attempt in one region: 25 ms doubling, +-50% jitter.
fn backoff(nth: u32) -> Duration {
    if nth == 0 {
        return Duration::ZERO;
    }
    let base = BACKOFF_BASE.saturating_mul(1 << (nth - 1).min(6));
    let jitter = jitter_fraction();
    base.mul_f64(0.5 + jitter)
}

/// A fraction in [0, 1) from the clock's low bits: enough to spread retries apart.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    mixed as f64 / (1u64 << 53) as f64
}

enum Body {
    Whole(Bytes),
    /// The part read before the body went over the cap; the rest is still to read.
    Partial(Bytes),
}

/// Read the whole request body if it fits in `cap` (and within `max_body_bytes`).
async fn read_body(session: &mut Session, ctx: &mut Ctx, cap: u64) -> Result<Body> {
    if session.as_downstream_mut().is_body_empty() {
        return Ok(Body::Whole(Bytes::new()));
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = read_chunk(session, ctx).await? {
        buf.extend_from_slice(&chunk);
        if ctx.body_bytes > cap {
            return Ok(Body::Partial(buf.freeze()));
        }
    }
    Ok(Body::Whole(buf.freeze()))
}

/// The next chunk of the request body, held to `max_body_bytes`.
async fn read_chunk(session: &mut Session, ctx: &mut Ctx) -> Result<Option<Bytes>> {
    let max = ctx.generation.config.security.max_body_bytes;
    let chunk = session.read_request_body().await?;
    if let Some(c) = &chunk {
        ctx.body_bytes += c.len() as u64;
        if ctx.body_bytes > max {
            return Err(error::error(
                Code::BodyTooLarge,
                format!("request body over {max} bytes"),
            ));
        }
    }
    Ok(chunk)
}

/// A request whose body is too large to keep: one region gets it as it streams in. Only a
/// failure to connect (nothing sent yet) moves it to the next region.
async fn stream_single(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    host: &HostRegions,
    order: &[usize],
    head: RequestHeader,
    prefix: Bytes,
) -> Result<()> {
    let Some(origin) = ctx.origin.clone() else {
        return Err(error::error(Code::Internal, "no destination chosen"));
    };
    let label = ctx.host_label().to_string();
    let limits = ctx
        .generation
        .limits(ctx.cell.as_ref().map_or(0, |c| c.profile()));
    let attempts_max = limits.max_attempts as usize;
    let record = Recorder {
        shared,
        host,
        label: &label,
        outlier: limits.outlier,
    };
    let permit = ctx.permit.take();
    let mut last = None;
    let mut connected = None;
    let mut tried = 0;
    let job = Job {
        shared,
        ctx,
        host,
        origin: &origin,
        cell: ctx.cell.clone(),
        head,
        body: None,
    };
    for &region in order.iter().take(attempts_max) {
        let r = &host.regions[region];
        tried += 1;
        let started = Instant::now();
        let peer = match attempt::peer_for(&job, r).await {
            Ok(p) => p,
            Err(e) => {
                last = Some(e);
                break;
            }
        };
        match shared.upstream.get_http_session(&peer).await {
            Ok((s, _)) => {
                connected = Some((s, peer, region, started, job.read_timeout()));
                break;
            }
            Err(e) => {
                record.failed(region, Code::of(&e));
                last = Some(e.more_context(format!("region {}", r.name)));
            }
        }
    }
    let head = job.head;
    ctx.attempts = tried;
    let Some((mut up, peer, region, started, read_timeout)) = connected else {
        return Err(last.unwrap_or_else(|| error::error(Code::Internal, "no attempt was made")));
    };
    let r = &host.regions[region];
    let in_flight = r.state.enter();
    up.set_read_timeout(Some(read_timeout));
    up.set_write_timeout(Some(ctx.generation.config.server.write_timeout.get()));
    up.write_request_header(Box::new(head)).await?;
    up.write_request_body(prefix, false).await?;
    while let Some(chunk) = read_chunk(session, ctx).await? {
        up.write_request_body(chunk, false).await?;
    }
    up.finish_request_body().await?;
    if let Err(e) = attempt::read_final_head(&mut up).await {
        record.failed(region, Code::of(&e));
        return Err(e);
    }
    record.answered(ctx, region, &up, started);
    let answer = Answer {
        session: up,
        peer,
        region,
        started,
        permit,
        in_flight,
    };
    stream(shared, session, ctx, host, answer).await
}

/// Stream the winning answer to the client.
async fn stream(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    host: &HostRegions,
    answer: Answer,
) -> Result<()> {
    let Answer {
        session: mut upstream,
        peer,
        region,
        started: _,
        permit,
        in_flight,
    } = answer;
    let Some(up_head) = upstream.response_header() else {
        return Err(error::error(
            Code::Internal,
            "answer without a response head",
        ));
    };
    let mut resp: ResponseHeader = up_head.clone();
    if let Some(cell) = &ctx.cell {
        if pace::pause_signal(&resp) {
            if resp.status.as_u16() == 429 {
                shared
                    .metrics
                    .upstream_429
                    .with_label_values(&["passed"])
                    .inc();
            }
            pace::set_retry_after(&mut resp, pace::pause_left(shared, cell))?;
        }
    }
    let name = &host.regions[region].name;
    crate::proxy::client_head(shared, &mut resp, ctx, name)?;
    ctx.region = Some(name.clone());
    session.write_response_header(Box::new(resp), false).await?;
    loop {
        match upstream.read_response_body().await {
            Ok(Some(chunk)) => session.write_response_body(Some(chunk), false).await?,
            Ok(None) => break,
            Err(e) => return Err(e),
        }
    }
    session.write_response_body(None, true).await?;
    drop(in_flight);
    drop(permit);
    if upstream.response_done() {
        let idle = Some(Duration::from_secs(60));
        shared
            .upstream
            .release_http_session(upstream, &peer, idle)
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::state::RegionState;

    fn with_tail(slow_per_1000: usize) -> RegionState {
        let s = RegionState::new(1);
        // Spread evenly, so that the sketch's decay keeps the proportion.
        for i in 0..1000 {
            let ms = if (i * slow_per_1000) % 1000 < slow_per_1000 {
                1000
            } else {
                10
            };
            s.record_latency(Duration::from_millis(ms));
        }
        s
    }

    #[test]
    fn a_percentile_on_the_edge_of_a_gap_hedges_on_the_near_side() {
        // 5.2% slow: p95 is a slow sample by chance; p94 is fast.
        let d = hedge_from_percentiles(&with_tail(52), 95);
        assert!(d < Duration::from_millis(20), "{d:?}");
        // 4.8% slow: p95 is fast.
        let d = hedge_from_percentiles(&with_tail(48), 95);
        assert!(d < Duration::from_millis(20), "{d:?}");
        // 8% slow: p94 and p95 are both in the slow mode, which p95 then is.
        let d = hedge_from_percentiles(&with_tail(80), 95);
        assert!(d >= Duration::from_secs(1), "{d:?}");
        // Too few samples: the fallback.
        assert_eq!(
            hedge_from_percentiles(&RegionState::new(1), 95),
            HEDGE_FALLBACK
        );
    }

    #[test]
    fn a_continuous_distribution_uses_the_percentile_itself() {
        let s = RegionState::new(1);
        for i in 1..=1000u64 {
            s.record_latency(Duration::from_micros(1000 + i * 100));
        }
        let d = hedge_from_percentiles(&s, 95);
        let p95 = s.percentile(95).expect("p95");
        assert_eq!(d, p95);
    }
}
