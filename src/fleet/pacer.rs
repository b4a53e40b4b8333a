//! One host's local side of shared pacing: tokens leased from the fleet's bucket, the queue of
//! requests waiting for them (a fair semaphore: first come, first served), and the one task
//! per host that asks the store for tokens while requests wait. After a refusal that task
//! sleeps until the store said the next token is due (the retry-after cache), so the calls a
//! node makes per host are bounded by the host's pace, not by the offered load.

use super::{interval_us, lease, Fleet, Op};
use crate::admission::{HostCell, Rejection};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};

/// Leased tokens nobody took within this long are given back.
const LEASE_TTL_NS: u64 = 100_000_000;

/// What the asking task does next.
enum Step {
    Again,
    /// Nobody waits for a token.
    Idle,
    /// The store failed or is not to be asked (breaker open).
    TakeError,
}

/// Why a request got no fleet token.
pub enum TakeError {
    /// Refused by the pace (no token within the allowed wait).
    Refused(Rejection),
    /// The store failed while this request waited: the caller applies `on_error`.
    Store,
}

pub struct FleetHost {
    /// The host's key in the store (`host:port`).
    pub key: Box<str>,
    /// Tokens leased and not yet taken.
    tokens: Semaphore,
    /// Tokens put in `tokens` and not yet taken, counted before they are added and after
    /// they are taken: unlike the semaphore's own count, it includes tokens already handed to
    /// a waiting request that has not run yet, so the asking task never asks twice for one.
    handed: AtomicUsize,
    /// Requests waiting for a token.
    waiting: AtomicU32,
    /// Whether the asking task runs.
    pumping: AtomicBool,
    /// Do not ask the store before this time (ns on the admission clock).
    next_due: AtomicU64,
    /// When tokens were last leased.
    leased_at: AtomicU64,
    /// Bumped whenever a call to the store fails: waiting requests stop waiting.
    failures: watch::Sender<u64>,
    /// Wakes the asking task when a request starts waiting.
    wake: Notify,
    /// This node's share of the host's pace while the store is away.
    pub fallback: HostCell,
}

/// Counts the requests a take waits for while it waits.
struct Waiting<'a>(&'a AtomicU32, u32);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU32, demand: u32) -> Waiting<'a> {
        n.fetch_add(demand, Ordering::AcqRel);
        Waiting(n, demand)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

impl FleetHost {
    pub fn new(key: &str) -> FleetHost {
        FleetHost {
            key: key.into(),
            tokens: Semaphore::new(0),
            handed: AtomicUsize::new(0),
            waiting: AtomicU32::new(0),
            pumping: AtomicBool::new(false),
            next_due: AtomicU64::new(0),
            leased_at: AtomicU64::new(0),
            failures: watch::Sender::new(0),
            wake: Notify::new(),
            fallback: HostCell::new(0.0, 1, 0, 0, false),
        }
    }

    /// A pause: leased tokens are void and the store is not asked before `until`.
    pub fn void(&self, until: u64) {
        self.drop_tokens(self.tokens.available_permits());
        self.next_due.fetch_max(until, Ordering::AcqRel);
    }

    /// Put `n` leased tokens at the disposal of waiting requests.
    fn hand(&self, n: usize) {
        self.handed.fetch_add(n, Ordering::AcqRel);
        self.tokens.add_permits(n);
    }

