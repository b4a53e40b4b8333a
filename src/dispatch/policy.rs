//! The dispatch policy of one request, apart from I/O: which endpoint gets the next attempt,
//! whether to send again (retry), to duplicate (hedge) or to fan out (race), when an answer is
//! delivered and when the request gives up. It owns endpoint choice, `max_attempts`,
//! `retry_on`, the idempotency rule, the retry budget (through [`Env`]), backoff, the hedge
//! schedule and the deadline.
//!
//! Events go in (an attempt ended, the body progressed, the hedge timer or the deadline fired)
//! and [`Action`]s come out (send an attempt, count something, deliver, fail), pushed onto a
//! buffer the driver drains and reuses. `exec.rs`
//! drives it with real attempts; the tests below drive it on paused time without a socket.

use super::attempt::Admit;
use super::timing::backoff;
use crate::config::{Mode, RetryOn};
use crate::error::Code;
use std::time::Duration;
use tokio::time::Instant;

/// Why an attempt was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    First,
    Retry,
    Hedge,
    Race,
}

/// The rules one request runs under.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub mode: Mode,
    pub retry_on: RetryOn,
    pub max_attempts: u32,
}

impl Rules {
    /// The idempotency rule: a request that may not be sent twice (`duplicable` false: an
    /// unsafe method without `Idempotency-Key`, unless the host allows it) runs `single`, and
    /// retries only what was never sent (a connection never made, a 429). An `upgrade`
    /// (WebSocket) is one connection: never duplicated.
    pub fn new(
        mode: Mode,
        retry_on: RetryOn,
        max_attempts: u32,
        duplicable: bool,
        upgrade: bool,
    ) -> Rules {
        Rules {
            mode: if duplicable && !upgrade {
                mode
            } else {
                Mode::Single
            },
            retry_on: if duplicable {
                retry_on
            } else {
                retry_on.unsafe_subset()
            },
            max_attempts,
        }
    }
}

/// The header by which an upstream recognises a repeated request.
const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// May this request be sent more than once? An idempotent method, or an `Idempotency-Key`
/// (the upstream recognises a repeat), or a host that allows duplicating unsafe requests
/// (`duplicate_unsafe`).
pub fn duplicable(req: &pingora_http::RequestHeader, duplicate_unsafe: bool) -> bool {
    req.method.is_idempotent() || req.headers.contains_key(IDEMPOTENCY_KEY) || duplicate_unsafe
}

/// What the policy asks of the world it runs in.
pub trait Env {
    /// Is endpoint `r` in rotation now (not ejected, not held out)?
    fn available(&self, r: usize) -> bool;
    /// Take one extra attempt (a retry or a hedge) from the host's retry budget.
    fn take_extra(&mut self) -> bool;
    /// Is the host paused for longer than this request may still wait? Then nothing is sent
    /// again: the answer in hand goes back at once.
    fn paused_past_wait(&self) -> bool;
    /// The hedge delay after a first attempt to endpoint `r`.
    fn hedge_delay(&self, r: usize) -> Duration;
}

/// Most refused h2 streams of one request sent again outside `max_attempts` and the retry
/// budget; past it, a refusal counts like any attempt.
const MAX_REFUSED: u32 = 5;

/// How an attempt's failure counts against `retry_on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// No connection was made (refused, timed out, TLS, DNS): `retry_on = "connect"`.
    Connect,
    /// No response head in time: `retry_on = "timeout"`.
    Timeout,
    /// The connection broke after the request may have been sent: `retry_on = "timeout"`.
    Reset,
    /// The upstream refused its h2 stream before processing it (`REFUSED_STREAM`, or past a
    /// graceful GOAWAY's last stream): sent again whatever the method and `retry_on`, to the
    /// same endpoint, outside the retry budget and `max_attempts` (the h2 connection's life,
    /// not a failure), up to `MAX_REFUSED` times.
    Refused,
}

impl FailKind {
    /// Which `retry_on` rule an attempt's failure falls under (`unsent`: the request never
    /// reached the upstream).
    pub fn of(code: Code, unsent: bool) -> FailKind {
        match code {
            Code::ConnectRefused
            | Code::ConnectTimeout
            | Code::ConnectFailed
            | Code::UpstreamTls
            | Code::Dns => FailKind::Connect,
            Code::UpstreamTimeout => FailKind::Timeout,
            _ if unsent => FailKind::Connect,
            _ => FailKind::Reset,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            FailKind::Connect => "connect",
            FailKind::Timeout => "timeout",
            FailKind::Reset => "reset",
            FailKind::Refused => "refused",
        }
    }
}

/// How an attempt ended, as far as the policy needs to know.
pub enum Ended<A, E> {
    /// The upstream answered with `status`. `host_paused`: the answer paused the host's
    /// quota, so a resend goes to the same endpoint once the pause is over.
    Answered {
        status: u16,
        host_paused: bool,
        answer: A,
    },
    /// It failed after admission. `same_again`: a kept-alive connection the upstream closed
    /// as it was reused (the request may never have arrived): the same endpoint again.
    Failed {
        kind: FailKind,
        same_again: bool,
        error: E,
    },
    /// Admission refused it before anything was sent: it is no attempt.
    Refused { error: E },
}

