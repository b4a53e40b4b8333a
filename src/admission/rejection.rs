//! Why admission turned a request away, with the wait it suggests. What the client is told
//! (status, `Sluice-Error`, `Retry-After`) is the gate's business (`gate::Refusal`).

use std::time::Duration;

/// Why admission refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The host's pace has no slot within the allowed wait.
    Pace { retry_after: Duration },
    /// The host is paused past the allowed wait.
    Paused { retry_after: Duration },
    /// No in-flight place freed up within the allowed wait.
    Concurrency { retry_after: Duration },
    /// The request would have to wait, and no slot leaves time for its answer before its
    /// deadline (nothing was sent).
    Deadline { retry_after: Duration },
    /// The fleet's shared store is unavailable and `on_error = "throttle"`.
    Unavailable { retry_after: Duration },
    /// The request's estimated tokens are more than one of the host's token budgets holds
    /// at all: waiting would not help.
    OverBudget {
        budget: super::TokenBudget,
        limit: u64,
        estimate: u64,
    },
}

impl Rejection {
    /// Every `reason()`, for the metric's label set.
    pub const REASONS: [&'static str; 6] = [
        "pace",
        "paused",
        "concurrency",
        "deadline",
        "shared_state_unavailable",
        "over_token_budget",
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Pace { .. } => "pace",
            Rejection::Paused { .. } => "paused",
            Rejection::Concurrency { .. } => "concurrency",
            Rejection::Deadline { .. } => "deadline",
            Rejection::Unavailable { .. } => "shared_state_unavailable",
            Rejection::OverBudget { .. } => "over_token_budget",
        }
    }

    /// The `Sluice-Error` code the client receives.
    pub fn code(self) -> crate::error::Code {
        match self {
            Rejection::Unavailable { .. } => crate::error::Code::SharedStateUnavailable,
            Rejection::OverBudget { .. } => crate::error::Code::OverTokenBudget,
            _ => crate::error::Code::RateLimited,
        }
    }

    pub fn retry_after(self) -> Duration {
        match self {
            Rejection::Pace { retry_after }
            | Rejection::Paused { retry_after }
            | Rejection::Concurrency { retry_after }
            | Rejection::Deadline { retry_after }
            | Rejection::Unavailable { retry_after } => retry_after,
            Rejection::OverBudget { .. } => Duration::ZERO,
        }
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(self) -> u64 {
        retry_after_secs(self.retry_after()).max(1)
    }
}

/// A wait as `Retry-After` says it: whole seconds, rounded up (a client that comes back after
/// it finds the wait over).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