    /// Take one token; true if there was one.
    pub fn try_take(&self) -> bool {
        match self.tokens.try_acquire() {
            Ok(p) => {
                p.forget();
                self.handed.fetch_sub(1, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// Drop up to `n` tokens nobody took; returns how many were dropped.
    fn drop_tokens(&self, n: usize) -> usize {
        let n = if n > 0 {
            self.tokens.forget_permits(n)
        } else {
            0
        };
        self.handed.fetch_sub(n, Ordering::AcqRel);
        n
    }

    fn fail(&self) {
        self.failures.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Take one fleet token for a request, waiting in line until `deadline` at most.
    /// `demand` requests wait behind this take on this node (the asking task leases tokens
    /// for all of them).
    pub async fn take(
        self: &Arc<Self>,
        fleet: &Arc<Fleet>,
        cell: &Arc<HostCell>,
        deadline: u64,
        demand: u32,
    ) -> Result<(), TakeError> {
        if self.try_take() {
            return Ok(());
        }
        let now = fleet.now();
        let due = self.next_due.load(Ordering::Acquire);
        if due > deadline {
            // The next token is not due within the allowed wait: refused without asking.
            return Err(TakeError::Refused(Rejection::Pace {
                retry_after: Duration::from_nanos(due - now),
            }));
        }
        if !fleet.options.retry_after_cache {
            return self.take_alone(fleet, cell, deadline).await;
        }
        let _waiting = Waiting::new(&self.waiting, demand.max(1));
        let mut failed = self.failures.subscribe();
        self.ensure_pump(fleet, cell);
        let wait = Duration::from_nanos(deadline.saturating_sub(now));
        tokio::select! {
            biased;
            permit = self.tokens.acquire() => match permit {
                Ok(p) => {
                    p.forget();
                    self.handed.fetch_sub(1, Ordering::AcqRel);
                    Ok(())
                }
                Err(_) => Err(TakeError::Store),
            },
            _ = failed.changed() => Err(TakeError::Store),
            _ = tokio::time::sleep(wait) => {
                let now = fleet.now();
                let due = self.next_due.load(Ordering::Acquire).saturating_sub(now);
                let retry_after = Duration::from_nanos(due.max(cell_interval_ns(cell)));
                Err(TakeError::Refused(Rejection::Pace { retry_after }))
            }
        }
    }

    /// Without the retry-after cache: this request asks the store itself, and again after each
    /// refusal when the store says the next token is due (what the cache saves; measured by
    /// the benchmark).
    async fn take_alone(
        &self,
        fleet: &Arc<Fleet>,
        cell: &Arc<HostCell>,
        deadline: u64,
    ) -> Result<(), TakeError> {
        let Some(store) = fleet.store().cloned() else {
            return Err(TakeError::Store);
        };
        let _waiting = Waiting::new(&self.waiting, 1);
        loop {
            if self.try_take() {
                return Ok(());
            }
            let unmet = self.waiting.load(Ordering::Acquire) as usize;
            let want = lease::lease_size(
                unmet,
                cell.rps(),
                cell.burst(),
                fleet.live_nodes(),
                fleet.options.leases,
            );
            let call = || store.acquire(&self.key, want, interval_us(cell), cell.burst());
            let grant = fleet
                .call(Op::Acquire, call)
                .await
                .map_err(|_| TakeError::Store)?;
            fleet.metrics.tokens_leased.inc_by(u64::from(grant.granted));
            if grant.granted > 0 {
                self.hand(grant.granted as usize - 1);
                return Ok(());
            }
            let now = fleet.now();
            let at = now.saturating_add(grant.due.as_nanos() as u64);
            if at > deadline {
                return Err(TakeError::Refused(Rejection::Pace {
                    retry_after: grant.due,
                }));
            }
            tokio::time::sleep(grant.due).await;
        }
    }

    fn ensure_pump(self: &Arc<Self>, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) {
        if self
            .pumping
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.wake.notify_one();
            return;
        }
        let (host, fleet, cell) = (self.clone(), fleet.clone(), cell.clone());
        tokio::spawn(async move { host.pump(&fleet, &cell).await });
    }

    /// Ask the store for tokens while requests wait; give back what nobody took in time.
    async fn pump(&self, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) {
        loop {
            match self.step(fleet, cell).await {
                Step::Again => continue,
                Step::TakeError => {
                    // Stop first, then tell the waiting requests: one that starts waiting
                    // after this starts a new task, which asks (or fails) for it.
                    self.pumping.store(false, Ordering::Release);
                    self.fail();
                    return;
                }
                Step::Idle => {}
            }
            self.pumping.store(false, Ordering::Release);
            // A request may have started waiting after the last look.
            let unmet =
                self.waiting.load(Ordering::Acquire) as usize > self.handed.load(Ordering::Acquire);
            if unmet
                && self
                    .pumping
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                continue;
            }
            return;
        }
    }

    /// One step of the asking task.
    async fn step(&self, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) -> Step {
        let now = fleet.now();
        let waiting = self.waiting.load(Ordering::Acquire) as usize;
        let available = self.handed.load(Ordering::Acquire);
        if waiting <= available {
            if available == 0 {
                return Step::Idle;
            }
            let expires = self
                .leased_at
                .load(Ordering::Acquire)
                .saturating_add(LEASE_TTL_NS);
            if now < expires {
                self.sleep_or_wake(expires - now).await;
                return Step::Again;
            }
            self.give_back(fleet, cell, available).await;
            return Step::Idle;
        }
        let due = self.next_due.load(Ordering::Acquire);
        if due > now {
            tokio::time::sleep(Duration::from_nanos(due - now)).await;
            return Step::Again;
        }
        if !fleet.allow(now) {
            return Step::TakeError;
        }
        let Some(store) = fleet.store().cloned() else {
            return Step::TakeError;
        };
        let rps = cell.rps();
        if rps == 0.0 {
            // Pacing was turned off while requests waited: let them all go.
            self.hand(waiting - available);
            return Step::Again;
        }
        let want = lease::lease_size(
            waiting - available,
            rps,
            cell.burst(),
            fleet.live_nodes(),
            fleet.options.leases,
        );
        let call = || store.acquire(&self.key, want, interval_us(cell), cell.burst());
        let grant = match fleet.call(Op::Acquire, call).await {
            Ok(g) => g,
            Err(_) => {
                return Step::TakeError;
            }
        };
        let now = fleet.now();
        self.learn(cell, &grant, now);
        if grant.granted > 0 {
            fleet.metrics.tokens_leased.inc_by(u64::from(grant.granted));
            self.leased_at.store(now, Ordering::Release);
            self.hand(grant.granted as usize);
        }
        if grant.granted < want {
            // The retry-after cache: nobody here asks again before the next token is due.
            self.next_due.fetch_max(
                now.saturating_add(grant.due.as_nanos() as u64),
                Ordering::AcqRel,
            );
        }
        Step::Again
    }

    /// Apply what the store said about the host: the fleet's pace, concurrency and pause.
    fn learn(&self, cell: &Arc<HostCell>, grant: &super::Grant, now: u64) {
        if grant.interval_us > 0 && grant.interval_us != interval_us(cell) {
            cell.set_rps(1e6 / grant.interval_us as f64);
        }
        if let Some(mc) = grant.max_concurrent {
            if mc != cell.max_concurrent() {
                cell.set_max_concurrent(mc);
            }
        }
        if !grant.paused_for.is_zero() {
            let until = now.saturating_add(grant.paused_for.as_nanos() as u64);
            if cell.pause_until_by(until, crate::admission::PauseOrigin::Fleet) {
                tracing::debug!(host = &*self.key, "pause learned from the fleet");
            }
        }
    }

    async fn give_back(&self, fleet: &Arc<Fleet>, cell: &Arc<HostCell>, available: usize) {
        let n = self.drop_tokens(available);
        if n == 0 {
            return;
        }
        fleet.metrics.tokens_given_back.inc_by(n as u64);
        let Some(store) = fleet.store().cloned() else {
            return;
        };
        let tokens = u32::try_from(n).unwrap_or(u32::MAX);
        let call = || store.give_back(&self.key, tokens, interval_us(cell));
        if let Err(e) = fleet.call(Op::GiveBack, call).await {
            tracing::debug!(host = &*self.key, error = %e, "leased tokens not given back");
        }
    }

    async fn sleep_or_wake(&self, ns: u64) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_nanos(ns)) => {}
            _ = self.wake.notified() => {}
        }
    }
}

fn cell_interval_ns(cell: &HostCell) -> u64 {
    interval_us(cell).saturating_mul(1000)
}
