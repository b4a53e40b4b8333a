//! The attempts of one request over its route: the driver of its dispatch policy
//! (`policy.rs`, which decides every "send again? where? hedge now? give up?"). It starts the
//! attempts the policy asks for while the body streams in, records how each ends (metrics,
//! learning, ejection) and tells the policy; the first good answer is streamed to the client
//! and the others are cancelled with it.

use super::attempt::{self, Answer, Failed, Outcome};
use super::body::{Source, Upload};
use super::pace::Admitted;
use super::policy::{
    self, Action, Count, Ended, Env, FailKind, Launch, Policy, Rules, Unanswered, Why,
};
use super::prepare::Plan;
use super::record::Recorder;
use super::timing::hedge_from_percentiles;
use super::{pace, respond, Ctx, Outbound};
use crate::config::{HedgeAfter, Mode, Quota};
use crate::error::{self, Code};
use crate::regions::budget::Budget;
use crate::state::Shared;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use pingora_error::{Error, Result};
use pingora_proxy::Session;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Send the admitted request over its route and stream the winning answer to the client.
pub async fn run(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    plan: &Plan,
    admitted: Admitted,
    early: Option<(Upload, Source)>,
) -> Result<()> {
    let Plan {
        limits,
        control,
        route,
        ..
    } = plan;
    let host = &route.host;
    let req = session.req_header();
    let duplicable = policy::duplicable(req, limits.duplicate_unsafe);
    let expect_continue = req
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = super::headers::upgrade_of(req).is_some();
    let rules = Rules::new(
        control.mode,
        control.retry_on,
        control.max_attempts,
        duplicable,
        upgrade,
    );
    if rules.mode != Mode::Single {
        // Duplicates draw on the route's budget and rank by its latency: remember it.
        shared.regions.keep(host);
    }
    // The client's place is held until the answer is streamed.
    let Admitted {
        permit: first_permit,
        client: _client_permit,
    } = admitted;
    let security = &ctx.generation.config.security;
    // The body, unless it was read before admission.
    let (mut upload, first_body) = match early {
        Some(read) => read,
        None => Upload::start(
            session,
            limits.max_buffered_body,
            security.max_body_bytes,
            super::body::BodyPace {
                min_rate: security.min_body_rate,
                grace: security.body_grace.get(),
            },
        ),
    };
    if expect_continue && !upload.done {
        session.write_continue_response().await?;
    }
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
            plan,
            waited: &waited,
        };
        let label = ctx.host_label();
        let exec = Exec {
            job: &job,
            rules,
            hedge_after: control.hedge_after,
            label,
            record: Recorder {
                shared,
                host,
                cell: &plan.cell,
                label,
                outlier: limits.outlier,
                quota,
                model: plan.model.as_ref(),
            },
        };
        exec.go(
            session,
            &mut upload,
            plan.order.clone(),
            first_body,
            Some(first_permit),
        )
        .await
        .map(|(answer, attempts)| (answer, attempts, job.body_idle_timeout()))
    };
    ctx.body_bytes = upload.read;
    // Concurrent attempts (a hedge, a race) wait side by side: never more than the time
    // the request has taken.
    // (No clock read for a request that never waited.)
    let queued = ctx.queued + Duration::from_nanos(waited.into_inner());
    if !queued.is_zero() {
        ctx.queued = queued.min(ctx.started.elapsed());
    }
    match result {
        Ok((answer, attempts, body_idle)) => {
            ctx.attempts = attempts;
            respond::stream(shared, session, ctx, plan, answer, body_idle).await
        }
        Err((failed, attempts)) => {
            ctx.attempts = attempts;
            Err(failed)
        }
    }
}

struct Exec<'a, 'j> {
    job: &'a Outbound<'j>,
    rules: Rules,
    hedge_after: HedgeAfter,
    label: &'a str,
    record: Recorder<'a>,
}

/// The error that ended a request without an answer, and the attempts sent.
type GaveUp = (Box<Error>, u32);

