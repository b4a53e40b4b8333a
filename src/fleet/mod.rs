//! BreakerState shared by a fleet of sluice processes (`[shared] backend = "redis"`): each host's pace
//! as one bucket for the whole fleet (taken in small leases, with a local retry-after cache so
//! Redis calls do not grow with the offered load), pauses and learned limits pushed to every
//! node, and a circuit breaker with a fallback (`on_error`) for when the store fails.
//!
//! `Fleet` is what admission consults; `Store` is the shared store (Redis in `redis.rs`);
//! `pacer.rs` holds one host's local side (leased tokens and the queue waiting for them).
//! The memory backend has no `Fleet` at all: admission stays local.

pub mod breaker;
pub mod lease;
pub mod metrics;
mod pacer;
pub mod redis;
pub mod service;

pub use pacer::FleetHost;

use crate::admission::{
    Clock, Decision, FleetEvent, FleetPlace, FleetSeam, HostCell, Paced, Placed, Rejection,
};
use crate::config::{FleetConfig, OnError};
use async_trait::async_trait;
use breaker::{Breaker, BreakerState};
use metrics::{FleetMetrics, Op};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// What the store answered to a request for tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken (0 when none was free).
    pub granted: u32,
    /// Time until the next token is due (after the last one granted).
    pub due: Duration,
    /// The interval in force in the fleet (a learned limit wins over the node's own).
    pub interval_us: u64,
    /// A learned concurrency limit, if any.
    pub max_concurrent: Option<u32>,
    /// The fleet's pause of this host, if one is running.
    pub paused_for: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("shared store call timed out")]
    Timeout,
    #[error("shared store: {0}")]
    Redis(String),
    #[error("shared store not connected yet")]
    NotReady,
}

impl StoreError {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Redis(_) | StoreError::NotReady => "error",
        }
    }
}

/// The store a fleet shares. Every method is one atomic round trip.
#[async_trait]
pub trait Store: Send + Sync {
    /// Take up to `want` tokens of `host`'s bucket (pace `interval_us`, `burst`).
    async fn acquire(
        &self,
        host: &str,
        want: u32,
        interval_us: u64,
        burst: u32,
    ) -> Result<Grant, StoreError>;
    /// Give back leased tokens that were not used.
    async fn give_back(&self, host: &str, tokens: u32, interval_us: u64) -> Result<(), StoreError>;
    /// Pause `host` for the fleet and tell every node.
    async fn pause(
        &self,
        host: &str,
        length: Duration,
        interval_us: u64,
        burst: u32,
    ) -> Result<(), StoreError>;
    /// Record limits learned from `host`'s responses and tell every node.
    async fn learn(
        &self,
        host: &str,
        interval_us: Option<u64>,
        max_concurrent: Option<u32>,
    ) -> Result<(), StoreError>;
    /// Take one of `caller`'s `cap` places among its requests in flight at `host`, for the
    /// fleet, as `holder` (held `ttl` at most); false when all are taken.
    async fn take_place(
        &self,
        host: &str,
        caller: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Give back the place `holder` took.
    async fn give_place(&self, host: &str, caller: &str, holder: &str) -> Result<(), StoreError>;
    /// Say this node is alive for `ttl`; returns the number of live nodes.
    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<u32, StoreError>;
    /// Say this node is leaving.
    async fn leave(&self, node: &str) -> Result<(), StoreError>;
    /// Drop the connection: the next call makes a new one.
    async fn reset(&self) {}
    /// Calls made so far (for benchmarks and tests).
    fn calls(&self) -> u64;
}

/// An event another node published: `pause <host> <us>` or
/// `limit <host> <interval us|-> <max_concurrent|->`.
pub fn parse_event(text: &str) -> Option<FleetEvent> {
    let mut parts = text.split(' ');
    let kind = parts.next()?;
    let host = parts.next()?.to_string();
    if host.is_empty() {
        return None;
    }
    let event = match kind {
        "pause" => FleetEvent::Pause {
            host,
            length: Duration::from_micros(parts.next()?.parse().ok()?),
        },
        "limit" => {
            let interval = parts.next()?;
            let mc = parts.next()?;
            FleetEvent::Limit {
                host,
                interval_us: (interval != "-")
                    .then(|| interval.parse().ok())
                    .flatten()
                    .filter(|i| *i > 0),
                max_concurrent: (mc != "-").then(|| mc.parse().ok()).flatten(),
            }
        }
        _ => return None,
    };
    parts.next().is_none().then_some(event)
}

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
}

