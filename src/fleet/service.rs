//! The fleet's background work on each node: connect the store, say the node is alive (which
//! also counts the live nodes and probes a half-open breaker when no request does), and follow
//! other nodes' pauses and learned limits. On shutdown the node says it is leaving.

use super::metrics::Op;
use super::redis::{Heard, RedisStore};
use super::{Fleet, Store};
use crate::admission::FleetEvent;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// Pause between attempts to follow the event channel again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

pub struct FleetService {
    fleet: Arc<Fleet>,
    /// Applies what another node told (to this node's admission).
    on_event: Box<dyn Fn(FleetEvent) + Send + Sync>,
    /// Says this node has left the fleet (the early exit on shutdown waits for it).
    on_left: Box<dyn Fn() + Send + Sync>,
}

impl FleetService {
    pub fn new(
        fleet: Arc<Fleet>,
        on_event: Box<dyn Fn(FleetEvent) + Send + Sync>,
        on_left: Box<dyn Fn() + Send + Sync>,
    ) -> FleetService {
        FleetService {
            fleet,
            on_event,
            on_left,
        }
    }
}

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _left = Left(&*self.on_left);
        let fleet = &self.fleet;
        let config = &fleet.config;
        let ca_pem = match &config.tls_ca_file {
            None => None,
            Some(path) => match std::fs::read(path) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    tracing::error!(path, error = %e, "cannot read shared.tls_ca_file; pacing stays local");
                    return;
                }
            },
        };
        let store = match RedisStore::new(
            &config.redis_url.urls(),
            &config.key_prefix,
            config.timeout.get(),
            ca_pem,
        ) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the shared store; pacing stays local");
                return;
            }
        };
        fleet.set_store(store.clone());
        let every = config.heartbeat.get();
        let ttl = every * 3;
        let beats = async {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut beats = 0u64;
            loop {
                tick.tick().await;
                if !fleet.allow(fleet.now()) {
                    continue;
                }
                // Every third beat (and the first) also tidies the set: it lives twice the
                // ttl, three beats.
                let tidy = beats.is_multiple_of(3);
                let beat = || store.heartbeat(&fleet.node_id, ttl, tidy);
                if let Ok(n) = fleet.call(Op::Heartbeat, beat).await {
                    fleet.set_live_nodes(n);
                    beats += 1;
                }
            }
        };
        let on_heard = |heard: Heard| match heard {
            Heard::Following => fleet.set_following(true),
            Heard::Share { host, node } => {
                if node != fleet.node_id {
                    fleet.metrics.events.with_label_values(&["share"]).inc();
                    fleet.share_asked(host);
                }
            }
            Heard::Event(event) => {
                fleet
                    .metrics
                    .events
                    .with_label_values(&[event.kind()])
                    .inc();
                (self.on_event)(event)
            }
        };
        let events = async {
            loop {
                if let Err(e) = store.follow(&on_heard).await {
                    tracing::debug!(error = %e, "fleet events: following again shortly");
                }
                fleet.set_following(false);
                tokio::time::sleep(RESUBSCRIBE_AFTER).await;
            }
        };
        tokio::select! {
            _ = beats => {}
            _ = events => {}
            _ = shutdown.changed() => {}
        }
        if fleet.allow(fleet.now()) {
            fleet.give_back_shares(&fleet.leased_hosts()).await;
            if let Err(e) = fleet.call(Op::Leave, || store.leave(&fleet.node_id)).await {
                tracing::debug!(error = %e, "could not say this node is leaving");
            }
        }
    }
}

/// Says, when the service ends however it ends, that this node no longer takes part in the
/// fleet (the early exit on shutdown waits for it).
struct Left<'a>(&'a (dyn Fn() + Send + Sync));

impl Drop for Left<'_> {
    fn drop(&mut self) {
        (self.0)()
    }
}
