//! The jobs' background service: open the store (waiting while a previous process holds it),
//! take up what it holds, run the workers until shutdown, and delete jobs past retention.

use super::call::Caller;
use super::store::Store;
use crate::state::Shared;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    pub fn new(shared: Arc<Shared>) -> Service {
        Service { shared }
    }
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Service {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let shared = &self.shared;
        let config = shared.generation().config.clone();
        if !config.jobs.enabled {
            return;
        }
        let dir = std::path::PathBuf::from(&config.server.state_dir);
        let jobs = &shared.jobs;
        let mut logged = false;
        while !jobs.is_open() {
            let d = dir.clone();
            match tokio::task::spawn_blocking(move || Store::open(&d)).await {
                Ok(Ok(s)) => {
                    jobs.open(s);
                    break;
                }
                Ok(Err(e)) if !logged => {
                    tracing::warn!(target: "sluice::jobs", error = %e, dir = %dir.display(), "job store not open yet; trying again every 250 ms");
                    logged = true;
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => return,
            }
        }
        let retention = config.jobs.retention.get();
        if let Err(e) = jobs.recover(&shared.metrics, retention).await {
            tracing::error!(target: "sluice::jobs", error = ?e, "could not take up stored jobs");
        }
        let client = match Caller::new(shared, config.jobs.workers) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(target: "sluice::jobs", error = %e, "jobs cannot run");
                return;
            }
        };
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..config.jobs.workers {
            let (shared, client) = (shared.clone(), client.clone());
            workers.spawn(async move {
                while let Some(task) = shared.jobs.next().await {
                    client.run(&shared, task).await;
                }
            });
        }
        let mut purge = tokio::time::interval(
            Duration::from_secs(1).max(config.jobs.retention.get().min(Duration::from_secs(60))),
        );
        loop {
            tokio::select! {
                _ = purge.tick() => {
                    if let Err(e) = jobs.purge().await {
                        tracing::warn!(target: "sluice::jobs", error = ?e, "could not delete old jobs");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        // Calls in flight get the listener's grace period to finish; what does not is taken
        // up from the store by the next process.
        jobs.stopping.store(true, Ordering::Release);
        jobs.wake.notify_waiters();
        let grace = config.server.grace_period.get();
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            workers.abort_all();
        }
    }
}
