//! The one pipeline every HTTP request takes, whatever its way in (forward, explicit target,
//! route, inside a tunnel) and whether or not its host lists regions. Its stages hand each
//! other values: `prepare` -> [`Plan`] -> `pace::admit` -> `Admitted` -> `exec::run` -> the
//! answer streamed, or a typed failure that `proxy::fail_to_proxy` answers.
//!
//! A host's route is its configured regions or one implicit region made of its DNS answers
//! (each address an endpoint), so `single` / `hedge` / `race`, `retry_on`, `max_attempts`, the
//! retry budget, ejection and the deadline mean the same for every host. `proxy/` owns the
//! downstream session and calls [`serve`] once per request; nothing here imports `proxy/`.
//!
//! Where to look, per question:
//! - **Is this request paced, and how long may it wait?** `pace::admit` (the client's pace,
//!   then the host's, through `gate::admit`); the wait itself is
//!   `admission::Admission::acquire` (`admission/wait.rs`), the limits
//!   `Generation::profile_for` and `Plan::max_wait`. A retry waits for its own slot, a
//!   duplicate only takes a free one (`attempt::Admit`); the last look before sending (the
//!   send guard, a pause learned since) is `Admission::before_send`.
//! - **Routed where?** `prepare::prepare`: configured regions (`regions::Regions::get`) or
//!   the DNS answers the egress policy allows (`gate::addresses`, then
//!   `regions::Regions::implicit`); their order in `prepare::endpoints`; which endpoint each
//!   attempt takes in `policy::Picker::next`.
//! - **Hedged or raced?** `policy::Policy::start` (the race's fan-out, the hedge timer) and
//!   `Policy::hedge_timer`; whether a request may be duplicated at all, `policy::duplicable`
//!   and `policy::Rules::new`. A hedge stops with the request's end (`Policy::finish`), at
//!   `max_attempts`, with no endpoint left, a body too large to replay, or an empty budget.
//! - **Retried?** `policy::Policy::ended`, then `Policy::retry` (every condition in one
//!   place); what counts as connect, timeout or reset, `policy::FailKind::of`.
//! - **Why 429 or 503?** sluice's own refusals are `gate::Refusal`s: `gate::admit` (429
//!   `rate_limited`, 503 `shared_state_unavailable`), `gate::authenticate`,
//!   `gate::check_host`, `gate::addresses`; no region in rotation is `prepare::endpoints`
//!   (503 `no_healthy_region`). They are answered in `proxy::fail_to_proxy` (a CONNECT's in
//!   `tunnel::serve`, `Refusal::raw`). Before any of this, the listener itself refuses with
//!   503 `too_many_connections` (`front::Front`), and the jobs API with 503
//!   `jobs_unavailable` (`jobs::api`). Every code's status is `error::Code::status`. An upstream's own 429 or 503 goes back through
//!   `respond::stream`, with the pause it started as `Retry-After`; what it taught is
//!   `pace::learn` and `admission::Admission::learn`.

mod attempt;
mod body;
mod control;
mod ctx;
mod exec;
pub mod headers;
pub mod pace;
mod policy;
mod prepare;
mod record;
mod respond;
mod timing;
mod usage;

pub use control::Control;
pub use ctx::Ctx;
pub use prepare::Plan;
pub use respond::peer_options;

use crate::generation::Generation;
use crate::jobs::api as jobs;
use crate::state::Shared;
use pingora_error::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use std::time::Duration;

