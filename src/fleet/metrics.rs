//! The fleet's metrics (`sluice_shared_*`): breaker state, Redis calls and errors, live nodes,
//! leased tokens, requests paced by the fallback, events received. Registered once into the
//! process registry; every label comes from a closed set.

use super::breaker::BreakerState;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

/// Kinds of calls to the shared store (metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Acquire,
    Share,
    GiveBack,
    Pause,
    Learn,
    Heartbeat,
    Leave,
    Place,
    Tokens,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::Acquire,
        Op::Share,
        Op::GiveBack,
        Op::Pause,
        Op::Learn,
        Op::Heartbeat,
        Op::Leave,
        Op::Place,
        Op::Tokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Acquire => "acquire",
            Op::Share => "share",
            Op::GiveBack => "give_back",
            Op::Pause => "pause",
            Op::Learn => "learn",
            Op::Heartbeat => "heartbeat",
            Op::Leave => "leave",
            Op::Place => "place",
            Op::Tokens => "tokens",
        }
    }
}

pub struct FleetMetrics {
    /// `sluice_shared_breaker_state{state}`: 1 for the state in force, 0 for the others.
    pub breaker_state: IntGaugeVec,
    /// `sluice_shared_breaker_transitions_total{to}`.
    pub breaker_transitions: IntCounterVec,
    /// `sluice_shared_redis_calls_total{op}`.
    pub calls: IntCounterVec,
    /// `sluice_shared_redis_errors_total{op, kind="timeout|error"}`.
    pub errors: IntCounterVec,
    pub live_nodes: IntGauge,
    pub tokens_leased: IntCounter,
    pub tokens_given_back: IntCounter,
    /// `sluice_shared_fallback_total{on_error}`: requests admitted or refused by the fallback.
    pub fallback: IntCounterVec,
    /// `sluice_shared_events_total{kind="pause|limit"}`: events received from other nodes.
    pub events: IntCounterVec,
    /// `sluice_shared_redis_retries_total{op}`: calls tried again after an error.
    pub retries: IntCounterVec,
}

impl FleetMetrics {
    pub fn new() -> Result<FleetMetrics, prometheus::Error> {
        let m = FleetMetrics {
            breaker_state: IntGaugeVec::new(
                Opts::new(
                    "sluice_shared_breaker_state",
                    "Circuit breaker in front of the shared store: 1 for the state in force",
                ),
                &["state"],
            )?,
            breaker_transitions: IntCounterVec::new(
                Opts::new(
                    "sluice_shared_breaker_transitions_total",
                    "Circuit breaker state changes, by the state entered",
                ),
                &["to"],
            )?,
            calls: IntCounterVec::new(
                Opts::new(
                    "sluice_shared_redis_calls_total",
                    "Calls made to the shared store, by operation",
                ),
                &["op"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "sluice_shared_redis_errors_total",
                    "Failed calls to the shared store, by operation and kind (timeout or error)",
                ),
                &["op", "kind"],
            )?,
            live_nodes: IntGauge::new(
                "sluice_shared_live_nodes",
                "Nodes of the fleet alive at the last heartbeat (the last known count while the store is away)",
            )?,
            tokens_leased: IntCounter::new(
                "sluice_shared_tokens_leased_total",
                "Tokens taken from the fleet's shared buckets",
            )?,
            tokens_given_back: IntCounter::new(
                "sluice_shared_tokens_given_back_total",
                "Leased tokens not used in time and given back",
            )?,
            fallback: IntCounterVec::new(
                Opts::new(
                    "sluice_shared_fallback_total",
                    "Requests handled by the on_error policy because the shared store was unavailable",
                ),
                &["on_error"],
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    "sluice_shared_events_total",
                    "Pauses and learned limits received from other nodes",
                ),
                &["kind"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "sluice_shared_redis_retries_total",
                    "Calls to the shared store tried again after an error ([shared] retry)",
                ),
                &["op"],
            )?,
        };
        for s in BreakerState::ALL {
            m.breaker_state
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == BreakerState::Closed));
            m.breaker_transitions.with_label_values(&[s.as_str()]);
        }
        for op in Op::ALL {
            m.calls.with_label_values(&[op.as_str()]);
            m.retries.with_label_values(&[op.as_str()]);
            for kind in ["timeout", "error"] {
                m.errors.with_label_values(&[op.as_str(), kind]);
            }
        }
        for p in ["local", "allow", "throttle"] {
            m.fallback.with_label_values(&[p]);
        }
        for k in ["pause", "limit"] {
            m.events.with_label_values(&[k]);
        }
        Ok(m)
    }

    /// Every collector, for registration in the process registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.breaker_state.clone()),
            Box::new(self.breaker_transitions.clone()),
            Box::new(self.calls.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.live_nodes.clone()),
            Box::new(self.tokens_leased.clone()),
            Box::new(self.tokens_given_back.clone()),
            Box::new(self.fallback.clone()),
            Box::new(self.events.clone()),
            Box::new(self.retries.clone()),
        ]
    }

    pub fn set_state(&self, state: BreakerState) {
        for s in BreakerState::ALL {
            self.breaker_state
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == state));
        }
    }
}