impl<A, E> Ended<A, E> {
    /// An attempt that ended without an answer, with the `code` of its error: refused by
    /// admission before it was sent (`unsent`), or failed; `reused`: it went on a kept-alive
    /// connection from the pool.
    pub fn failed(code: Code, unsent: bool, reused: bool, error: E) -> Ended<A, E> {
        if unsent && matches!(code, Code::RateLimited | Code::SharedStateUnavailable) {
            return Ended::Refused { error };
        }
        Ended::Failed {
            kind: FailKind::of(code, unsent),
            same_again: reused && code == Code::UpstreamClosed,
            error,
        }
    }
}

/// An attempt to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub why: Why,
    pub region: usize,
    pub admit: Admit,
    /// Backoff before it goes.
    pub delay: Duration,
}

/// Something worth counting (the driver turns it into metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// A retry goes, for this reason (`429`, `status`, `connect`, `timeout`, `reset`).
    Retry(&'static str),
    HedgeFired,
    HedgeWon,
    Raced,
    /// An extra attempt the retry budget did not allow.
    BudgetExhausted,
}

/// Why the request failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Unanswered<E> {
    /// The last attempt's error.
    Last(E),
    /// No response head within the deadline.
    Deadline,
    /// Nothing was ever sent.
    NoAttempt,
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<A, E> {
    Send(Launch),
    Count(Count),
    /// Stream this answer to the client; `attempts` were sent.
    Deliver {
        answer: A,
        attempts: u32,
    },
    Fail {
        failure: Unanswered<E>,
        attempts: u32,
    },
}