/// Serve one request from its head to the end of its answer. An error before the answer's
/// head was sent is answered by the caller's error page (`proxy::fail_to_proxy`).
///
/// A request naming `Sluice-Webhook` becomes a job (answered `202`) when it prefers an
/// asynchronous answer (`Prefer: respond-async`), or when it would otherwise get sluice's own
/// `429` before anything was sent (its host paused past what it may wait).
pub async fn serve(shared: &Shared, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
    let webhooks = jobs::webhooks_of(session.req_header());
    let mut plan = prepare::prepare(shared, session, ctx).await?;
    if webhooks.is_empty() {
        return admit_and_run(shared, session, ctx, &mut plan).await;
    }
    if !jobs::prefers_async(session.req_header()) {
        match admit_and_run(shared, session, ctx, &mut plan).await {
            Err(e)
                if crate::error::Code::of(&e) == crate::error::Code::RateLimited
                    && ctx.attempts == 0
                    && (session.body_bytes_read() == 0 || plan.body.is_some()) => {}
            done => return done,
        }
    }
    let generation = ctx.generation.clone();
    jobs::accept_proxied(
        shared,
        session,
        &generation,
        ctx.client.clone(),
        &plan.origin,
        &plan.upstream_path,
        webhooks,
        plan.body.take(),
    )
    .await
}

/// The stages after the plan: admission, then the attempts. For a host with token budgets,
/// the body is read first, so that the request's tokens can be estimated from it.
async fn admit_and_run(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    plan: &mut Plan,
) -> Result<()> {
    plan.endpoints_left()?;
    let early = match shared.admission.counts_tokens(&plan.cell) {
        true => {
            let reading = std::time::Instant::now();
            let early = body::read_early(session, plan, &ctx.generation).await?;
            // The host's `request_timeout` does not run while the body comes in (a client's
            // `Sluice-Timeout` does).
            if !plan.deadline_from_client {
                plan.deadline = plan.deadline.map(|d| d + reading.elapsed());
            }
            // Kept for a job, should the request become one.
            plan.body = early.as_ref().and_then(|(u, _)| u.replay());
            early
        }
        false => None,
    };
    let admitted = pace::admit(shared, plan, &mut ctx.queued).await?;
    exec::run(shared, session, ctx, plan, admitted, early).await
}

/// What every attempt of one request shares.
pub struct Outbound<'a> {
    pub shared: &'a Shared,
    pub ctx: &'a Ctx,
    pub plan: &'a Plan,
    /// Time the request's attempts waited after its first admission (a resend's wait for
    /// the pause, a retry's slot, the send guard), in nanoseconds; added to `Ctx::queued`.
    pub waited: &'a std::sync::atomic::AtomicU64,
}

impl Outbound<'_> {
    pub fn generation(&self) -> &Generation {
        &self.ctx.generation
    }

    /// Count `d` as time this request waited for its turn.
    pub fn waited(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.waited
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    /// The head an attempt sends: the client's, made ready for upstream. Each attempt gets
    /// its own, built from the client's when it starts.
    pub fn upstream_head(&self, req: &RequestHeader) -> Result<RequestHeader> {
        let mut head = req.clone();
        respond::upstream_head(&mut head, self.plan, &self.shared.via)?;
        // sluice answers the client's `Expect` itself, once the request is admitted.
        head.remove_header(&http::header::EXPECT);
        // An upgrade the client asked for (WebSocket) is asked of the upstream too.
        if let Some(protocol) = headers::upgrade_of(req) {
            head.insert_header(http::header::UPGRADE, protocol)?;
            head.insert_header(http::header::CONNECTION, "upgrade")?;
        }
        Ok(head)
    }

    /// A cap on each read before the response head: `server.read_timeout` when one is set.
    /// Otherwise none: the request's deadline bounds the wait for the head (one timer, so a
    /// timeout is the deadline's, never an attempt's racing it).
    pub fn read_timeout(&self) -> Option<Duration> {
        self.ctx
            .generation
            .config
            .server
            .read_timeout
            .map(|cap| cap.get())
    }

    /// How long a response body may be silent: the host's `body_idle_timeout`, within
    /// `server.read_timeout` when one is set. The deadline does not cut a body.
    pub fn body_idle_timeout(&self) -> Duration {
        let idle = self.plan.limits.body_idle_timeout.get();
        self.ctx
            .generation
            .config
            .server
            .read_timeout
            .map_or(idle, |cap| cap.get().min(idle))
    }
}
