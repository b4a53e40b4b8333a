//! Why admission refused a request, with the `Retry-After` it carries. How a refusal is told
//! to a client (status, `Sluice-Error`, header) is the edge's business, not this file's.

use std::time::Duration;

/// Why admission refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The host's pace has no slot within the allowed wait.
    Pace { retry_after: Duration },
    /// The host is paused past the allowed wait.
    Paused { retry_after: Duration },
    /// No in-flight place freed up within the allowed wait.
    Concurrency { retry_after: Duration },
    /// The fleet's shared store is unavailable and `on_error = "throttle"`.
    Unavailable { retry_after: Duration },
}

impl Refusal {
    /// Every `reason()`, for the metric's label set.
    pub const REASONS: [&'static str; 4] =
        ["pace", "paused", "concurrency", "shared_state_unavailable"];

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Pace { .. } => "pace",
            Refusal::Paused { .. } => "paused",
            Refusal::Concurrency { .. } => "concurrency",
            Refusal::Unavailable { .. } => "shared_state_unavailable",
        }
    }

    /// The `Sluice-Error` code the client receives.
    pub fn code(self) -> crate::error::Code {
        match self {
            Refusal::Unavailable { .. } => crate::error::Code::SharedStateUnavailable,
            _ => crate::error::Code::RateLimited,
        }
    }

    pub fn retry_after(self) -> Duration {
        match self {
            Refusal::Pace { retry_after }
            | Refusal::Paused { retry_after }
            | Refusal::Concurrency { retry_after }
            | Refusal::Unavailable { retry_after } => retry_after,
        }
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(self) -> u64 {
        let d = self.retry_after();
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}
