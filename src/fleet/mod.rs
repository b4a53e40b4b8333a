//! State shared by a fleet of sluice processes (`[shared] backend = "redis"`): each host's pace
//! as one bucket for the whole fleet (taken in small leases, with a local retry-after cache so
//! Redis calls do not grow with the offered load), pauses and learned limits pushed to every
//! node, and a circuit breaker with a fallback (`on_error`) for when the store fails.
//!
//! `Fleet` is what admission consults; `Store` is the shared store (`store.rs`, Redis in
//! `redis.rs`); `pacer.rs` holds one host's local side (leased tokens and the queue waiting
//! for them); `place.rs` counts a caller's requests in flight at a host for the fleet.
//! The memory backend has no `Fleet` at all: admission stays local.

pub mod breaker;
pub mod lease;
pub mod metrics;
mod pacer;
mod place;
pub mod redis;
pub mod service;
mod store;
mod tokens;

pub use pacer::FleetHost;
pub use store::{parse_event, Grant, Share, Store, StoreError, TokenOp};

use crate::admission::{Clock, Decision, FleetSeam, HostCell, Paced, Placed, Rejection};
use crate::config::{FleetConfig, OnError};
use breaker::{Breaker, BreakerState};
use metrics::{FleetMetrics, Op};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// How shared pacing saves calls to the store (both on in service; the benchmark turns them
/// off to measure what each saves).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Take several tokens in one call when several requests wait.
    pub leases: bool,
    /// After a refusal, ask the store again for that host only when its next token is due,
    /// once for all waiting requests; without it every request asks for itself.
    pub retry_after_cache: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            leases: true,
            retry_after_cache: true,
        }
    }
}

/// One node's view of the fleet.
pub struct Fleet {
    pub on_error: OnError,
    pub config: FleetConfig,
    pub options: Options,
    pub node_id: String,
    pub metrics: FleetMetrics,
    timeout: Duration,
    clock: Arc<Clock>,
    store: OnceLock<Arc<dyn Store>>,
    breaker: Mutex<Breaker>,
    /// The breaker's state, readable without the lock.
    state: AtomicU8,
    /// Live nodes at the last heartbeat (at least 1).
    nodes: AtomicU32,
    /// When a half-open breaker's probe went out (ns on the admission clock; 0: none). Other
    /// calls wait for its verdict; a probe older than `timeout` is over, whatever became of it
    /// (a caller let through may not have made its call).
    probe_at: AtomicU64,
    /// Each tracked host's local side, by the address of its admission cell.
    hosts: papaya::HashMap<usize, Arc<FleetHost>, foldhash::fast::RandomState>,
    /// This fleet itself, for the background work a request starts (a token pump, sharing
    /// what was learned).
    me: Weak<Fleet>,
    /// Numbers this node's fleet places (holder ids are `node_id:n`).
    places: AtomicU64,
    /// Whether this node follows the fleet's event channel (leases stand only while it does).
    following: AtomicBool,
}

/// The fleet identity of an admission cell.
fn cell_id(cell: &HostCell) -> usize {
    cell as *const HostCell as usize
}

