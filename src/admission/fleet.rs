//! The seam between admission and a fleet of sluice nodes sharing pace, pauses and learned
//! limits (`[shared] backend = "redis"`). Admission declares what it needs here; the fleet
//! module implements it, so admission never names the store, its breaker or its wire format.

use super::tokens::{Cost, Limits};
use super::{HostCell, Rejection};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A request being paced for the fleet.
pub type Paced<'a> = Pin<Box<dyn Future<Output = Result<(), Rejection>> + Send + 'a>>;

/// A caller's place among its requests in flight at a host, counted by the fleet; given back
/// when dropped.
pub type FleetPlace = Box<dyn std::any::Any + Send + Sync>;

/// A request waiting for a fleet place: `None` when the fleet does not count places now
/// (its store unavailable: the node's own count holds).
pub type Placed<'a> =
    Pin<Box<dyn Future<Output = Result<Option<FleetPlace>, Rejection>> + Send + 'a>>;

/// A request's tokens being taken from the fleet's count; `None` when the fleet does not
/// count tokens now (its store unavailable: the node's own count holds).
pub type TokensTaken<'a> = Pin<Box<dyn Future<Output = Option<FleetTokens>> + Send + 'a>>;

/// What the fleet's count said to a request's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetTokens {
    /// Taken.
    Taken,
    /// Reserved: they are the request's once this time has passed (requests asking later
    /// wait behind them, on any node).
    Reserved(Duration),
    /// Not taken: about this long until they would be there.
    NotWithin(Duration),
}

/// A change to a host's token budgets as the fleet counts them (budget order: tokens, input,
/// output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenChange {
    /// Take these (negative: give them back).
    Adjust([i64; 3]),
    /// The upstream says this much is left (-1: nothing said).
    Lower([i64; 3]),
}

impl TokenChange {
    /// Take `used` instead of `charged`.
    pub fn settle(charged: Cost, used: Cost) -> TokenChange {
        let d = |b| {
            i64::try_from(used.of(b)).unwrap_or(i64::MAX)
                - i64::try_from(charged.of(b)).unwrap_or(i64::MAX)
        };
        TokenChange::Adjust(super::tokens::Budget::ALL.map(d))
    }
}

/// What admission asks of the fleet. Every time is in nanoseconds on the admission clock,
/// which the fleet shares.
pub trait FleetSeam: Send + Sync {
    /// `cell` (the full cell of `key`, a `host:port`) was made on this node: the fleet
    /// tracks its host from now on.
    fn register(&self, cell: &Arc<HostCell>, key: &str);
    /// `cell` was forgotten here (idle): the fleet stops tracking it.
    fn forget(&self, cell: &HostCell);
    /// A slot for one request to `cell`'s host at once, if this node holds one (a token
    /// leased from the fleet, the host not paused); never waits, never asks the store.
    fn try_now(&self, cell: &Arc<HostCell>) -> bool;
    /// Pace one request to `cell`'s host for the whole fleet, until `deadline` at most.
    /// `demand`: how many requests wait here for the host's slots (the fleet may lease
    /// tokens for all of them in one call).
    fn pace<'a>(&'a self, cell: &'a Arc<HostCell>, deadline: u64, demand: u32) -> Paced<'a>;
    /// One of `caller`'s `cap` places among its requests in flight at `cell`'s host, for the
    /// whole fleet, waiting until `deadline` at most; the fleet stops counting a place held
    /// longer than `hold`.
    fn place<'a>(
        &'a self,
        cell: &'a Arc<HostCell>,
        caller: &'a str,
        cap: u32,
        hold: Duration,
        deadline: u64,
    ) -> Placed<'a>;
    /// Take `cost` of `cell`'s host's token budgets (`limits` per minute) for the whole fleet:
    /// if they hold it now, or (with `reserve_within`) as a reservation if they will within
    /// that time.
    fn take_tokens<'a>(
        &'a self,
        cell: &'a Arc<HostCell>,
        limits: Limits,
        cost: Cost,
        reserve_within: Option<Duration>,
    ) -> TokensTaken<'a>;
    /// Change the fleet's count of `cell`'s host's token budgets (in the background).
    fn tokens_changed(&self, cell: &HostCell, limits: Limits, change: TokenChange);
    /// `cell`'s host is paused until `until` (learned here or told by another node).
    fn paused(&self, cell: &HostCell, until: u64);
    /// This node's own pace of `cell`'s host while the fleet gives it a share of the host's
    /// pace: its next slot and its interval (ns), which the waiting room's estimate uses in
    /// place of the host's. `None`: the host's pace holds.
    fn own_pace(&self, _cell: &HostCell, _now: u64) -> Option<(u64, u64)> {
        None
    }
    /// Tell the other nodes what this node learned about `cell`'s host.
    fn publish(
        &self,
        cell: &HostCell,
        pause: Option<Duration>,
        rps: Option<f64>,
        max_concurrent: Option<u32>,
    );
}

/// What another node of the fleet told this one.
#[derive(Clone, Debug, PartialEq)]
pub enum FleetEvent {
    /// The host is paused for `length` from now.
    Pause { host: String, length: Duration },
    /// The host's learned pace (microseconds per request) and concurrency cap.
    Limit {
        host: String,
        interval_us: Option<u64>,
        max_concurrent: Option<u32>,
    },
}

impl FleetEvent {
    /// The event's kind, a bounded metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            FleetEvent::Pause { .. } => "pause",
            FleetEvent::Limit { .. } => "limit",
        }
    }
}
