//! Background upkeep: forgets idle hosts' admission state so memory follows the live set of
//! destinations, not every host ever seen; and drives the regions' active health checks.

use crate::state::Shared;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

const EVERY: Duration = Duration::from_secs(30);

pub struct Sweeper {
    shared: Arc<Shared>,
}

impl Sweeper {
    pub fn new(shared: Arc<Shared>) -> Sweeper {
        Sweeper { shared }
    }
}

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let ttl = self.shared.generation().config.server.idle_host_ttl.get();
            let dropped =
                self.shared.admission.evict_idle(ttl) + self.shared.regions.evict_idle(ttl);
            self.shared
                .metrics
                .hosts_tracked
                .set(self.shared.admission.len() as i64);
            if dropped > 0 {
                tracing::debug!(dropped, "forgot idle hosts");
            }
        }
    }
}

/// Starts the regions' health checks that are due, every `regions::health::EVERY`.
pub struct HealthChecker {
    shared: Arc<Shared>,
}

impl HealthChecker {
    pub fn new(shared: Arc<Shared>) -> HealthChecker {
        HealthChecker { shared }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(crate::regions::health::EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            crate::regions::health::start_due(&self.shared.regions);
        }
    }
}
