//! The attempts of one request over its route, under one policy and one deadline: `single`
//! (the best endpoint; another after a retryable outcome), `hedge` (a duplicate to the next
//! endpoint when no answer came in time) and `race` (every endpoint at once). The first good
//! answer is streamed to the client and the others are cancelled. Whether to send again is
//! decided here, from each attempt's outcome: `retry_on`, `max_attempts` (a 429 resend is an
//! attempt), the host's retry budget, backoff with jitter, and the idempotency rule.

use super::attempt::{self, Admit, Answer, Failed, Outcome};
use super::body::{Source, Upload};
use super::prepare::Plan;
use super::record::Recorder;
use super::timing::{backoff, hedge_from_percentiles};
use super::{pace, respond, Ctx, Outbound};
use crate::config::{HedgeAfter, Mode, Quota, RetryOn};
use crate::error::{self, Code};
use crate::regions::budget::Budget;
use crate::regions::HostRegions;
use crate::state::Shared;
use futures_util::stream::{FuturesUnordered, StreamExt};
use pingora_error::{Error, Result};
use pingora_proxy::Session;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Send the request over its route and stream the winning answer to the client.
pub async fn run(shared: &Shared, session: &mut Session, ctx: &mut Ctx, plan: Plan) -> Result<()> {
    let Plan {
        origin,
        limits,
        control,
        route,
    } = plan;
    let host = route.host;
    let now = shared.regions.now();
    let only = if host.implicit {
        None
    } else {
        control.regions.as_deref()
    };
    let mut order = host.order(now, only);
    if order.is_empty() && host.implicit {
        // Every DNS answer is ejected: try them in DNS order rather than refuse, as a client
        // with no proxy would.
        order = (0..host.regions.len()).collect();
    }
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
    let expect_continue = req
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // An upgrade (WebSocket) is one connection: never duplicated.
    let upgrade = super::headers::upgrade_of(req).is_some();
    let mode = if duplicable && !upgrade {
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
    if mode != Mode::Single {
        // Duplicates draw on the route's budget and rank by its latency: remember it.
        shared.regions.keep(&host);
    }
    pace::before_attempt(shared, ctx).await?;
    let security = &ctx.generation.config.security;
    let (mut upload, first_body) = Upload::start(
        session,
        limits.max_buffered_body,
        security.max_body_bytes,
        super::body::BodyPace {
            min_rate: security.min_body_rate,
            grace: security.body_grace.get(),
        },
    );
    if expect_continue && !upload.done {
        session.write_continue_response().await?;
    }
    let first_permit = ctx.permit.take();
    let quota = if host.implicit {
        Quota::Host
    } else {
        limits.quota
    };
    let waited = std::sync::atomic::AtomicU64::new(0);
    let result = {
        let job = Outbound {
            shared,
            ctx,
            host: &host,
            origin: &origin,
            cell: ctx.cell.clone(),
            limits: &limits,
            waited: &waited,
        };
        let label = ctx.host_label();
        let exec = Exec {
            job: &job,
            mode,
            retry_on,
            max_attempts: control.max_attempts,
            hedge_after: control.hedge_after,
            label,
            record: Recorder {
                shared,
                host: &host,
                label,
                outlier: limits.outlier,
                quota,
            },
        };
        exec.go(session, &mut upload, order, first_body, first_permit)
            .await
            .map(|(answer, attempts)| (answer, attempts, job.body_idle_timeout()))
    };
    ctx.body_bytes = upload.read;
    // Concurrent attempts (a hedge, a race) wait side by side: never more than the time
    // the request has taken.
    ctx.queued =
        (ctx.queued + Duration::from_nanos(waited.into_inner())).min(ctx.started.elapsed());
    match result {
        Ok((answer, attempts, body_idle)) => {
            ctx.attempts = attempts;
            respond::stream(shared, session, ctx, &host, answer, body_idle).await
        }
        Err((failed, attempts)) => {
            ctx.attempts = attempts;
            Err(failed)
        }
    }
}

struct Exec<'a, 'j> {
    job: &'a Outbound<'j>,
    mode: Mode,
    retry_on: RetryOn,
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

/// An extra attempt waiting for the whole body (duplicates and retries replay it).
struct Deferred {
    why: Why,
    region: usize,
    admit: Admit,
    delay: Duration,
}

/// Which endpoint goes next: the route's order, each endpoint once (an endpoint that just
/// timed out, failed or answered 5xx is not asked again by the same request), skipping
/// endpoints taken out of rotation since the request began (unless every endpoint of the
/// order is out: then it is a last resort, tried in order). Only a resend after the host's
/// quota paused it goes to the same endpoint again ([`Picker::again`]).
struct Picker {
    order: Vec<usize>,
    used: usize,
    per_region: Vec<u32>,
}

impl Picker {
    fn new(order: Vec<usize>, regions: usize) -> Picker {
        Picker {
            order,
            used: 0,
            per_region: vec![0; regions],
        }
    }

    /// The next endpoint not tried yet and how many attempts it had before (none); `None`
    /// when no endpoint is left.
    fn next(&mut self, host: &HostRegions, now: u64) -> Option<(usize, u32)> {
        let any_up = self
            .order
            .iter()
            .any(|&r| host.regions[r].state.available(now));
        let first = self.used == 0;
        let r = self.order.iter().copied().find(|&r| {
            self.per_region[r] == 0 && (first || !any_up || host.regions[r].state.available(now))
        })?;
        self.used += 1;
        Some((r, self.again(r)))
    }

    /// Another attempt to `r`; how many it had before.
    fn again(&mut self, r: usize) -> u32 {
        self.per_region[r] += 1;
        self.per_region[r] - 1
    }

    /// An attempt taken for `r` was not sent after all (admission refused it, or the budget
    /// did): `r` is as it was before.
    fn undo(&mut self, r: usize) {
        self.per_region[r] = self.per_region[r].saturating_sub(1);
    }
}

type Failure = (Box<Error>, u32);

impl Exec<'_, '_> {
    /// Run the attempts while the body streams in; the first good answer, or the last
    /// failure as an error (with the number of attempts either way).
    async fn go(
        &self,
        session: &mut Session,
        upload: &mut Upload,
        order: Vec<usize>,
        first_body: Source,
        first_permit: Option<crate::admission::Permit>,
    ) -> std::result::Result<(Answer, u32), Failure> {
        let job = self.job;
        let shared = job.shared;
        let m = &shared.metrics;
        let host = job.host;
        if let Ok(mut b) = host.budget.lock() {
            b.request(shared.regions.now());
        }
        let mut running = FuturesUnordered::new();
        let mut extras = Extras::new(&host.budget);
        let mut deferred: Vec<Deferred> = Vec::new();
        let mut picker = Picker::new(order, host.regions.len());
        let mut sent = 1u32;
        let first = picker.next(host, 0).map_or(0, |(r, _)| r);
        let head = job
            .upstream_head(session.req_header())
            .map_err(|e| (e, 0))?;
        running.push(tagged(
            Why::First,
            job,
            first,
            Admit::Held,
            first_permit,
            Duration::ZERO,
            (head, first_body),
        ));
        if self.mode == Mode::Race {
            m.races.with_label_values(&[self.label]).inc();
            // The fan-out is what race means (one attempt per endpoint, up to max_attempts):
            // the retry budget bounds retries and hedges, not this.
            let planned = |deferred: &Vec<Deferred>| sent + deferred.len() as u32;
            while (planned(&deferred) as usize) < picker.order.len()
                && planned(&deferred) < self.max_attempts
            {
                let Some((r, _)) = picker.next(host, shared.regions.now()) else {
                    break;
                };
                deferred.push(Deferred {
                    why: Why::Race,
                    region: r,
                    admit: Admit::IfFree,
                    delay: Duration::ZERO,
                });
            }
        }
        let hedge_delay = self.hedge_delay(first);
        let mut hedge_at = (self.mode == Mode::Hedge)
            .then(|| Instant::now().checked_add(hedge_delay))
            .flatten();
        let mut deadline = job.ctx.deadline;
        // The host's own request_timeout (the client sent no Sluice-Timeout) bounds the wait,
        // the connects and the head, not the client's upload: its clock stops while the body
        // streams in. A client's Sluice-Timeout bounds everything it asked it to.
        let stretch = !job.ctx.deadline_from_client;
        let streaming_since = Instant::now();
        let mut last: Option<Box<Error>> = None;
        let mut fallback: Option<Answer> = None;
        loop {
            if upload.done {
                // A body that outgrew the replay buffer went to its one attempt only.
                let body = upload.replay();
                for d in deferred.drain(..) {
                    let Some(body) = body.clone() else { break };
                    let head = job
                        .upstream_head(session.req_header())
                        .map_err(|e| (e, sent))?;
                    let send = (head, Source::Whole(body));
                    running.push(tagged(d.why, job, d.region, d.admit, None, d.delay, send));
                    sent += 1;
                }
            }
            if running.is_empty() && (deferred.is_empty() || !upload.replayable()) {
                break;
            }
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
                        Judged::Retry { reason, answer, error, same } => {
                            if let Some(a) = answer {
                                fallback = Some(a);
                            }
                            if let Some(e) = error {
                                last = Some(e);
                            }
                            // A retry only when nothing else is in flight: a hedge or a
                            // raced attempt still running may yet answer.
                            let can = running.is_empty()
                                && deferred.is_empty()
                                && sent < self.max_attempts
                                && upload.replayable()
                                && deadline.is_none_or(|d| Instant::now() < d)
                                && !self.paused_past_wait();
                            // The endpoint is taken only for a retry that goes: one not
                            // taken now stays free for a later one.
                            let pick = match same {
                                _ if !can => None,
                                Some(r) => Some((r, picker.again(r))),
                                None => picker.next(host, shared.regions.now()),
                            };
                            if let Some((r, nth)) = pick {
                                if extras.take(shared, &job.limits.retry_budget) {
                                    shared.regions.keep(host);
                                    m.retries.with_label_values(&[self.label, reason]).inc();
                                    deferred.push(Deferred {
                                        why: Why::Retry,
                                        region: r,
                                        admit: Admit::Wait,
                                        delay: backoff(nth),
                                    });
                                } else {
                                    picker.undo(r);
                                    m.budget_exhausted.with_label_values(&[self.label]).inc();
                                }
                            }
                        }
                        Judged::Lost(e) => last = Some(e),
                        Judged::Refused(region, e) => {
                            // Nothing was sent: no attempt, and its endpoint is not used up.
                            sent = sent.saturating_sub(1);
                            picker.undo(region);
                            last = Some(e);
                        }
                    }
                }
                (permit, chunk) = upload.next(session), if !upload.done => {
                    let taken = chunk.and_then(|c| upload.take(permit, c));
                    if let Err(e) = taken {
                        return Err((e, sent));
                    }
                    if upload.done && stretch {
                        deadline = deadline.and_then(|d| d.checked_add(streaming_since.elapsed()));
                    }
                }
                _ = hedge_sleep, if hedge_at.is_some() => {
                    hedge_at = None;
                    let planned = sent + deferred.len() as u32;
                    let next = (planned < self.max_attempts && upload.replayable())
                        .then(|| picker.next(host, shared.regions.now()))
                        .flatten();
                    if let Some((r, _)) = next {
                        if extras.take(shared, &job.limits.retry_budget) {
                            m.hedges.with_label_values(&[self.label, "fired"]).inc();
                            deferred.push(Deferred {
                                why: Why::Hedge,
                                region: r,
                                admit: Admit::IfFree,
                                delay: Duration::ZERO,
                            });
                            if planned + 1 < self.max_attempts {
                                hedge_at = Instant::now().checked_add(hedge_delay);
                            }
                        } else {
                            picker.undo(r);
                            m.budget_exhausted.with_label_values(&[self.label]).inc();
                        }
                    }
                }
                _ = deadline_sleep, if deadline.is_some() && (upload.done || !stretch) => {
                    return Err((
                        error::error(Code::UpstreamTimeout, format!(
                            "{}: no response head within the request's deadline \
                             (Sluice-Timeout, else the host's request_timeout)",
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

    /// Is the host paused for longer than this request may still wait? Then no retry is
    /// sent: the answer in hand (a 429 with the pause left) goes back at once.
    fn paused_past_wait(&self) -> bool {
        self.job
            .cell
            .as_ref()
            .is_some_and(|c| pace::pause_left(self.job.shared, c) > self.job.max_wait())
    }

    /// The hedge delay for a first attempt to `region`.
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
                let (status, paused) =
                    self.record
                        .answered(job.ctx, answer.region, &answer.session, answer.started);
                if self.retry_on.status(status) {
                    let reason = if status == 429 { "429" } else { "status" };
                    // The host's quota: the same endpoint after the pause (another region
                    // would answer the same). A region's own quota: on to another one now.
                    let same =
                        (paused && self.record.quota == Quota::Host).then_some(answer.region);
                    Judged::Retry {
                        reason,
                        answer: Some(answer),
                        error: None,
                        same,
                    }
                } else {
                    Judged::Win(answer)
                }
            }
            Err(Failed {
                region,
                error,
                unsent,
                reused,
            }) => {
                let code = Code::of(&error);
                if unsent && matches!(code, Code::RateLimited | Code::SharedStateUnavailable) {
                    // Admission refused it: nothing was sent, so it is no attempt.
                    return Judged::Refused(region, error);
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
                let r = &job.host.regions[region];
                let error = if job.host.implicit {
                    error.more_context(format!("address {}", r.addrs[0]))
                } else {
                    error.more_context(format!("region {}", r.name))
                };
                // A kept-alive connection the upstream closed just as it was reused (the
                // request may never have reached it): the same endpoint again, on a fresh
                // connection. Any other failure moves on to an endpoint not tried yet.
                let same = (reused && code == Code::UpstreamClosed).then_some(region);
                if retry {
                    Judged::Retry {
                        reason,
                        answer: None,
                        error: Some(error),
                        same,
                    }
                } else {
                    Judged::Lost(error)
                }
            }
        }
    }
}

enum Judged {
    Win(Answer),
    Retry {
        reason: &'static str,
        answer: Option<Answer>,
        error: Option<Box<Error>>,
        /// Send again to this endpoint (after a pause of the host's quota).
        same: Option<usize>,
    },
    Lost(Box<Error>),
    /// Admission gave no slot for this attempt to this endpoint (a duplicate, or a retry
    /// past its wait).
    Refused(usize, Box<Error>),
}

/// Extra attempts taken from the host's budget by this request, given back when it ends.
struct Extras<'a> {
    budget: &'a Mutex<Budget>,
    held: u32,
}

impl<'a> Extras<'a> {
    fn new(budget: &'a Mutex<Budget>) -> Self {
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
    job: &Outbound<'_>,
    region: usize,
    admit: Admit,
    permit: Option<crate::admission::Permit>,
    delay: Duration,
    (head, body): (pingora_http::RequestHeader, Source),
) -> (Why, Outcome) {
    (
        why,
        attempt::run(job, region, admit, permit, delay, head, body).await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_picker_asks_each_endpoint_once_and_skips_those_out_of_rotation() {
        let config = crate::config::Config::default();
        let regions =
            crate::regions::Regions::new(&crate::generation::Generation::build(1, config));
        let addrs: Vec<std::net::SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        let host = regions.implicit("a.test:80", &addrs).host;
        let mut p = Picker::new(vec![0, 1, 2], 3);
        assert_eq!(p.next(&host, 0), Some((0, 0)));
        host.regions[1].state.hold(0, Duration::from_secs(5));
        assert_eq!(p.next(&host, 1), Some((2, 0)), "1 is held out");
        assert_eq!(
            p.next(&host, 1),
            None,
            "0 and 2 were tried, 1 is out: none is left"
        );
        assert_eq!(p.again(0), 1, "a resend after a pause goes to the same one");

        let mut p = Picker::new(vec![0, 1, 2], 3);
        for r in [0, 2] {
            host.regions[r].state.hold(0, Duration::from_secs(5));
        }
        let picks: Vec<_> = std::iter::from_fn(|| p.next(&host, 1)).collect();
        assert_eq!(
            picks,
            vec![(0, 0), (1, 0), (2, 0)],
            "all out: the order is a last resort, each once"
        );

        let mut single = Picker::new(vec![0], 1);
        assert_eq!(single.next(&host, 1), Some((0, 0)));
        assert_eq!(single.next(&host, 1), None, "one endpoint: no retry to it");

        // An attempt refused before it was sent leaves its endpoint free.
        let fresh = regions.implicit("b.test:80", &addrs).host;
        let mut p = Picker::new(vec![0, 1, 2], 3);
        assert_eq!(p.next(&fresh, 1), Some((0, 0)));
        assert_eq!(p.next(&fresh, 1), Some((1, 0)));
        p.undo(1);
        assert_eq!(p.next(&fresh, 1), Some((1, 0)), "1 was never sent to");
        assert_eq!(p.next(&fresh, 1), Some((2, 0)));
        assert_eq!(p.next(&fresh, 1), None);
    }
}