impl Exec<'_, '_> {
    /// Drive the request's policy: start the attempts it asks for while the body streams in,
    /// tell it how each ends, and count what it says. The first good answer, or the failure
    /// it gives, comes back with the number of attempts either way.
    async fn go(
        &self,
        session: &mut Session,
        upload: &mut Upload,
        order: Vec<usize>,
        first_body: Source,
        first_permit: Option<crate::admission::Permit>,
    ) -> std::result::Result<(Answer, u32), GaveUp> {
        let job = self.job;
        let shared = job.shared;
        let host = &job.plan.route.host;
        if let Ok(mut b) = host.budget.lock() {
            b.request(shared.regions.now());
        }
        let mut env = Live {
            exec: self,
            extras: Extras::new(&host.budget),
        };
        // The host's own request_timeout (the client sent no Sluice-Timeout) bounds the wait,
        // the connects and the head, not the client's upload: its clock stops while the body
        // streams in. A client's Sluice-Timeout bounds everything it asked it to.
        let mut policy: Policy<Answer, Box<Error>> = Policy::new(
            self.rules,
            order,
            host.regions.len(),
            job.plan.deadline.map(Instant::from_std),
            !job.plan.deadline_from_client,
            upload.done,
        );
        // Attempts in flight. The first one sent while none runs is polled in place (a
        // request that is never duplicated has only such attempts: no set, no allocation);
        // a duplicate beside it (a hedge, a race) joins the set, made when it is needed.
        let mut one = std::pin::pin!(Fuse::terminated());
        let mut more = None;
        let mut first = Some((first_body, first_permit));
        // One buffer for every event's actions, drained and reused.
        let mut actions = Vec::new();
        policy.start(&mut env, &mut actions);
        // One timer for the deadline, moved when the deadline moves (its clock stops while
        // the body streams in), not one made for every event.
        let mut armed = policy.deadline();
        let mut deadline_timer =
            std::pin::pin!(tokio::time::sleep_until(armed.unwrap_or_else(Instant::now)));
        loop {
            for action in actions.drain(..) {
                match action {
                    Action::Send(send) => {
                        // Not sent after all: not an attempt.
                        let head = job
                            .upstream_head(session.req_header())
                            .map_err(|e| (e, policy.attempts().saturating_sub(1)))?;
                        let (body, permit) = match (send.why, first.take()) {
                            (Why::First, Some(first)) => first,
                            (_, taken) => {
                                first = taken;
                                // The policy sends a replay only once the body is whole
                                // and fits the replay buffer.
                                let Some(whole) = upload.replay() else {
                                    let e =
                                        error::error(Code::Internal, "a replay without its body");
                                    return Err((e, policy.attempts()));
                                };
                                (Source::Whole(whole), None)
                            }
                        };
                        let attempt = tagged(send, job, permit, (head, body));
                        if one.is_terminated() {
                            one.set(attempt.fuse());
                        } else {
                            more.get_or_insert_with(FuturesUnordered::new).push(attempt);
                        }
                    }
                    Action::Count(count) => self.count(count),
                    Action::Deliver { answer, attempts } => return Ok((answer, attempts)),
                    Action::Fail { failure, attempts } => {
                        let error = match failure {
                            Unanswered::Last(e) => e,
                            Unanswered::Deadline => error::error(
                                Code::UpstreamTimeout,
                                format!(
                                    "{}: no response head within the request's deadline \
                                     (Sluice-Timeout, else the host's request_timeout)",
                                    job.plan.origin.host_port()
                                ),
                            ),
                            Unanswered::NoAttempt => {
                                error::error(Code::Internal, "no attempt was made")
                            }
                        };
                        return Err((error, attempts));
                    }
                }
            }
            let hedge_at = policy.hedge_at();
            let deadline = policy.deadline();
            if deadline != armed {
                if let Some(at) = deadline {
                    deadline_timer.as_mut().reset(at);
                }
                armed = deadline;
            }
            let hedge_sleep = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                (send, outcome) = &mut one, if !one.is_terminated() => {
                    let ended = self.judge(outcome);
                    policy.ended(send.why, send.region, ended, &mut env, &mut actions);
                }
                Some((send, outcome)) = next_of(&mut more) => {
                    let ended = self.judge(outcome);
                    policy.ended(send.why, send.region, ended, &mut env, &mut actions);
                }
                (permit, chunk) = upload.next(session), if !upload.done => {
                    let taken = chunk.and_then(|c| upload.take(permit, c));
                    if let Err(e) = taken {
                        return Err((e, policy.attempts()));
                    }
                    policy.body(upload.done, upload.replayable(), &mut actions);
                }
                _ = hedge_sleep, if hedge_at.is_some() => {
                    policy.hedge_timer(&mut env, &mut actions);
                }
                _ = &mut deadline_timer, if armed.is_some() => {
                    policy.deadline_passed(&mut actions);
                }
            }
        }
    }

    /// Count what the policy did.
    fn count(&self, count: Count) {
        let m = &self.job.shared.metrics;
        let label = self.label;
        match count {
            Count::Retry(reason) => {
                self.job.shared.regions.keep(&self.job.plan.route.host);
                m.retries.with_label_values(&[label, reason]).inc();
            }
            Count::HedgeFired => m.hedges.with_label_values(&[label, "fired"]).inc(),
            Count::HedgeWon => m.hedges.with_label_values(&[label, "won"]).inc(),
            Count::Raced => m.races.with_label_values(&[label]).inc(),
            Count::BudgetExhausted => m.budget_exhausted.with_label_values(&[label]).inc(),
        }
    }

    /// Record an attempt's end (metrics, learning, ejection) and say what it was.
    fn judge(&self, outcome: Outcome) -> Ended<Answer, Box<Error>> {
        let job = self.job;
        match outcome {
            Ok(answer) => {
                let (status, paused) =
                    self.record
                        .answered(job.ctx, answer.region, &answer.session, answer.started);
                Ended::Answered {
                    status,
                    // A pause of the host's quota (a region's own quota moves on instead).
                    host_paused: paused && self.record.quota == Quota::Host,
                    answer,
                }
            }
            Err(Failed {
                region,
                error,
                refused: true,
                ..
            }) => {
                // Not the endpoint's failure: its connection's life (a GOAWAY, a refusal).
                let r = &job.plan.route.host.regions[region];
                job.shared
                    .metrics
                    .record_region_attempt(self.label, &r.name, "refused_stream");
                Ended::Failed {
                    kind: FailKind::Refused,
                    same_again: true,
                    error,
                }
            }
            Err(Failed {
                region,
                error,
                unsent,
                reused,
                refused: false,
            }) => {
                let code = Code::of(&error);
                match Ended::failed(code, unsent, reused, error) {
                    Ended::Failed {
                        kind,
                        same_again,
                        error,
                    } => {
                        self.record.failed(region, code);
                        let r = &job.plan.route.host.regions[region];
                        let error = if job.plan.route.host.implicit {
                            error.more_context(format!("address {}", r.addrs[0]))
                        } else {
                            error.more_context(format!("region {}", r.name))
                        };
                        Ended::Failed {
                            kind,
                            same_again,
                            error,
                        }
                    }
                    refused => refused,
                }
            }
        }
    }
}

