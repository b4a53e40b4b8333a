//! Per-request state, created when the request head arrives and dropped after logging.

use crate::config::Generation;
use crate::error::Code;
use crate::target::{Origin, WayIn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

pub struct Ctx {
    /// The configuration generation this request runs on, start to end.
    pub generation: Arc<Generation>,
    pub started: Instant,
    pub way: WayIn,
    /// Where the request goes, once known.
    pub origin: Option<Origin>,
    /// The path and query to send upstream.
    pub upstream_path: String,
    /// Addresses of the origin, in the order to try them.
    pub addrs: Vec<SocketAddr>,
    /// Connection attempts made so far (each one picks the next address).
    pub attempts: u32,
    /// The refusal or failure code, when sluice answered instead of the upstream.
    pub error: Option<Code>,
}

impl Ctx {
    pub fn new(generation: Arc<Generation>) -> Ctx {
        Ctx {
            generation,
            started: Instant::now(),
            way: WayIn::Unknown,
            origin: None,
            upstream_path: String::new(),
            addrs: Vec::new(),
            attempts: 0,
            error: None,
        }
    }
}