impl Fleet {
    pub fn new(
        config: &FleetConfig,
        clock: Arc<Clock>,
        options: Options,
    ) -> Result<Arc<Fleet>, prometheus::Error> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let metrics = FleetMetrics::new()?;
        Ok(Arc::new_cyclic(|me| Fleet {
            on_error: config.on_error,
            config: config.clone(),
            options,
            node_id: format!("{}-{:x}", std::process::id(), started & 0xffff_ffff_ffff),
            metrics,
            timeout: config.timeout.get(),
            clock,
            store: OnceLock::new(),
            breaker: Mutex::new(Breaker::new(&config.breaker)),
            state: AtomicU8::new(BreakerState::Closed.as_u8()),
            nodes: AtomicU32::new(1),
            probe_at: AtomicU64::new(0),
            hosts: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .build(),
            me: me.clone(),
            places: AtomicU64::new(0),
            following: AtomicBool::new(false),
        }))
    }

    /// Connect the fleet to its store (once; later calls change nothing).
    pub fn set_store(&self, store: Arc<dyn Store>) {
        if self.store.set(store).is_err() {
            tracing::warn!("the shared store was already set");
        }
    }

    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.store.get()
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Whether this node follows the fleet's event channel.
    pub fn following(&self) -> bool {
        self.following.load(Ordering::Acquire)
    }

    /// The node follows the event channel from now on, or no longer: without it a pause
    /// from another node would not reach this one, so every lease ends here.
    pub fn set_following(&self, on: bool) {
        self.following.store(on, Ordering::Release);
        if !on {
            let held = self.leased_hosts();
            for host in &held {
                host.end_lease();
            }
            // The shares go back (if the store still answers) rather than blocking the
            // other nodes until they run out.
            if let (Some(fleet), Ok(rt)) =
                (self.me.upgrade(), tokio::runtime::Handle::try_current())
            {
                if !held.is_empty() {
                    rt.spawn(async move { fleet.give_back_shares(&held).await });
                }
            }
        }
    }

    /// Give back this node's leases of `hosts` (it leaves, or stopped following the fleet).
    pub async fn give_back_shares(&self, hosts: &[Arc<FleetHost>]) {
        let Some(store) = self.store.get().cloned() else {
            return;
        };
        for host in hosts {
            if !self.allow(self.clock.now()) {
                return;
            }
            let call = || store.share(&host.key, &self.node_id, 0.0, 0.0, Duration::ZERO);
            if let Err(e) = self.call(Op::Share, call).await {
                tracing::debug!(host = &*host.key, error = %e, "lease not given back");
            }
        }
    }

    /// Every host this node holds a lease of.
    pub fn leased_hosts(&self) -> Vec<Arc<FleetHost>> {
        self.hosts
            .pin()
            .values()
            .filter(|h| h.holds_lease())
            .cloned()
            .collect()
    }

    /// Another node is short of its share of `host`: this node renews its lease now.
    pub fn share_asked(&self, host: &str) {
        let now = self.clock.now();
        for h in self.hosts.pin().values() {
            if &*h.key == host {
                h.nudge(now);
            }
        }
    }

    /// Whether the breaker is closed (calls to the store flow).
    pub fn closed(&self) -> bool {
        self.breaker_state() == BreakerState::Closed
    }

    pub fn breaker_state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Live nodes at the last heartbeat (the last known count while the store is away).
    pub fn live_nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    pub fn set_live_nodes(&self, n: u32) {
        self.nodes.store(n.max(1), Ordering::Relaxed);
        self.metrics.live_nodes.set(i64::from(n.max(1)));
    }

    fn host(&self, cell: &HostCell) -> Option<Arc<FleetHost>> {
        self.hosts.pin().get(&cell_id(cell)).cloned()
    }

    /// May a call go to the store now? Always while closed; while half-open, one call at a
    /// time (the probe); an open breaker half-opens once its recovery timeout is up.
    pub fn allow(&self, now: u64) -> bool {
        if self.store.get().is_none() {
            return false;
        }
        match self.breaker_state() {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => self.take_probe(now),
            BreakerState::Open => {
                let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
                let allowed = b.allow(now);
                let after = b.state();
                drop(b);
                self.note_state(BreakerState::Open, after);
                allowed && self.take_probe(now)
            }
        }
    }

    /// The half-open probe's turn, if no other probe is out.
    fn take_probe(&self, now: u64) -> bool {
        let out = self.probe_at.load(Ordering::Acquire);
        let over = out == 0 || now.saturating_sub(out) > self.timeout.as_nanos() as u64;
        over && self
            .probe_at
            .compare_exchange(out, now.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn record(&self, ok: bool) {
        let now = self.clock.now();
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let before = b.state();
        if ok {
            b.success(now);
        } else {
            b.failure(now);
        }
        let after = b.state();
        drop(b);
        self.note_state(before, after);
        if before != BreakerState::Closed {
            self.probe_at.store(0, Ordering::Release);
        }
    }

    fn note_state(&self, before: BreakerState, after: BreakerState) {
        self.state.store(after.as_u8(), Ordering::Release);
        if before != after {
            self.metrics.set_state(after);
            self.metrics
                .breaker_transitions
                .with_label_values(&[after.as_str()])
                .inc();
            match after {
                BreakerState::Open => tracing::warn!(
                    on_error = self.on_error.as_str(),
                    "shared store unavailable: breaker open"
                ),
                BreakerState::HalfOpen => {
                    tracing::info!("shared store: breaker half-open, trying again")
                }
                BreakerState::Closed => {
                    tracing::info!("shared store back: breaker closed");
                    // Requests holding local slots go back to the shared path.
                    let now = self.clock.now();
                    for host in self.hosts.pin().values() {
                        host.fallback.pause_until(now);
                    }
                }
            }
        }
    }

    /// Run one call to the store, feeding the breaker and metrics: `make` makes the call,
    /// which may be made again. While the breaker is closed, a call whose error comes back
    /// before `timeout` is tried again on a new connection (`[shared] retry`) within what is
    /// left of `timeout`; only then does it count against the breaker. A half-open probe
    /// always goes on a new connection, so it succeeds as soon as Redis answers.
    pub async fn call<T, F, Fut>(&self, op: Op, mut make: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let retry = &self.config.retry;
        let mut delay = retry.delay.get();
        let mut retries_left = match self.breaker_state() {
            BreakerState::Closed => retry.max_retries,
            _ => 0,
        };
        if self.breaker_state() != BreakerState::Closed {
            if let Some(store) = self.store.get() {
                store.reset().await;
            }
        }
        let result = loop {
            self.metrics.calls.with_label_values(&[op.as_str()]).inc();
            let result = match tokio::time::timeout_at(deadline, make()).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout),
            };
            let Err(e) = &result else { break result };
            self.metrics
                .errors
                .with_label_values(&[op.as_str(), e.kind()])
                .inc();
            let retry_at = tokio::time::Instant::now() + delay;
            if retries_left == 0 || matches!(e, StoreError::Timeout) || retry_at >= deadline {
                break result;
            }
            tracing::debug!(op = op.as_str(), error = %e, "shared store call failed; trying again");
            self.metrics.retries.with_label_values(&[op.as_str()]).inc();
            retries_left -= 1;
            if let Some(store) = self.store.get() {
                store.reset().await;
            }
            tokio::time::sleep_until(retry_at).await;
            delay = delay.mul_f64(retry.backoff);
        };
        match &result {
            Ok(_) => self.record(true),
            Err(e) => {
                tracing::debug!(op = op.as_str(), error = %e, "shared store call failed");
                self.record(false);
            }
        }
        result
    }

    /// Pace one request to `cell`'s host for the fleet, waiting until `deadline` (ns on the
    /// admission clock) at most. Pauses known here are waited out first; then a fleet token
    /// is taken, or, when the store fails, the `on_error` policy decides.
    async fn pace_shared(
        self: &Arc<Self>,
        cell: &Arc<HostCell>,
        deadline: u64,
        demand: u32,
    ) -> Result<(), Rejection> {
        let Some(host) = self.host(cell) else {
            return crate::admission::pace_cell(cell, &self.clock, deadline)
                .await
                .map(|_| ());
        };
        loop {
            let now = self.clock.now();
            cell.touch(now);
            let paused = cell.paused_until();
            if paused > now {
                if paused > deadline {
                    return Err(Rejection::Paused {
                        retry_after: Duration::from_nanos(paused - now),
                    });
                }
                tokio::time::sleep(Duration::from_nanos(paused - now)).await;
            }
            if cell.rps() == 0.0 {
                return Ok(());
            }
            if self.allow(self.clock.now()) {
                match host.take(self, cell, deadline, demand).await {
                    Ok(()) => return Ok(()),
                    Err(pacer::TakeError::Refused(r)) => return Err(r),
                    Err(pacer::TakeError::Again) => continue,
                    Err(pacer::TakeError::Store) => {}
                }
            }
            if let Some(done) = self.fallback(&host, cell, deadline).await {
                return done;
            }
        }
    }

    /// The store is unavailable: pace by the `on_error` policy. `None` when the store came
    /// back while the request waited for its local slot: it starts over on the shared path
    /// (slots reserved locally before are void, or they would add to the fleet's pace).
    async fn fallback(
        &self,
        host: &FleetHost,
        cell: &HostCell,
        deadline: u64,
    ) -> Option<Result<(), Rejection>> {
        self.metrics
            .fallback
            .with_label_values(&[self.on_error.as_str()])
            .inc();
        match self.on_error {
            OnError::Allow => Some(Ok(())),
            OnError::Throttle => Some(Err(Rejection::Unavailable {
                retry_after: self.config.breaker.recovery_timeout.get(),
            })),
            OnError::Local => {
                let (rps, burst) = lease::local_share(cell.rps(), cell.burst(), self.live_nodes());
                let own = &host.fallback;
                if own.rps() != rps {
                    own.set_rps(rps);
                }
                if own.burst() != burst {
                    own.set_burst(burst);
                }
                let now = self.clock.now();
                match own.reserve(now, deadline.saturating_sub(now)) {
                    Decision::Now => Some(Ok(())),
                    Decision::At { at, epoch } => {
                        tokio::time::sleep(Duration::from_nanos(at.saturating_sub(now))).await;
                        own.still_valid(epoch).then_some(Ok(()))
                    }
                    Decision::Refuse { retry_after } => Some(Err(Rejection::Pace {
                        retry_after: Duration::from_nanos(retry_after),
                    })),
                }
            }
        }
    }

    /// The fleet part of `/status`.
    pub fn status(&self) -> serde_json::Value {
        let calls = self.store.get().map_or(0, |s| s.calls());
        let errors: u64 = Op::ALL
            .iter()
            .flat_map(|op| {
                ["timeout", "error"].map(|k| {
                    self.metrics
                        .errors
                        .with_label_values(&[op.as_str(), k])
                        .get()
                })
            })
            .sum();
        serde_json::json!({
            "backend": "redis",
            "node": self.node_id,
            "connected": self.store.get().is_some(),
            "breaker": self.breaker_state().as_str(),
            "on_error": self.on_error.as_str(),
            "live_nodes": self.live_nodes(),
            "redis_calls": calls,
            "redis_errors": errors,
            "hosts": self.hosts.len(),
            "leases": self
                .hosts
                .pin()
                .values()
                .map(|h| h.status(self.clock.now()))
                .filter(|v| v["lease_rate"].as_f64().unwrap_or(0.0) > 0.0)
                .collect::<Vec<_>>(),
        })
    }
}

