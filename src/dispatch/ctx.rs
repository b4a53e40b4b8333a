//! Per-request state for the edge: what the access log, the metrics and the error page need,
//! created when the request head arrives and dropped after logging. Everything the stages
//! hand each other travels in their own values (`Plan`, `Admitted`, the answer).

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
    /// The destination host's limits profile, once known (its metric label).
    pub profile: Option<u16>,
    /// Attempts made (first, retries, duplicates), for `Sluice-Attempts` and the log.
    pub attempts: u32,
    /// The refusal or failure code, when sluice answered instead of the upstream.
    pub error: Option<Code>,
    /// Total time spent waiting for admission, over all attempts.
    pub queued: Duration,
    /// The authenticated client's name.
    pub client: Option<String>,
    /// Request body bytes received so far.
    pub body_bytes: u64,
    /// The configured region that answered.
    pub region: Option<String>,
    /// The HTTP version the answering upstream spoke.
    pub upstream_protocol: Option<crate::upstream::Protocol>,
}

impl Ctx {
    /// The bounded metric label of the destination host.
    pub fn host_label(&self) -> &str {
        match self.profile {
            Some(p) => self.generation.host_label(p),
            None => crate::generation::OTHER_HOST,
        }
    }

    pub fn new(generation: Arc<Generation>) -> Ctx {
        Ctx {
            generation,
            started: Instant::now(),
            way: WayIn::Unknown,
            origin: None,
            profile: None,
            attempts: 0,
            error: None,
            queued: Duration::ZERO,
            client: None,
            body_bytes: 0,
            region: None,
            upstream_protocol: None,
        }
    }
}