/// Which endpoint goes next: the route's order, each endpoint once (an endpoint that just
/// timed out, failed or answered 5xx is not asked again by the same request), skipping
/// endpoints taken out of rotation since the request began (unless every endpoint of the
/// order is out: then it is a last resort, tried in order). Only a resend after the host's
/// quota paused it, or after a reused connection closed, goes to the same endpoint again
/// ([`Picker::again`]).
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
    fn next(&mut self, env: &impl Env) -> Option<(usize, u32)> {
        let any_up = self.order.iter().any(|&r| env.available(r));
        let first = self.used == 0;
        let r = self
            .order
            .iter()
            .copied()
            .find(|&r| self.per_region[r] == 0 && (first || !any_up || env.available(r)))?;
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

/// The request body as the policy sees it.
#[derive(Clone, Copy, Debug)]
struct BodyState {
    /// Read to its end.
    complete: bool,
    /// Another attempt can still get all of it (it fits the replay buffer).
    replayable: bool,
}

/// One request's policy state.
pub struct Policy<A, E> {
    rules: Rules,
    picker: Picker,
    /// Attempts sent (a refused one is taken back).
    sent: u32,
    /// Its h2 streams refused before the upstream processed them, sent again freely.
    refused: u32,
    /// Attempts started and not ended.
    running: usize,
    /// Attempts decided but waiting for the whole body (they replay it).
    waiting: Vec<Launch>,
    hedge_delay: Duration,
    hedge_at: Option<Instant>,
    deadline: Option<Instant>,
    /// The deadline's clock stops while the body streams in (the host's `request_timeout`,
    /// not the client's `Sluice-Timeout`).
    stretch: bool,
    /// When the policy began, if its deadline stretches over a body still to come.
    started: Option<Instant>,
    body: BodyState,
    /// The best answer so far that asked for a retry (a 429, a retryable 5xx): delivered if
    /// no better one comes.
    fallback: Option<A>,
    last: Option<E>,
    done: bool,
}

impl<A, E> Policy<A, E> {
    /// A request over the endpoints of `order` (indices into a route of `regions`), with the
    /// body already complete or not.
    pub fn new(
        rules: Rules,
        order: Vec<usize>,
        regions: usize,
        deadline: Option<Instant>,
        stretch: bool,
        body_complete: bool,
    ) -> Policy<A, E> {
        Policy {
            rules,
            picker: Picker::new(order, regions),
            sent: 0,
            refused: 0,
            running: 0,
            waiting: Vec::new(),
            hedge_delay: Duration::ZERO,
            hedge_at: None,
            deadline,
            stretch,
            // Only a deadline that stretches over a body still to come reads it.
            started: (stretch && !body_complete).then(Instant::now),
            body: BodyState {
                complete: body_complete,
                replayable: true,
            },
            fallback: None,
            last: None,
            done: false,
        }
    }

    /// The first attempt (admitted already), the race's fan-out, the hedge timer.
    pub fn start(&mut self, env: &mut impl Env, out: &mut Vec<Action<A, E>>) {
        let first = self.picker.next(env).map_or(0, |(r, _)| r);
        self.launch(
            Launch {
                why: Why::First,
                region: first,
                admit: Admit::Held,
                delay: Duration::ZERO,
            },
            out,
        );
        if self.rules.mode == Mode::Race {
            out.push(Action::Count(Count::Raced));
            // The fan-out is what race means (one attempt per endpoint, up to max_attempts):
            // the retry budget bounds retries and hedges, not this.
            while self.planned() < self.picker.order.len() as u32
                && self.planned() < self.rules.max_attempts
            {
                let Some((r, _)) = self.picker.next(env) else {
                    break;
                };
                self.waiting.push(Launch {
                    why: Why::Race,
                    region: r,
                    admit: Admit::IfFree,
                    delay: Duration::ZERO,
                });
            }
        }
        if self.rules.mode == Mode::Hedge {
            self.hedge_delay = env.hedge_delay(first);
            self.hedge_at = Instant::now().checked_add(self.hedge_delay);
        }
        self.release(out);
    }

    /// When the hedge timer fires next (none: no hedge to come).
    pub fn hedge_at(&self) -> Option<Instant> {
        self.hedge_at
    }

    /// When the deadline fires, while it runs (its clock stops while the body streams in,
    /// unless the client set it).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
            .filter(|_| self.body.complete || !self.stretch)
    }

    /// Attempts sent so far.
    pub fn attempts(&self) -> u32 {
        self.sent
    }

    /// An attempt ended (`why` it was sent, to endpoint `region`).
    pub fn ended(
        &mut self,
        why: Why,
        region: usize,
        ended: Ended<A, E>,
        env: &mut impl Env,
        out: &mut Vec<Action<A, E>>,
    ) {
        self.running = self.running.saturating_sub(1);
        match ended {
            Ended::Answered {
                status,
                host_paused,
                answer,
            } if self.rules.retry_on.status(status) => {
                let reason = if status == 429 { "429" } else { "status" };
                // The host's quota: the same endpoint after the pause (another region would
                // answer the same). A region's own quota: on to another one now.
                let same = host_paused.then_some(region);
                self.fallback = Some(answer);
                self.retry(reason, same, false, env, out);
            }
            Ended::Answered { answer, .. } => {
                if why == Why::Hedge {
                    out.push(Action::Count(Count::HedgeWon));
                }
                self.finish(
                    Action::Deliver {
                        answer,
                        attempts: self.sent,
                    },
                    out,
                );
                return;
            }
            Ended::Failed {
                kind,
                same_again,
                error,
            } => {
                self.last = Some(error);
                let retry = match kind {
                    FailKind::Connect => self.rules.retry_on.connect,
                    FailKind::Timeout | FailKind::Reset => self.rules.retry_on.timeout,
                    FailKind::Refused => true,
                };
                let free = kind == FailKind::Refused && self.refused < MAX_REFUSED;
                if free {
                    // Not an attempt the upstream saw.
                    self.refused += 1;
                    self.sent = self.sent.saturating_sub(1);
                }
                if retry {
                    let same = same_again.then_some(region);
                    self.retry(kind.reason(), same, free, env, out);
                }
            }
            Ended::Refused { error } => {
                // Nothing was sent: no attempt, and its endpoint is not used up.
                self.sent = self.sent.saturating_sub(1);
                self.picker.undo(region);
                self.last = Some(error);
            }
        }
        self.release(out);
    }

    /// The body read on: `complete` at its end; `replayable` while it fits the replay buffer.
    pub fn body(&mut self, complete: bool, replayable: bool, out: &mut Vec<Action<A, E>>) {
        if complete && !self.body.complete && self.stretch {
            // The deadline's clock stood still while the body streamed in.
            self.deadline = self.deadline.and_then(|d| match self.started {
                Some(started) => d.checked_add(started.elapsed()),
                None => Some(d),
            });
        }
        self.body = BodyState {
            complete,
            replayable,
        };
        self.release(out);
    }

    /// The hedge timer fired: a duplicate to the next endpoint, if the rules and the budget
    /// allow, and the timer again for the one after.
    pub fn hedge_timer(&mut self, env: &mut impl Env, out: &mut Vec<Action<A, E>>) {
        self.hedge_at = None;
        let planned = self.planned();
        if planned < self.rules.max_attempts && self.body.replayable {
            if let Some((r, _)) = self.picker.next(env) {
                if env.take_extra() {
                    out.push(Action::Count(Count::HedgeFired));
                    self.waiting.push(Launch {
                        why: Why::Hedge,
                        region: r,
                        admit: Admit::IfFree,
                        delay: Duration::ZERO,
                    });
                    if planned + 1 < self.rules.max_attempts {
                        self.hedge_at = Instant::now().checked_add(self.hedge_delay);
                    }
                } else {
                    self.picker.undo(r);
                    out.push(Action::Count(Count::BudgetExhausted));
                }
            }
        }
        self.release(out);
    }

    /// The deadline passed with no answer delivered.
    pub fn deadline_passed(&mut self, out: &mut Vec<Action<A, E>>) {
        self.finish(
            Action::Fail {
                failure: Unanswered::Deadline,
                attempts: self.sent,
            },
            out,
        );
    }

    /// Attempts sent or waiting to be.
    fn planned(&self) -> u32 {
        self.sent + self.waiting.len() as u32
    }

    /// A retry after a retryable outcome, when everything allows it: nothing else in flight
    /// (a hedge or a raced attempt still running may yet answer), attempts left, the body
    /// replayable, the deadline not passed, the host not paused past the wait, an endpoint
    /// left (or `same`), and the budget. The endpoint is taken only for a retry that goes.
    fn retry(
        &mut self,
        reason: &'static str,
        same: Option<usize>,
        free: bool,
        env: &mut impl Env,
        out: &mut Vec<Action<A, E>>,
    ) {
        let can = self.running == 0
            && self.waiting.is_empty()
            && self.sent < self.rules.max_attempts
            && self.body.replayable
            && self.deadline.is_none_or(|d| Instant::now() < d)
            && !env.paused_past_wait();
        let pick = match same {
            _ if !can => None,
            Some(r) => Some((r, self.picker.again(r))),
            None => self.picker.next(env),
        };
        let Some((r, nth)) = pick else { return };
        if free || env.take_extra() {
            out.push(Action::Count(Count::Retry(reason)));
            self.waiting.push(Launch {
                why: Why::Retry,
                region: r,
                admit: Admit::Wait,
                delay: backoff(nth),
            });
        } else {
            self.picker.undo(r);
            out.push(Action::Count(Count::BudgetExhausted));
        }
    }

    /// Send what waited for the body once it is whole; end the request when nothing runs and
    /// nothing more can be sent.
    fn release(&mut self, out: &mut Vec<Action<A, E>>) {
        if self.done {
            return;
        }
        if self.body.complete && self.body.replayable {
            for send in std::mem::take(&mut self.waiting) {
                self.launch(send, out);
            }
        }
        if self.running == 0 && (self.waiting.is_empty() || !self.body.replayable) {
            let attempts = self.sent;
            let end = match (self.fallback.take(), self.last.take()) {
                (Some(answer), _) => Action::Deliver { answer, attempts },
                (None, Some(e)) => Action::Fail {
                    failure: Unanswered::Last(e),
                    attempts,
                },
                (None, None) => Action::Fail {
                    failure: Unanswered::NoAttempt,
                    attempts,
                },
            };
            self.finish(end, out);
        }
    }

    fn launch(&mut self, send: Launch, out: &mut Vec<Action<A, E>>) {
        self.sent += 1;
        self.running += 1;
        out.push(Action::Send(send));
    }

    fn finish(&mut self, end: Action<A, E>, out: &mut Vec<Action<A, E>>) {
        self.done = true;
        self.waiting.clear();
        self.hedge_at = None;
        out.push(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryOn;

    /// A world without sockets: which endpoints are up, how many extras the budget still
    /// gives, whether the host is paused past the wait, a fixed hedge delay.
    struct World {
        up: Vec<bool>,
        extras: u32,
        paused_past_wait: bool,
        hedge: Duration,
    }

    impl World {
        fn new(endpoints: usize) -> World {
            World {
                up: vec![true; endpoints],
                extras: 100,
                paused_past_wait: false,
                hedge: Duration::from_millis(100),
            }
        }
    }

    impl Env for World {
        fn available(&self, r: usize) -> bool {
            self.up[r]
        }
        fn take_extra(&mut self) -> bool {
            let ok = self.extras > 0;
            self.extras = self.extras.saturating_sub(1);
            ok
        }
        fn paused_past_wait(&self) -> bool {
            self.paused_past_wait
        }
        fn hedge_delay(&self, _: usize) -> Duration {
            self.hedge
        }
    }

    type P = Policy<&'static str, &'static str>;
    type Acts = Vec<Action<&'static str, &'static str>>;

    fn start(p: &mut P, w: &mut World) -> Acts {
        let mut out = Vec::new();
        p.start(w, &mut out);
        out
    }

    fn ended(
        p: &mut P,
        why: Why,
        region: usize,
        e: Ended<&'static str, &'static str>,
        w: &mut World,
    ) -> Acts {
        let mut out = Vec::new();
        p.ended(why, region, e, w, &mut out);
        out
    }

    fn body(p: &mut P, complete: bool, replayable: bool) -> Acts {
        let mut out = Vec::new();
        p.body(complete, replayable, &mut out);
        out
    }

    fn hedge_timer(p: &mut P, w: &mut World) -> Acts {
        let mut out = Vec::new();
        p.hedge_timer(w, &mut out);
        out
    }

    fn deadline_passed(p: &mut P) -> Acts {
        let mut out = Vec::new();
        p.deadline_passed(&mut out);
        out
    }

    fn retry_on(tokens: &[&str]) -> RetryOn {
        RetryOn::parse(tokens.iter().copied()).expect("retry_on")
    }

    fn policy(mode: Mode, tokens: &[&str], max_attempts: u32, endpoints: usize) -> P {
        let rules = Rules::new(mode, retry_on(tokens), max_attempts, true, false);
        Policy::new(
            rules,
            (0..endpoints).collect(),
            endpoints,
            None,
            false,
            true,
        )
    }

    fn send(why: Why, region: usize, admit: Admit) -> Action<&'static str, &'static str> {
        Action::Send(Launch {
            why,
            region,
            admit,
            delay: Duration::ZERO,
        })
    }

    fn answered(status: u16, answer: &'static str) -> Ended<&'static str, &'static str> {
        Ended::Answered {
            status,
            host_paused: false,
            answer,
        }
    }

    fn failed(kind: FailKind, error: &'static str) -> Ended<&'static str, &'static str> {
        Ended::Failed {
            kind,
            same_again: false,
            error,
        }
    }

    /// The sends among `acts`, without their backoff (jittered).
    fn sends(acts: &Acts) -> Vec<(Why, usize, Admit)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(s) => Some((s.why, s.region, s.admit)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_status_is_retried_on_the_next_endpoint_and_its_answer_delivered() {
        let mut w = World::new(3);
        let mut p = policy(Mode::Single, &["5xx"], 3, 3);
        assert_eq!(
            start(&mut p, &mut w),
            vec![send(Why::First, 0, Admit::Held)]
        );
        let acts = ended(&mut p, Why::First, 0, answered(503, "503 from 0"), &mut w);
        assert_eq!(acts[0], Action::Count(Count::Retry("status")));
        assert_eq!(sends(&acts), vec![(Why::Retry, 1, Admit::Wait)]);
        let acts = ended(&mut p, Why::Retry, 1, answered(200, "200 from 1"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "200 from 1",
                attempts: 2
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_not_in_retry_on_is_delivered_at_once() {
        let mut w = World::new(2);
        let mut p = policy(Mode::Single, &["connect"], 3, 2);
        start(&mut p, &mut w);
        let acts = ended(&mut p, Why::First, 0, answered(503, "503"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "503",
                attempts: 1
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_resets_and_connect_failures_follow_their_retry_on_rule() {
        for (kind, tokens, retried) in [
            (FailKind::Timeout, &["timeout"][..], true),
            (FailKind::Reset, &["timeout"][..], true),
            (FailKind::Connect, &["connect"][..], true),
            (FailKind::Timeout, &["connect"][..], false),
            (FailKind::Reset, &["connect"][..], false),
            (FailKind::Connect, &["timeout"][..], false),
        ] {
            let mut w = World::new(2);
            let mut p = policy(Mode::Single, tokens, 3, 2);
            start(&mut p, &mut w);
            let acts = ended(&mut p, Why::First, 0, failed(kind, "lost"), &mut w);
            if retried {
                assert_eq!(
                    acts[0],
                    Action::Count(Count::Retry(kind.reason())),
                    "{kind:?} with {tokens:?}"
                );
                assert_eq!(sends(&acts), vec![(Why::Retry, 1, Admit::Wait)]);
            } else {
                assert_eq!(
                    acts,
                    vec![Action::Fail {
                        failure: Unanswered::Last("lost"),
                        attempts: 1
                    }],
                    "{kind:?} with {tokens:?}"
                );
            }
        }
    }

    #[test]
    fn failures_are_told_apart_by_their_code() {
        type E = Ended<(), ()>;
        assert!(matches!(
            E::failed(Code::RateLimited, true, false, ()),
            Ended::Refused { .. }
        ));
        assert!(matches!(
            E::failed(Code::ConnectRefused, true, false, ()),
            Ended::Failed {
                kind: FailKind::Connect,
                ..
            }
        ));
        assert!(matches!(
            E::failed(Code::UpstreamTimeout, false, false, ()),
            Ended::Failed {
                kind: FailKind::Timeout,
                ..
            }
        ));
        assert!(matches!(
            E::failed(Code::UpstreamClosed, false, true, ()),
            Ended::Failed {
                kind: FailKind::Reset,
                same_again: true,
                ..
            }
        ));
        assert!(matches!(
            E::failed(Code::UpstreamClosed, false, false, ()),
            Ended::Failed {
                kind: FailKind::Reset,
                same_again: false,
                ..
            }
        ));
    }

    #[test]
    fn a_request_may_be_sent_twice_when_idempotent_keyed_or_allowed() {
        let req = |method: &str, key: bool| {
            let mut r = pingora_http::RequestHeader::build(method, b"/", None).expect("req");
            if key {
                r.insert_header("Idempotency-Key", "k1").expect("header");
            }
            r
        };
        assert!(duplicable(&req("GET", false), false));
        assert!(duplicable(&req("PUT", false), false));
        assert!(!duplicable(&req("POST", false), false));
        assert!(duplicable(&req("POST", true), false));
        assert!(duplicable(&req("POST", false), true), "duplicate_unsafe");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_may_not_be_sent_twice_runs_single_and_retries_only_the_unsent() {
        let rules = Rules::new(
            Mode::Hedge,
            retry_on(&["connect", "timeout", "5xx", "429"]),
            3,
            false,
            false,
        );
        assert_eq!(rules.mode, Mode::Single);
        let mut w = World::new(3);
        let mut p: P = Policy::new(rules, vec![0, 1, 2], 3, None, false, true);
        start(&mut p, &mut w);
        assert_eq!(p.hedge_at(), None, "no hedge for an unsafe request");
        // A 5xx and a timeout may have been processed: not sent again.
        let acts = ended(
            &mut p,
            Why::First,
            0,
            failed(FailKind::Timeout, "timed out"),
            &mut w,
        );
        assert_eq!(
            acts,
            vec![Action::Fail {
                failure: Unanswered::Last("timed out"),
                attempts: 1
            }]
        );
        let mut p: P = Policy::new(rules, vec![0, 1, 2], 3, None, false, true);
        start(&mut p, &mut w);
        let acts = ended(&mut p, Why::First, 0, answered(502, "502"), &mut w);
        assert!(matches!(acts[..], [Action::Deliver { .. }]), "{acts:?}");
        // A connection never made, and a 429, are.
        let mut p: P = Policy::new(rules, vec![0, 1, 2], 3, None, false, true);
        start(&mut p, &mut w);
        let acts = ended(
            &mut p,
            Why::First,
            0,
            failed(FailKind::Connect, "refused"),
            &mut w,
        );
        assert_eq!(sends(&acts), vec![(Why::Retry, 1, Admit::Wait)]);
        let acts = ended(&mut p, Why::Retry, 1, answered(429, "429"), &mut w);
        assert_eq!(sends(&acts), vec![(Why::Retry, 2, Admit::Wait)]);
        // An upgrade is never duplicated, though it may be retried.
        let upgrade = Rules::new(Mode::Race, retry_on(&["timeout"]), 3, true, true);
        assert_eq!(upgrade.mode, Mode::Single);
        assert!(upgrade.retry_on.timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_sends_nothing_more_and_delivers_the_answer_in_hand() {
        let mut w = World::new(3);
        w.extras = 0;
        let mut p = policy(Mode::Single, &["5xx"], 3, 3);
        start(&mut p, &mut w);
        let acts = ended(&mut p, Why::First, 0, answered(503, "503"), &mut w);
        assert_eq!(
            acts,
            vec![
                Action::Count(Count::BudgetExhausted),
                Action::Deliver {
                    answer: "503",
                    attempts: 1
                }
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_bounds_retries() {
        let mut w = World::new(3);
        let mut p = policy(Mode::Single, &["5xx"], 2, 3);
        start(&mut p, &mut w);
        ended(&mut p, Why::First, 0, answered(503, "first"), &mut w);
        let acts = ended(&mut p, Why::Retry, 1, answered(503, "second"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "second",
                attempts: 2
            }],
            "two attempts: the last answer goes back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_is_asked_once_unless_the_host_paused_or_a_reused_connection_closed() {
        // One endpoint: a timeout is not retried on it.
        let mut w = World::new(1);
        let mut p = policy(Mode::Single, &["timeout"], 3, 1);
        start(&mut p, &mut w);
        let acts = ended(
            &mut p,
            Why::First,
            0,
            failed(FailKind::Timeout, "timed out"),
            &mut w,
        );
        assert!(matches!(acts[..], [Action::Fail { .. }]), "{acts:?}");
        // A 429 that paused the host's quota: the same endpoint, after the pause.
        let mut p = policy(Mode::Single, &["429"], 3, 1);
        start(&mut p, &mut w);
        let paused = Ended::Answered {
            status: 429,
            host_paused: true,
            answer: "429",
        };
        let acts = ended(&mut p, Why::First, 0, paused, &mut w);
        assert_eq!(sends(&acts), vec![(Why::Retry, 0, Admit::Wait)]);
        // A kept-alive connection closed as it was reused: the same endpoint again.
        let mut p = policy(Mode::Single, &["timeout"], 3, 2);
        start(&mut p, &mut w);
        let closed = Ended::Failed {
            kind: FailKind::Reset,
            same_again: true,
            error: "closed",
        };
        let acts = ended(&mut p, Why::First, 0, closed, &mut w);
        assert_eq!(sends(&acts), vec![(Why::Retry, 0, Admit::Wait)]);
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_out_of_rotation_are_skipped_unless_all_are_out() {
        let mut w = World::new(3);
        let mut p = policy(Mode::Single, &["5xx"], 3, 3);
        start(&mut p, &mut w);
        w.up[1] = false;
        let acts = ended(&mut p, Why::First, 0, answered(503, "a"), &mut w);
        assert_eq!(sends(&acts), vec![(Why::Retry, 2, Admit::Wait)], "1 is out");
        let acts = ended(&mut p, Why::Retry, 2, answered(503, "b"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "b",
                attempts: 2
            }],
            "0 and 2 were asked, 1 is out: none is left"
        );
        // All out: the order is a last resort, each once.
        let mut w = World::new(2);
        w.up = vec![false, false];
        let mut p = policy(Mode::Single, &["5xx"], 3, 2);
        start(&mut p, &mut w);
        let acts = ended(&mut p, Why::First, 0, answered(503, "a"), &mut w);
        assert_eq!(sends(&acts), vec![(Why::Retry, 1, Admit::Wait)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_refused_by_admission_is_no_attempt_and_leaves_its_endpoint_free() {
        let mut w = World::new(2);
        let mut p = policy(Mode::Race, &["5xx"], 2, 2);
        let acts = start(&mut p, &mut w);
        assert_eq!(
            sends(&acts),
            vec![(Why::First, 0, Admit::Held), (Why::Race, 1, Admit::IfFree)]
        );
        let acts = ended(
            &mut p,
            Why::Race,
            1,
            Ended::Refused { error: "no slot" },
            &mut w,
        );
        assert!(acts.is_empty(), "the first still runs: {acts:?}");
        assert_eq!(p.attempts(), 1);
        // The first's 503 is retried on the endpoint the refused duplicate never reached.
        let acts = ended(&mut p, Why::First, 0, answered(503, "503"), &mut w);
        assert_eq!(sends(&acts), vec![(Why::Retry, 1, Admit::Wait)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_for_a_duplicate_still_running() {
        let mut w = World::new(3);
        let mut p = policy(Mode::Race, &["5xx"], 3, 3);
        start(&mut p, &mut w);
        let acts = ended(&mut p, Why::First, 0, answered(503, "503"), &mut w);
        assert!(acts.is_empty(), "two raced attempts still run: {acts:?}");
        let acts = ended(&mut p, Why::Race, 1, answered(200, "200"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "200",
                attempts: 3
            }],
            "the first good answer wins; the third is cancelled with the policy done"
        );
        assert_eq!(p.hedge_at(), None);
        assert!(
            hedge_timer(&mut p, &mut w).is_empty(),
            "nothing after the end"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_race_waits_for_the_whole_body_and_none_goes_past_max_attempts() {
        let mut w = World::new(4);
        let rules = Rules::new(Mode::Race, retry_on(&["5xx"]), 3, true, false);
        let mut p: P = Policy::new(rules, vec![0, 1, 2, 3], 4, None, false, false);
        let acts = start(&mut p, &mut w);
        assert!(acts.contains(&Action::Count(Count::Raced)));
        assert_eq!(
            sends(&acts),
            vec![(Why::First, 0, Admit::Held)],
            "the duplicates replay the body: they wait for all of it"
        );
        assert!(body(&mut p, false, true).is_empty());
        let acts = body(&mut p, true, true);
        assert_eq!(
            sends(&acts),
            vec![(Why::Race, 1, Admit::IfFree), (Why::Race, 2, Admit::IfFree)]
        );
        // A body too large to replay: the duplicates never go, the first one stands alone.
        let mut p: P = Policy::new(rules, vec![0, 1, 2, 3], 4, None, false, false);
        start(&mut p, &mut w);
        assert!(body(&mut p, true, false).is_empty());
        let acts = ended(&mut p, Why::First, 0, answered(503, "503"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "503",
                attempts: 1
            }],
            "no retry without the body to replay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_fires_after_its_delay_and_again_until_max_attempts() {
        let mut w = World::new(3);
        let mut p = policy(Mode::Hedge, &["5xx"], 3, 3);
        start(&mut p, &mut w);
        let first = p.hedge_at().expect("a hedge is scheduled");
        assert_eq!(first, Instant::now() + Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        let acts = hedge_timer(&mut p, &mut w);
        assert_eq!(acts[0], Action::Count(Count::HedgeFired));
        assert_eq!(sends(&acts), vec![(Why::Hedge, 1, Admit::IfFree)]);
        assert_eq!(
            p.hedge_at(),
            Some(Instant::now() + Duration::from_millis(100)),
            "a third attempt is allowed: the timer again"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        let acts = hedge_timer(&mut p, &mut w);
        assert_eq!(sends(&acts), vec![(Why::Hedge, 2, Admit::IfFree)]);
        assert_eq!(p.hedge_at(), None, "max_attempts reached");
        let acts = ended(&mut p, Why::Hedge, 2, answered(200, "hedge"), &mut w);
        assert_eq!(
            acts,
            vec![
                Action::Count(Count::HedgeWon),
                Action::Deliver {
                    answer: "hedge",
                    attempts: 3
                }
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_is_cancelled_by_an_answer_before_its_delay() {
        let mut w = World::new(2);
        let mut p = policy(Mode::Hedge, &["5xx"], 3, 2);
        start(&mut p, &mut w);
        assert!(p.hedge_at().is_some());
        tokio::time::advance(Duration::from_millis(40)).await;
        let acts = ended(&mut p, Why::First, 0, answered(200, "fast"), &mut w);
        assert!(matches!(acts[..], [Action::Deliver { attempts: 1, .. }]));
        assert_eq!(p.hedge_at(), None, "the hedge timer is off");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_needs_the_budget() {
        let mut w = World::new(2);
        w.extras = 0;
        let mut p = policy(Mode::Hedge, &["5xx"], 3, 2);
        start(&mut p, &mut w);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            hedge_timer(&mut p, &mut w),
            vec![Action::Count(Count::BudgetExhausted)]
        );
        w.extras = 1;
        let acts = ended(&mut p, Why::First, 0, answered(503, "503"), &mut w);
        assert_eq!(
            sends(&acts),
            vec![(Why::Retry, 1, Admit::Wait)],
            "the endpoint the hedge did not take is still free"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_the_request_and_no_retry_goes_past_it() {
        let mut w = World::new(3);
        let rules = Rules::new(Mode::Single, retry_on(&["5xx"]), 3, true, false);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut p: P = Policy::new(rules, vec![0, 1, 2], 3, Some(deadline), false, true);
        start(&mut p, &mut w);
        assert_eq!(p.deadline(), Some(deadline));
        tokio::time::advance(Duration::from_secs(1)).await;
        let acts = ended(&mut p, Why::First, 0, answered(503, "late 503"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "late 503",
                attempts: 1
            }],
            "past the deadline: the answer in hand, no retry"
        );
        let mut p: P = Policy::new(rules, vec![0, 1, 2], 3, Some(deadline), false, true);
        start(&mut p, &mut w);
        assert_eq!(
            deadline_passed(&mut p),
            vec![Action::Fail {
                failure: Unanswered::Deadline,
                attempts: 1
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_hosts_request_timeout_stops_while_the_body_streams_in() {
        let mut w = World::new(1);
        let rules = Rules::new(Mode::Single, retry_on(&["5xx"]), 3, true, false);
        let deadline = Instant::now() + Duration::from_secs(1);
        // The host's request_timeout: not armed while the body streams, moved by its time.
        let mut p: P = Policy::new(rules, vec![0], 1, Some(deadline), true, false);
        start(&mut p, &mut w);
        assert_eq!(p.deadline(), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        body(&mut p, true, true);
        assert_eq!(p.deadline(), Some(deadline + Duration::from_secs(5)));
        // The client's Sluice-Timeout: armed all along, never moved.
        let mut p: P = Policy::new(rules, vec![0], 1, Some(deadline), false, false);
        start(&mut p, &mut w);
        assert_eq!(p.deadline(), Some(deadline));
        tokio::time::advance(Duration::from_secs(5)).await;
        body(&mut p, true, true);
        assert_eq!(p.deadline(), Some(deadline));
        // The host's request_timeout over a body that was whole from the start: armed at
        // once, never moved.
        let mut p: P = Policy::new(rules, vec![0], 1, Some(deadline), true, true);
        start(&mut p, &mut w);
        assert_eq!(p.deadline(), Some(deadline));
        tokio::time::advance(Duration::from_secs(5)).await;
        body(&mut p, true, true);
        assert_eq!(p.deadline(), Some(deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_paused_past_the_wait_gets_its_429_back_at_once() {
        let mut w = World::new(2);
        w.paused_past_wait = true;
        let mut p = policy(Mode::Single, &["429"], 3, 2);
        start(&mut p, &mut w);
        let acts = ended(&mut p, Why::First, 0, answered(429, "429"), &mut w);
        assert_eq!(
            acts,
            vec![Action::Deliver {
                answer: "429",
                attempts: 1
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_its_backoff_only_on_an_endpoint_already_asked() {
        let mut w = World::new(2);
        let mut p = policy(Mode::Single, &["timeout"], 3, 2);
        start(&mut p, &mut w);
        let acts = ended(
            &mut p,
            Why::First,
            0,
            failed(FailKind::Timeout, "t"),
            &mut w,
        );
        let delays: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Send(s) => Some(s.delay),
                _ => None,
            })
            .collect();
        assert_eq!(delays, vec![Duration::ZERO], "a fresh endpoint: no backoff");
        let closed = Ended::Failed {
            kind: FailKind::Reset,
            same_again: true,
            error: "closed",
        };
        let acts = ended(&mut p, Why::Retry, 1, closed, &mut w);
        let delay = acts.iter().find_map(|a| match a {
            Action::Send(s) => Some(s.delay),
            _ => None,
        });
        let delay = delay.expect("resent to the same endpoint");
        assert!(
            (Duration::from_micros(12_500)..Duration::from_micros(37_500)).contains(&delay),
            "25 ms +-50% before a second attempt to one endpoint: {delay:?}"
        );
    }
}
