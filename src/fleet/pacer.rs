//! One host's local side of shared pacing.
//!
//! A node that uses a host's slots steadily holds a **lease**: a share of the host's pace,
//! max-min fair over the demand every node states (`lua/share.lua`), paced here by a local
//! bucket at that rate. Its waiting requests are woken by that bucket, never by asking the
//! store; one task per host renews the lease ahead of need (one round trip every one to five
//! seconds), states the node's demand, and gives the share back when the demand is gone. A
//! node left short of its fair share asks the others on the event channel to renew theirs, so
//! shares follow demand within a fraction of a second. A lease stands only while the node
//! follows the event channel (it would miss a pause otherwise) and the store answers.
//!
//! A node without a lease (a host used now and then) takes each slot from the fleet's bucket,
//! which holds what the leases leave of the pace: tokens leased in small numbers, the queue of
//! requests waiting for them (a fair semaphore: first come, first served), and the one task per
//! host that asks the store for tokens while requests wait. After a refusal that task sleeps
//! until the store said the next token is due (the retry-after cache), so the calls a node
//! makes per host are bounded by the host's pace, not by the offered load.

use super::{interval_us, lease, Fleet, Op};
use crate::admission::{Decision, HostCell, Rejection};
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
    /// A pause voided the slot this request waited for: it waits the pause out and asks again.
    Again,
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
    /// The lease: this node's share of the host's pace, paced here.
    lease: HostCell,
    /// The leased rate (f64 bits; 0: none free now, the demand is stated).
    lease_rate: AtomicU64,
    /// The host's pace the lease was computed from (f64 bits).
    lease_pace: AtomicU64,
    /// Fair share at the last renewal, and the demand stated then (f64 bits).
    lease_fair: AtomicU64,
    lease_demand: AtomicU64,
    /// Until when the lease stands (ns on the admission clock; 0: no lease).
    lease_until: AtomicU64,
    /// This node's place among the live leases, and their number.
    lease_rank: AtomicU32,
    lease_count: AtomicU32,
    /// Whether the renewing task runs.
    renewing: AtomicBool,
    /// Wakes the renewing task (another node asked for its share, or the pace changed).
    renew: Notify,
    /// When a nudge last made this node renew (ns).
    nudged_at: AtomicU64,
    /// Told when the lease changes (requests waiting for a share wake up).
    lease_changed: Notify,
    /// Slots this node used since `window_from`, and how many of them waited.
    used: AtomicU32,
    waited: AtomicU32,
    /// Requests that started waiting with no slot in sight since `window_from`.
    asked: AtomicU32,
    /// Requests waiting for the slot their lease reserved them.
    reserved: AtomicU32,
    /// Whether a request was refused, or waited with no slot in sight, since `window_from`.
    short: AtomicBool,
    /// When a slot was last used or wanted here (ns).
    last_used: AtomicU64,
    window_from: AtomicU64,
}

/// How a request got its slot, for the demand a node states.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Now,
    Waited,
    /// Refused: none came within its wait.
    Refused,
    /// Not a slot: a request starts waiting with no slot of this node's in sight.
    Wanted,
}

