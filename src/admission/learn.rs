//! Learning from responses: what a status and its rate-limit headers teach about a host (a
//! pause, a pace, a concurrency cap), held within bounds an upstream cannot abuse, and what
//! other nodes of the fleet told.

use super::fleet::FleetEvent;
use super::{hints, nanos, Admission, Host, PauseOrigin, PauseSource};
use crate::generation::Generation;
use std::time::Duration;

/// Slowest pace an upstream can set: one request per `hints::MAX_PAUSE`, so that one
/// interval never outlasts the longest pause.
pub const LEARNED_RPS_MIN: f64 = 1.0 / 3600.0;
/// Fastest pace an upstream can set when the host names no `max_rps`.
pub const LEARNED_RPS_MAX: f64 = 1000.0;
/// Shortest pause after a 429, whatever its `Retry-After` says.
pub const MIN_429_PAUSE: Duration = Duration::from_secs(1);

/// A pace learned from upstream headers, held to [`LEARNED_RPS_MIN`, the host's `max_rps` or
/// `LEARNED_RPS_MAX`].
pub fn clamp_learned_rps(rps: f64, max_rps: f64) -> f64 {
    let hi = if max_rps > 0.0 {
        max_rps
    } else {
        LEARNED_RPS_MAX
    }
    .max(LEARNED_RPS_MIN);
    if rps.is_finite() {
        rps.clamp(LEARNED_RPS_MIN, hi)
    } else {
        hi
    }
}

/// The shortest pause a response asks for (zero for none), as `learn` will apply it: a 429
/// at least `MIN_429_PAUSE`, a 503 its `Retry-After`, exhausted windows their reset.
fn signalled_pause(status: u16, hints: &hints::Hints) -> Duration {
    let by_status = match (status, hints.retry_after) {
        (429, d) => d.unwrap_or(Duration::ZERO).max(MIN_429_PAUSE),
        (503, Some(d)) => d,
        _ => Duration::ZERO,
    };
    by_status
        .max(hints.exhausted_for.unwrap_or(Duration::ZERO))
        .max(hints.tokens_unbudgeted_for().unwrap_or(Duration::ZERO))
}

/// Whether a response teaches anything a compact host cannot hold (then it gets a full cell).
fn teaches(status: u16, hints: &hints::Hints) -> bool {
    status == 429
        || (status == 503 && hints.retry_after.is_some())
        || hints.rps.is_some()
        || hints.max_concurrent.is_some()
        || hints.exhausted_for.is_some()
        || hints
            .tokens
            .iter()
            .any(|t| t.limit.is_some() || t.remaining == Some(0))
        || hints.requests.limit.is_some()
}

/// What a response taught sluice about its host.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Learned {
    /// A pause was started or extended: until (ns on the admission clock) and why.
    pub paused: Option<(u64, PauseSource)>,
    pub rps: Option<f64>,
    pub max_concurrent: Option<u32>,
}