/// Longest pause between two asks for a caller's fleet place while its cap is reached.
const PLACE_ASK_MAX: Duration = Duration::from_millis(200);

/// A caller's place at a host, taken from the fleet; given back (in the background) when
/// dropped. Armed from the moment it is asked for until the store says no: a request dropped
/// while its ask was under way gives back what the store may have given it.
struct HeldPlace {
    fleet: Weak<Fleet>,
    host: Box<str>,
    caller: Box<str>,
    holder: String,
    armed: bool,
}

impl Drop for HeldPlace {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (Some(fleet), Ok(runtime)) =
            (self.fleet.upgrade(), tokio::runtime::Handle::try_current())
        else {
            // Shutting down: the place ends with its ttl.
            return;
        };
        let Some(store) = fleet.store.get().cloned() else {
            return;
        };
        let (host, caller, holder) = (
            std::mem::take(&mut self.host),
            std::mem::take(&mut self.caller),
            std::mem::take(&mut self.holder),
        );
        runtime.spawn(async move {
            let call = || store.give_place(&host, &caller, &holder);
            if let Err(e) = fleet.call(Op::Place, call).await {
                tracing::debug!(host = &*host, error = %e, "a fleet place not given back (it ends with its ttl)");
            }
        });
    }
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
                    Err(pacer::TakeError::Store) => {}
                }
            }
            if let Some(done) = self.fallback(&host, cell, deadline).await {
                return done;
            }
        }
    }

    /// One of `caller`'s `cap` places at `cell`'s host, for the fleet: asked again, a little
    /// later each time, while the cap is reached, until `deadline`. `None` when the store is
    /// unavailable (the node's own count of the caller's places holds meanwhile).
    async fn place_shared(
        &self,
        cell: &HostCell,
        caller: &str,
        cap: u32,
        hold: Duration,
        deadline: u64,
    ) -> Result<Option<FleetPlace>, Rejection> {
        let (Some(host), Some(store)) = (self.host(cell), self.store.get().cloned()) else {
            return Ok(None);
        };
        let n = self.places.fetch_add(1, Ordering::Relaxed);
        let mut held = HeldPlace {
            fleet: self.me.clone(),
            host: host.key.clone(),
            caller: caller.into(),
            holder: format!("{}:{n}", self.node_id),
            armed: false,
        };
        let mut pause = Duration::from_millis(10);
        loop {
            if !self.allow(self.clock.now()) {
                return Ok(None);
            }
            held.armed = true;
            let holder = held.holder.clone();
            let call = || store.take_place(&host.key, caller, &holder, cap, hold);
            match self.call(Op::Place, call).await {
                Ok(true) => return Ok(Some(Box::new(held))),
                Ok(false) => held.armed = false,
                // Unknown whether the store gave one: `held` gives it back.
                Err(_) => return Ok(None),
            }
            let now = self.clock.now();
            if now.saturating_add(pause.as_nanos() as u64) > deadline {
                return Err(Rejection::Concurrency {
                    retry_after: Duration::from_secs(1),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PLACE_ASK_MAX);
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
                cell.rps() == 0.0 || host.try_take()
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

    /// A pause reached this node (learned here or pushed by another node): tokens leased
    /// before it are void, and the store is not asked again before it ends.
    fn paused(&self, cell: &HostCell, until: u64) {
        if let Some(host) = self.host(cell) {
            host.void(until);
        }
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