/// A lease in force, as a request sees it.
#[derive(Clone, Copy)]
struct Leased {
    rate: f64,
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
            lease: HostCell::new(0.0, 1, 0, 0, false),
            lease_rate: AtomicU64::new(0),
            lease_pace: AtomicU64::new(0),
            lease_fair: AtomicU64::new(0),
            lease_demand: AtomicU64::new(0),
            lease_until: AtomicU64::new(0),
            lease_rank: AtomicU32::new(0),
            lease_count: AtomicU32::new(0),
            renewing: AtomicBool::new(false),
            renew: Notify::new(),
            nudged_at: AtomicU64::new(0),
            lease_changed: Notify::new(),
            used: AtomicU32::new(0),
            waited: AtomicU32::new(0),
            asked: AtomicU32::new(0),
            reserved: AtomicU32::new(0),
            short: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            window_from: AtomicU64::new(0),
        }
    }

    /// A pause: leased tokens are void and the store is not asked before `until`. The lease
    /// stands; its first slot after the pause falls at this node's place among the leases.
    pub fn void(&self, until: u64) {
        self.drop_tokens(self.tokens.available_permits());
        self.next_due.fetch_max(until, Ordering::AcqRel);
        let rate = f64::from_bits(self.lease_rate.load(Ordering::Acquire));
        let offset = lease::resume_offset(
            self.lease_rank.load(Ordering::Relaxed),
            self.lease_count.load(Ordering::Relaxed),
            rate,
        );
        self.lease
            .pause_until(until.saturating_add(offset.as_nanos() as u64));
    }

    /// The lease, if one stands now: the node follows the fleet's events, the store answers
    /// (breaker closed) and the lease has not run out.
    fn leased(&self, fleet: &Fleet, now: u64) -> Option<Leased> {
        let until = self.lease_until.load(Ordering::Acquire);
        if until <= now || !fleet.following() || !fleet.closed() {
            return None;
        }
        Some(Leased {
            rate: f64::from_bits(self.lease_rate.load(Ordering::Acquire)),
        })
    }

    /// End the lease here (the store failed, the channel dropped, or it was given back):
    /// requests waiting for a share look again.
    pub fn end_lease(&self) {
        self.lease_until.store(0, Ordering::Release);
        self.lease_changed.notify_waiters();
    }

    /// The next slot of this node's lease and its interval (ns), when a lease with a share
    /// stands.
    pub fn own_pace(&self, fleet: &Fleet, now: u64) -> Option<(u64, u64)> {
        match self.leased(fleet, now) {
            Some(l) if l.rate > 0.0 => Some((self.lease.next_slot(now), self.lease.interval())),
            _ => None,
        }
    }

    /// Whether this node holds a lease of the host (standing or not).
    pub fn holds_lease(&self) -> bool {
        self.lease_until.load(Ordering::Acquire) > 0
    }

    /// Another node asked for its share: renew now (at most every `NUDGE_GAP`).
    pub fn nudge(&self, now: u64) {
        if self.lease_until.load(Ordering::Acquire) == 0 {
            return;
        }
        let last = self.nudged_at.load(Ordering::Acquire);
        if now.saturating_sub(last) >= lease::NUDGE_GAP.as_nanos() as u64
            && self
                .nudged_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.renew.notify_one();
        }
    }

    /// Count one slot used here (or refused); a node that uses the host steadily starts
    /// leasing a share of it.
    fn count(self: &Arc<Self>, fleet: &Arc<Fleet>, cell: &Arc<HostCell>, now: u64, how: Slot) {
        let from = self.window_from.load(Ordering::Acquire);
        if !self.renewing.load(Ordering::Acquire)
            && now.saturating_sub(from) > 1_000_000_000
            && self
                .window_from
                .compare_exchange(from, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // Without a lease the count is of the last second.
            self.used.store(0, Ordering::Release);
            self.waited.store(0, Ordering::Release);
            self.asked.store(0, Ordering::Release);
            self.short.store(false, Ordering::Release);
        }
        self.last_used.store(now, Ordering::Release);
        let seen = match how {
            Slot::Wanted => {
                // Waits with no slot of its own in sight: this node wants a (larger) share.
                self.short.store(true, Ordering::Release);
                self.asked.fetch_add(1, Ordering::AcqRel) + self.used.load(Ordering::Acquire) + 1
            }
            _ => {
                if how != Slot::Now {
                    self.waited.fetch_add(1, Ordering::AcqRel);
                }
                if how == Slot::Refused {
                    self.short.store(true, Ordering::Release);
                }
                self.used.fetch_add(1, Ordering::AcqRel) + self.asked.load(Ordering::Acquire) + 1
            }
        };
        if seen >= lease::LEASE_FROM_USES && !self.renewing.load(Ordering::Acquire) {
            self.start_renewing(fleet, cell);
        }
    }

    /// A slot now, if this node holds one (its lease's, or a token leased from the bucket).
    pub fn try_now(self: &Arc<Self>, fleet: &Arc<Fleet>, cell: &Arc<HostCell>, now: u64) -> bool {
        let taken = match self.leased(fleet, now) {
            Some(l) if l.rate > 0.0 => {
                self.follow_pace(cell);
                let got = self.lease.reserve(now, 0) == Decision::Now;
                if got {
                    fleet.metrics.tokens_leased.inc();
                }
                got
            }
            Some(_) => false,
            None => self.try_take(),
        };
        if taken {
            self.count(fleet, cell, now, Slot::Now);
        }
        taken
    }

    /// The host's pace changed here (a learned limit) since the lease was computed: a lower
    /// pace shrinks the lease at once; either way it is renewed (only the store grants more).
    fn follow_pace(&self, cell: &HostCell) {
        let pace = cell.rps();
        let was = f64::from_bits(self.lease_pace.load(Ordering::Acquire));
        if was > 0.0 && (pace - was).abs() > was * 1e-6 {
            let rate = f64::from_bits(self.lease_rate.load(Ordering::Acquire));
            let rate = if pace < was { rate * pace / was } else { rate };
            self.set_lease_rate(cell, rate, pace);
            self.renew.notify_one();
        }
    }

    /// Set the leased rate: the local bucket first, then the rate requests look at (a rate
    /// seen above 0 always finds its bucket paced).
    fn set_lease_rate(&self, cell: &HostCell, rate: f64, pace: f64) {
        if rate > 0.0 {
            self.lease.set_rps(rate);
            self.lease
                .set_burst(lease::lease_burst(cell.burst(), rate, pace));
        }
        self.lease_pace.store(pace.to_bits(), Ordering::Release);
        self.lease_rate.store(rate.to_bits(), Ordering::Release);
    }

    /// Apply what the store said with a lease (a pause missed on the event channel is
    /// learned here, and voids what was reserved before it).
    fn learn_share(&self, cell: &Arc<HostCell>, share: &super::Share, now: u64) {
        let said = (share.interval_us, share.max_concurrent, share.paused_for);
        if let Some(until) = self.learn(cell, said, now) {
            self.void(until);
        }
    }

    /// A slot of this node's lease, waiting until `deadline` at most. `None`: no lease
    /// stands (any more); the caller takes the bucket's way.
    async fn take_leased(
        self: &Arc<Self>,
        fleet: &Arc<Fleet>,
        cell: &Arc<HostCell>,
        deadline: u64,
    ) -> Option<Result<(), TakeError>> {
        loop {
            let changed = self.lease_changed.notified();
            let now = fleet.now();
            let leased = self.leased(fleet, now)?;
            if cell.paused_until() > now {
                // Paused while this request waited (for a token, or for its share): the
                // caller waits the pause out first.
                return Some(Err(TakeError::Again));
            }
            if leased.rate <= 0.0 {
                // The demand is stated and no share is free yet: wait for the next renewal.
                self.count(fleet, cell, now, Slot::Wanted);
                let until = self.lease_until.load(Ordering::Acquire).min(deadline);
                tokio::select! {
                    _ = changed => continue,
                    _ = tokio::time::sleep(Duration::from_nanos(until.saturating_sub(now))) => {}
                }
                if fleet.now() >= deadline {
                    self.count(fleet, cell, now, Slot::Refused);
                    let retry_after = lease::RENEW_SHORT;
                    return Some(Err(TakeError::Refused(Rejection::Pace { retry_after })));
                }
                continue;
            }
            self.follow_pace(cell);
            match self.lease.reserve(now, deadline.saturating_sub(now)) {
                Decision::Now => {
                    fleet.metrics.tokens_leased.inc();
                    self.count(fleet, cell, now, Slot::Now);
                    return Some(Ok(()));
                }
                Decision::At { at, epoch } => {
                    let reserved = Waiting::new(&self.reserved, 1);
                    tokio::time::sleep(Duration::from_nanos(at.saturating_sub(now))).await;
                    drop(reserved);
                    let now = fleet.now();
                    if self.lease.still_valid(epoch) && self.leased(fleet, now).is_some() {
                        fleet.metrics.tokens_leased.inc();
                        self.count(fleet, cell, now, Slot::Waited);
                        return Some(Ok(()));
                    }
                    // A pause came meanwhile, or the lease ended: the caller waits the pause
                    // out and asks again.
                    return Some(Err(TakeError::Again));
                }
                Decision::Refuse { retry_after } => {
                    self.count(fleet, cell, now, Slot::Refused);
                    let retry_after = Duration::from_nanos(retry_after);
                    return Some(Err(TakeError::Refused(Rejection::Pace { retry_after })));
                }
            }
        }
    }

    fn start_renewing(self: &Arc<Self>, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) {
        if !fleet.following()
            || self
                .renewing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let (host, fleet, cell) = (self.clone(), fleet.clone(), cell.clone());
        tokio::spawn(async move {
            host.renew_lease(&fleet, &cell).await;
            host.renewing.store(false, Ordering::Release);
        });
    }

    /// Renew the lease ahead of need while this node uses the host; give it back when it no
    /// longer does, or end it when the store fails.
    async fn renew_lease(&self, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) {
        let mut idle = false;
        loop {
            let now = fleet.now();
            let from = self.window_from.load(Ordering::Acquire);
            let window = Duration::from_nanos(now.saturating_sub(from));
            let pace = cell.rps();
            let held = self.lease_until.load(Ordering::Acquire) > 0;
            let before = f64::from_bits(self.lease_demand.load(Ordering::Acquire));
            let demand = if idle {
                // Nothing used for a while: the share goes back now.
                0.0
            } else if held && (cell.paused_until() > now || window < lease::WINDOW_MIN) {
                // Paused (nothing was used), or renewed again at once (asked by another node):
                // the demand is what it was; after a pause it is measured from its end.
                if cell.paused_until() > now {
                    self.window_from
                        .store(cell.paused_until(), Ordering::Release);
                }
                before
            } else {
                self.window_from.store(now, Ordering::Release);
                let used = self.used.swap(0, Ordering::AcqRel);
                let waited = self.waited.swap(0, Ordering::AcqRel);
                let short = self.short.swap(false, Ordering::AcqRel);
                let asked = self.asked.swap(0, Ordering::AcqRel);
                let idle = used == 0 && asked == 0 && self.waiting.load(Ordering::Acquire) == 0;
                if idle || pace <= 0.0 {
                    0.0
                } else if short {
                    // Requests were refused for want of slots: this node can use the pace.
                    pace
                } else {
                    lease::demand(used, waited, window, pace)
                }
            };
            self.lease_demand.store(demand.to_bits(), Ordering::Release);
            if demand == 0.0 && !held {
                return;
            }
            let Some(store) = fleet.store().cloned() else {
                self.end_lease();
                return;
            };
            if !fleet.allow(now) || !fleet.following() {
                self.end_lease();
                return;
            }
            let rate = f64::from_bits(self.lease_rate.load(Ordering::Acquire));
            let every = lease::renew_every(
                rate.max(demand.min(f64::from_bits(self.lease_fair.load(Ordering::Acquire)))),
            );
            let lasts = lease::lease_length(every);
            let node = fleet.node_id.as_str();
            // The lease ends here before it does in the store (which starts it during the call).
            let asked_at = fleet.now();
            let call = || store.share(&self.key, node, pace, demand, lasts);
            let share = match fleet.call(Op::Share, call).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(host = &*self.key, error = %e, "lease not renewed");
                    self.end_lease();
                    self.fail();
                    return;
                }
            };
            if demand == 0.0 {
                self.end_lease();
                return;
            }
            let now = fleet.now();
            self.learn_share(cell, &share, now);
            let pace = cell.rps();
            let first = self.lease_until.load(Ordering::Acquire) == 0
                || f64::from_bits(self.lease_rate.load(Ordering::Acquire)) <= 0.0;
            if first && share.rate > 0.0 {
                // A new lease starts without a burst, at this node's place among the leases
                // (the bucket may just have given this node a token); granted during a pause,
                // at that place after the pause.
                let paused = cell.paused_until();
                let (from, offset) = if paused > now {
                    let o = lease::resume_offset(share.rank, share.leases, share.rate);
                    (paused, o)
                } else {
                    (
                        now,
                        lease::start_offset(share.rank, share.leases, share.rate),
                    )
                };
                self.lease.set_rps(share.rate);
                self.lease
                    .set_burst(lease::lease_burst(cell.burst(), share.rate, pace));
                self.lease
                    .pause_until(from.saturating_add(offset.as_nanos() as u64));
            }
            self.set_lease_rate(cell, share.rate, pace);
            self.lease_fair
                .store(share.fair.to_bits(), Ordering::Release);
            self.lease_rank.store(share.rank, Ordering::Relaxed);
            self.lease_count.store(share.leases, Ordering::Relaxed);
            let until = asked_at.saturating_add(share.lasts.as_nanos() as u64);
            self.lease_until.store(until, Ordering::Release);
            self.lease_changed.notify_waiters();
            // Renewed well before it ends (its length was set before its rate was known).
            let next = if share.rate < share.fair * 0.8 {
                lease::RENEW_SHORT
            } else {
                lease::renew_every(share.rate).min(every)
            };
            idle = self.wait_to_renew(fleet, cell, next).await;
        }
    }

    /// Sleep until the next renewal is due (`next`), another node asks, or this node stops
    /// using the host: true when it has used no slot for `IDLE_AFTER`, nobody waits and the
    /// host is not paused (the share is then given back at once, not at the next renewal).
    async fn wait_to_renew(&self, fleet: &Fleet, cell: &HostCell, next: Duration) -> bool {
        let due = tokio::time::Instant::now() + next;
        loop {
            let step = due
                .saturating_duration_since(tokio::time::Instant::now())
                .min(lease::IDLE_AFTER / 4);
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = self.renew.notified() => return false,
            }
            if tokio::time::Instant::now() >= due {
                return false;
            }
            let now = fleet.now();
            let last = self.last_used.load(Ordering::Acquire);
            if now.saturating_sub(last) >= lease::IDLE_AFTER.as_nanos() as u64
                && self.waiting.load(Ordering::Acquire) == 0
                && self.reserved.load(Ordering::Acquire) == 0
                && cell.paused_until() <= now
            {
                return true;
            }
        }
    }

    /// The fleet part of `/status` for this host.
    pub fn status(&self, now: u64) -> serde_json::Value {
        let until = self.lease_until.load(Ordering::Acquire);
        serde_json::json!({
            "host": &*self.key,
            "lease_rate": if until > now { f64::from_bits(self.lease_rate.load(Ordering::Acquire)) } else { 0.0 },
            "fair_rate": f64::from_bits(self.lease_fair.load(Ordering::Acquire)),
            "leases": self.lease_count.load(Ordering::Relaxed),
        })
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
        loop {
            if let Some(done) = self.take_leased(fleet, cell, deadline).await {
                return done;
            }
            // A lease that comes into force while this request waits for a token serves it.
            let leased = self.lease_changed.notified();
            if self.try_take() {
                self.count(fleet, cell, fleet.now(), Slot::Now);
                return Ok(());
            }
            let now = fleet.now();
            let due = self.next_due.load(Ordering::Acquire);
            if due > deadline {
                // The next token is not due within the allowed wait: refused without asking.
                self.count(fleet, cell, now, Slot::Refused);
                return Err(TakeError::Refused(Rejection::Pace {
                    retry_after: Duration::from_nanos(due - now),
                }));
            }
            if !fleet.options.retry_after_cache {
                return self.take_alone(fleet, cell, deadline).await;
            }
            let waiting = Waiting::new(&self.waiting, demand.max(1));
            let mut failed = self.failures.subscribe();
            self.ensure_pump(fleet, cell);
            let wait = Duration::from_nanos(deadline.saturating_sub(now));
            let taken = tokio::select! {
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
                _ = leased => {
                    drop(waiting);
                    continue;
                }
                _ = tokio::time::sleep(wait) => {
                    let now = fleet.now();
                    let due = self.next_due.load(Ordering::Acquire).saturating_sub(now);
                    let retry_after = Duration::from_nanos(due.max(cell_interval_ns(cell)));
                    Err(TakeError::Refused(Rejection::Pace { retry_after }))
                }
            };
            match taken {
                Ok(()) => self.count(fleet, cell, fleet.now(), Slot::Waited),
                Err(TakeError::Refused(_)) => self.count(fleet, cell, fleet.now(), Slot::Refused),
                Err(_) => {}
            }
            return taken;
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
            let call = || {
                store.acquire(
                    &self.key,
                    &fleet.node_id,
                    want,
                    interval_us(cell),
                    cell.burst(),
                )
            };
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
    async fn pump(self: &Arc<Self>, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) {
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
    async fn step(self: &Arc<Self>, fleet: &Arc<Fleet>, cell: &Arc<HostCell>) -> Step {
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
        let call = || {
            store.acquire(
                &self.key,
                &fleet.node_id,
                want,
                interval_us(cell),
                cell.burst(),
            )
        };
        let grant = match fleet.call(Op::Acquire, call).await {
            Ok(g) => g,
            Err(_) => {
                return Step::TakeError;
            }
        };
        let now = fleet.now();
        self.learn(
            cell,
            (grant.interval_us, grant.max_concurrent, grant.paused_for),
            now,
        );
        if grant.granted > 0 {
            fleet.metrics.tokens_leased.inc_by(u64::from(grant.granted));
            self.leased_at.store(now, Ordering::Release);
            self.hand(grant.granted as usize);
        }
        if grant.granted == 0 {
            // Requests wait here and the bucket had nothing for them: demand for a lease.
            self.count(fleet, cell, now, Slot::Wanted);
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

    /// Apply what the store said about the host (with a bucket token or a lease): the
    /// fleet's interval (0: none learned), concurrency and pause left. Returns the end of a
    /// pause this started or extended.
    fn learn(
        &self,
        cell: &Arc<HostCell>,
        (interval, max_concurrent, paused_for): (u64, Option<u32>, Duration),
        now: u64,
    ) -> Option<u64> {
        if interval > 0 && interval != interval_us(cell) {
            cell.set_rps(1e6 / interval as f64);
        }
        if let Some(mc) = max_concurrent {
            if mc != cell.max_concurrent() {
                cell.set_max_concurrent(mc);
            }
        }
        if paused_for.is_zero() {
            return None;
        }
        let until = now.saturating_add(paused_for.as_nanos() as u64);
        if !cell.pause_until_by(until, crate::admission::PauseOrigin::Fleet) {
            return None;
        }
        tracing::debug!(host = &*self.key, "pause learned from the fleet");
        Some(until)
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