/// The world the policy runs in, for one request.
struct Live<'a, 'e, 'j> {
    exec: &'e Exec<'a, 'j>,
    extras: Extras<'a>,
}

impl Env for Live<'_, '_, '_> {
    fn available(&self, r: usize) -> bool {
        let job = self.exec.job;
        job.plan.route.host.regions[r]
            .state
            .available(job.shared.regions.now())
    }

    fn take_extra(&mut self) -> bool {
        let job = self.exec.job;
        self.extras.take(job.shared, &job.plan.limits.retry_budget)
    }

    fn paused_past_wait(&self) -> bool {
        let job = self.exec.job;
        pace::pause_left(job.shared, &job.plan.cell) > job.plan.max_wait()
    }

    fn hedge_delay(&self, r: usize) -> Duration {
        match self.exec.hedge_after {
            HedgeAfter::Fixed(d) => d,
            HedgeAfter::Percentile(p) => {
                hedge_from_percentiles(&self.exec.job.plan.route.host.regions[r].state, p)
            }
        }
    }
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

/// The next attempt of the set to end; none while there is no set (or it is empty).
async fn next_of<S: futures_util::Stream + Unpin>(set: &mut Option<S>) -> Option<S::Item> {
    match set {
        Some(set) => set.next().await,
        None => None,
    }
}

/// An attempt that says what it was sent as (one future type for every kind).
async fn tagged(
    send: Launch,
    job: &Outbound<'_>,
    permit: Option<crate::admission::Permit>,
    (head, body): (pingora_http::RequestHeader, Source),
) -> (Launch, Outcome) {
    let outcome = attempt::run(job, send.region, send.admit, permit, send.delay, head, body).await;
    (send, outcome)
}