/// Admission's seam, as this fleet fills it.
impl FleetSeam for Fleet {
    /// Track `cell` (the cell of `key`, a `host:port`) in the fleet.
    fn register(&self, cell: &Arc<HostCell>, key: &str) {
        let hosts = self.hosts.pin();
        if hosts.get(&cell_id(cell)).is_none() {
            hosts.get_or_insert_with(cell_id(cell), || Arc::new(FleetHost::new(key)));
        }
    }

    /// Stop tracking a cell (it was evicted).
    fn forget(&self, cell: &HostCell) {
        self.hosts.pin().remove(&cell_id(cell));
    }

    fn try_now(&self, cell: &Arc<HostCell>) -> bool {
        let now = self.clock.now();
        if cell.paused_until() > now {
            return false;
        }
        match self.host(cell) {
            Some(host) => {
                cell.touch(now);
                cell.rps() == 0.0
                    || match self.me.upgrade() {
                        Some(fleet) => host.try_now(&fleet, cell, now),
                        None => host.try_take(),
                    }
            }
            None => cell.reserve(now, 0) == Decision::Now,
        }
    }

    fn pace<'a>(&'a self, cell: &'a Arc<HostCell>, deadline: u64, demand: u32) -> Paced<'a> {
        Box::pin(async move {
            match self.me.upgrade() {
                Some(fleet) => fleet.pace_shared(cell, deadline, demand).await,
                // The fleet is being dropped (shutdown): this node's own pace.
                None => crate::admission::pace_cell(cell, &self.clock, deadline)
                    .await
                    .map(|_| ()),
            }
        })
    }

