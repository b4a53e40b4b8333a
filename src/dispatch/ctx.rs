//! Per-request state, created when the request head arrives and dropped after logging.

use crate::admission::{Host, Permit};
use crate::error::Code;
use crate::generation::Generation;
use crate::target::{Origin, WayIn};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Ctx {
    /// The configuration generation this request runs on, start to end.
    pub generation: Arc<Generation>,
    pub started: Instant,
    pub way: WayIn,
    /// Where the request goes, once known.
    pub origin: Option<Origin>,
    /// The path and query to send upstream.
    pub upstream_path: String,
    /// Attempts made (first, retries, duplicates), for `Sluice-Attempts` and the log.
    pub attempts: u32,
    /// The refusal or failure code, when sluice answered instead of the upstream.
    pub error: Option<Code>,
    /// End-to-end deadline from `Sluice-Timeout`, else the host's `request_timeout`: the
    /// wait, the connects and the response head (never a streamed body).
    pub deadline: Option<Instant>,
    /// The deadline is the client's `Sluice-Timeout` (else the host's `request_timeout`,
    /// whose clock stops while the request body streams in).
    pub deadline_from_client: bool,
    /// The destination host's admission state.
    pub cell: Option<Host>,
    /// The in-flight place of the current attempt.
    pub permit: Option<Permit>,
    /// Total time spent waiting for admission, over all attempts.
    pub queued: Duration,
    /// The authenticated client's name.
    pub client: Option<String>,
    /// The client's own pace cell, until its admission is taken (first attempt).
    pub client_cell: Option<Host>,
    /// The client's pace place.
    pub client_permit: Option<Permit>,
    /// Request body bytes received so far.
    pub body_bytes: u64,
    /// The configured region that answered.
    pub region: Option<String>,
}

impl Ctx {
    /// The bounded metric label of the destination host.
    pub fn host_label(&self) -> &str {
        match &self.cell {
            Some(c) => self.generation.host_label(c.profile()),
            None => crate::generation::OTHER_HOST,
        }
    }

    /// Time left before the deadline (`None`: no deadline).
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// `limit`, cut to the time left before the deadline.
    pub fn within_deadline(&self, limit: Duration) -> Duration {
        self.time_left().map_or(limit, |left| left.min(limit))
    }

    pub fn new(generation: Arc<Generation>) -> Ctx {
        Ctx {
            generation,
            started: Instant::now(),
            way: WayIn::Unknown,
            origin: None,
            upstream_path: String::new(),
            attempts: 0,
            error: None,
            deadline: None,
            deadline_from_client: false,
            cell: None,
            permit: None,
            queued: Duration::ZERO,
            client: None,
            client_cell: None,
            client_permit: None,
            body_bytes: 0,
            region: None,
        }
    }
}
