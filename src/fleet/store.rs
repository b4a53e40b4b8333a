//! The shared store as the fleet sees it: what it is asked (tokens, pauses, learned limits,
//! heartbeats, callers' places) and what it answers, and the events it carries between nodes.
//! Redis implements it (`redis.rs`).

use crate::admission::FleetEvent;
use async_trait::async_trait;
use std::time::Duration;

/// What is done to a host's token budgets in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOp {
    /// Take the amounts if every budget holds them now.
    Take,
    /// Take them as a reservation if every budget holds them within this time.
    Reserve(Duration),
    /// Take (negative: give back) the amounts.
    Adjust,
    /// Lower each budget to what the upstream says is left.
    Lower,
}

impl TokenOp {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenOp::Take => "take",
            TokenOp::Reserve(_) => "reserve",
            TokenOp::Adjust => "adjust",
            TokenOp::Lower => "lower",
        }
    }
}

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

/// What the store answered to a node renewing its lease of a share of a host's pace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share {
    /// The pace leased to this node (requests/s; 0: none free now).
    pub rate: f64,
    /// This node's fair share of the pace, given every live lease's demand.
    pub fair: f64,
    /// How long the lease lasts unless renewed (zero: given back).
    pub lasts: Duration,
    /// This node's place among the live leases, and how many there are (to space the
    /// nodes' first requests after a pause).
    pub rank: u32,
    pub leases: u32,
    /// The fleet's pause of this host, if one is running.
    pub paused_for: Duration,
    /// The interval the fleet learned (0: none; the node's own pace holds).
    pub interval_us: u64,
    /// A learned concurrency limit, if any.
    pub max_concurrent: Option<u32>,
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
    /// Take up to `want` tokens of `host`'s bucket (pace `interval_us`, `burst`), which holds
    /// what the leases of nodes other than `node` leave of the pace.
    async fn acquire(
        &self,
        host: &str,
        node: &str,
        want: u32,
        interval_us: u64,
        burst: u32,
    ) -> Result<Grant, StoreError>;
    /// Renew `node`'s lease of a share of `host`'s pace (`pace` requests/s) for `lasts`,
    /// saying its demand (requests/s; 0 gives the share back).
    async fn share(
        &self,
        host: &str,
        node: &str,
        pace: f64,
        demand: f64,
        lasts: Duration,
    ) -> Result<Share, StoreError>;
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
    /// `host`'s token budgets for the fleet: each bucket of `buckets` (its key under the
    /// host, its limits per minute: tokens, input, output; 0: none), changed by `op` with
    /// `amounts`. Returns 0 when done; for `Reserve`, the milliseconds until reserved tokens
    /// are there; for `Take` and `Reserve`, minus the milliseconds until they would be when
    /// not taken.
    async fn tokens(
        &self,
        host: &str,
        op: TokenOp,
        buckets: &[(String, [u64; 3])],
        amounts: [i64; 3],
    ) -> Result<i64, StoreError>;
    /// Say this node is alive for `ttl`; returns the number of live nodes. `tidy`: also drop
    /// the nodes that stopped saying so, and keep the set alive (every few beats).
    async fn heartbeat(&self, node: &str, ttl: Duration, tidy: bool) -> Result<u32, StoreError>;
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