    fn place<'a>(
        &'a self,
        cell: &'a Arc<HostCell>,
        caller: &'a str,
        cap: u32,
        hold: Duration,
        deadline: u64,
    ) -> Placed<'a> {
        Box::pin(self.place_shared(cell, caller, cap, hold, deadline))
    }

    fn take_tokens<'a>(
        &'a self,
        cell: &'a Arc<HostCell>,
        limits: crate::admission::TokenLimits,
        cost: crate::admission::TokenCost,
        reserve_within: Option<Duration>,
    ) -> crate::admission::TokensTaken<'a> {
        Box::pin(self.take_tokens_shared(cell, limits, cost, reserve_within))
    }

    fn tokens_changed(
        &self,
        cell: &HostCell,
        limits: crate::admission::TokenLimits,
        change: crate::admission::TokenChange,
    ) {
        self.tokens_changed_shared(cell, limits, change);
    }

    /// A pause reached this node (learned here or pushed by another node): tokens leased
    /// before it are void, and the store is not asked again before it ends.
    fn paused(&self, cell: &HostCell, until: u64) {
        if let Some(host) = self.host(cell) {
            host.void(until);
        }
    }

    fn own_pace(&self, cell: &HostCell, now: u64) -> Option<(u64, u64)> {
        let host = self.host(cell)?;
        let (next, interval) = host.own_pace(self, now)?;
        Some((next.max(cell.paused_until()).max(now), interval))
    }

    /// Tell the fleet what this node learned about `cell`'s host (in the background: no
    /// request waits for it).
    fn publish(
        &self,
        cell: &HostCell,
        pause: Option<Duration>,
        rps: Option<f64>,
        max_concurrent: Option<u32>,
    ) {
        let Some(host) = self.host(cell) else { return };
        let Some(store) = self.store.get().cloned() else {
            return;
        };
        if !self.allow(self.clock.now()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(fleet) = self.me.upgrade() else {
            return;
        };
        let interval_us = interval_us(cell);
        let burst = cell.burst();
        runtime.spawn(async move {
            if let Some(length) = pause {
                let call = || store.pause(&host.key, length, interval_us, burst);
                if let Err(e) = fleet.call(Op::Pause, call).await {
                    tracing::warn!(host = &*host.key, error = %e, "could not share a pause");
                }
            }
            if rps.is_some() || max_concurrent.is_some() {
                let learned = rps.map(|r| (1e6 / r).round().max(1.0) as u64);
                let call = || store.learn(&host.key, learned, max_concurrent);
                if let Err(e) = fleet.call(Op::Learn, call).await {
                    tracing::warn!(host = &*host.key, error = %e, "could not share a learned limit");
                }
            }
        });
    }
}

/// The cell's pace in microseconds per request.
pub fn interval_us(cell: &HostCell) -> u64 {
    let rps = cell.rps();
    if rps > 0.0 {
        (1e6 / rps).round().max(1.0) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::FleetEvent;

    #[test]
    fn events_parse_and_reject_garbage() {
        assert_eq!(
            parse_event("pause api.test:443 2000000"),
            Some(FleetEvent::Pause {
                host: "api.test:443".into(),
                length: Duration::from_secs(2)
            })
        );
        assert_eq!(
            parse_event("limit [::1]:8080 100000 -"),
            Some(FleetEvent::Limit {
                host: "[::1]:8080".into(),
                interval_us: Some(100_000),
                max_concurrent: None
            })
        );
        for bad in [
            "",
            "pause",
            "pause h",
            "pause h x",
            "pause h 1 2",
            "resume h 1",
            "limit h 1",
        ] {
            assert_eq!(parse_event(bad), None, "{bad:?}");
        }
    }
}