impl Admission {
    /// Take in what a response said: pace statements, exhausted windows, 429 and 503 pauses.
    /// A compact host that is taught anything gets a full cell.
    pub fn learn(
        &self,
        host: &Host,
        generation: &Generation,
        status: u16,
        hints: &hints::Hints,
    ) -> Learned {
        let promoted;
        let cell = match host {
            Host::Cell(c) => c,
            Host::Light { .. } if !teaches(status, hints) => return Learned::default(),
            Host::Light { key, .. } => {
                // The pause this response asks for, less a nanosecond so that the pause applied
                // below (from a later `now`) still counts as the one that started it.
                let d = signalled_pause(status, hints);
                let pause = match d.is_zero() {
                    true => 0,
                    false => self.clock.now().saturating_add(nanos(d)).saturating_sub(1),
                };
                promoted = match self.cells.pin().get(key.as_str()) {
                    Some(c) => c.clone(),
                    None => self.make_cell(key, 0, false, generation, pause),
                };
                &promoted
            }
        };
        let ceiling_rps = generation.limits(cell.profile()).max_rps;
        let now = self.clock.now();
        let mut learned = Learned::default();
        if let Some(rps) = hints.rps {
            let rps = clamp_learned_rps(rps, ceiling_rps);
            cell.set_rps(rps);
            learned.rps = Some(rps);
        }
        if let Some(n) = hints.max_concurrent {
            cell.set_max_concurrent(n);
            learned.max_concurrent = Some(n);
        }
        let pause = |d: Duration, source: PauseSource| {
            let until = now.saturating_add(d.as_nanos() as u64);
            (!d.is_zero() && cell.pause_until_by(until, source.into())).then_some((until, source))
        };
        match (status, hints.retry_after) {
            // A 429 asks to slow down even when it says "now" (`Retry-After: 0` or a date
            // in the past): it pauses for at least MIN_429_PAUSE.
            (429, Some(d)) => learned.paused = pause(d.max(MIN_429_PAUSE), PauseSource::RetryAfter),
            (503, Some(d)) => learned.paused = pause(d, PauseSource::RetryAfter),
            (429, None) => {
                let ns = cell.backoff(now);
                learned.paused = Some((now.saturating_add(ns), PauseSource::Backoff));
            }
            (200..=399, _) => cell.succeeded(),
            _ => {}
        }
        // The upstream's request budget, as it states it (for `/status`).
        if !hints.requests.is_empty() {
            let room = match hints.requests.limit {
                Some(_) => Some(cell.room()),
                None => cell.room_if_any(),
            };
            if let Some(r) = room {
                r.tokens.told_requests(hints.requests, now);
            }
        }
        // Token budgets: learned limits and what is left; a budget run out holds the
        // requests that need it (or, with no limit known for it, the host).
        let unbudgeted = match hints.tokens.iter().all(|t| t.is_empty()) {
            true => None,
            false => {
                let room = match hints.tokens.iter().any(|t| t.limit.is_some()) {
                    true => Some(cell.room()),
                    false => cell.room_if_any(),
                };
                match room {
                    Some(r) => {
                        let model = hints.model.as_deref();
                        let id = model.map_or(0, super::model_id);
                        let u = r
                            .tokens
                            .observe(&hints.tokens, status == 429, id, model, now);
                        let said = hints.tokens.map(|t| {
                            t.remaining
                                .map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
                        });
                        if let (Some(fleet), true) = (&self.fleet, r.tokens.active()) {
                            if said != [-1; 3] {
                                let change = super::TokenChange::Lower(said);
                                fleet.tokens_changed(cell, r.tokens.limits(id), change);
                            }
                        }
                        r.poke();
                        u
                    }
                    None => hints.tokens_unbudgeted_for(),
                }
            }
        };
        if let Some(d) = hints.exhausted_for.max(unbudgeted) {
            if let Some(p) = pause(d, PauseSource::RateLimitHeaders) {
                learned.paused = Some(p);
            }
        }
        if let Some(fleet) = &self.fleet {
            let pause = learned.paused.map(|(until, _)| {
                fleet.paused(cell, until);
                Duration::from_nanos(until.saturating_sub(now))
            });
            fleet.publish(cell, pause, learned.rps, learned.max_concurrent);
        }
        learned
    }

    /// Apply what another node of the fleet told: a pause or learned limits of a host tracked
    /// here (hosts not tracked read them from the store on first use).
    pub fn apply_event(&self, event: FleetEvent) {
        let Some(fleet) = &self.fleet else { return };
        match event {
            FleetEvent::Pause { host, length } => {
                if let Some(cell) = self.get(&host) {
                    let until = self.clock.now().saturating_add(length.as_nanos() as u64);
                    cell.pause_until_by(until, PauseOrigin::Fleet);
                    fleet.paused(&cell, until);
                }
            }
            FleetEvent::Limit {
                host,
                interval_us,
                max_concurrent,
            } => {
                if let Some(cell) = self.get(&host) {
                    if let Some(i) = interval_us {
                        cell.set_rps(1e6 / i as f64);
                    }
                    if let Some(n) = max_concurrent {
                        cell.set_max_concurrent(n);
                    }
                }
            }
        }
    }
}
