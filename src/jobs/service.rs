//! The jobs' background service: open the store (the embedded one, waiting while a previous
//! process holds it; or the fleet's Redis, waiting while it is away), take up what it holds,
//! run the workers until shutdown, and delete jobs past retention. In a fleet it also feeds
//! the workers from the Redis Stream and claims what dead nodes left.

use super::backend::Backend;
use super::call::Caller;
use super::fleet::RedisJobStore;
use super::store::JobStore;
use super::Process;
use super::{now_ms, Task};
use crate::config::{FleetBackend, RedisUrl};
use futures_util::FutureExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub struct Service {
    shared: Arc<dyn Process>,
}

impl Service {
    pub fn new(shared: Arc<dyn Process>) -> Service {
        Service { shared }
    }
}

/// The fleet's Redis URL, when jobs are kept there (one Redis; a Redis Cluster's jobs stay on
/// each node's embedded store).
pub fn fleet_url(config: &crate::config::Config) -> Option<String> {
    match (&config.shared.backend, &config.shared.redis_url) {
        (FleetBackend::Redis, RedisUrl::One(url)) => Some(url.clone()),
        _ => None,
    }
}

/// Open the backend, trying again every 250 ms until it opens or shutdown.
async fn open(shared: &dyn Process, shutdown: &mut pingora_core::server::ShutdownWatch) -> bool {
    let config = shared.generation().config.clone();
    let jobs = &shared.jobs();
    let dir = std::path::PathBuf::from(&config.server.state_dir);
    let mut logged = false;
    while !jobs.is_open() {
        let opened = match fleet_url(&config) {
            Some(url) => RedisJobStore::connect(
                &url,
                &config.shared.key_prefix,
                shared.instance(),
                config.jobs.claim_after.get(),
            )
            .await
            .map(|f| Backend::Fleet(Arc::new(f))),
            None => {
                let d = dir.clone();
                match tokio::task::spawn_blocking(move || {
                    JobStore::open(&d, super::STORE_CACHE_BYTES)
                })
                .await
                {
                    Ok(r) => r.map(|s| Backend::Local(Arc::new(s))),
                    Err(e) => Err(super::JobStoreError::from_message(e.to_string())),
                }
            }
        };
        match opened {
            Ok(b) => {
                jobs.open(b);
                break;
            }
            Err(e) if !logged => {
                tracing::warn!(target: "sluice::jobs", error = %e, "job store not open yet; trying again every 250 ms");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return false,
        }
    }
    true
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Service {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let shared = &self.shared;
        let config = shared.generation().config.clone();
        if !config.jobs.enabled || !open(&**shared, &mut shutdown).await {
            return;
        }
        let jobs = &shared.jobs();
        let retention = config.jobs.retention.get();
        let fleet = match jobs.backend.get() {
            Some(Backend::Fleet(f)) => {
                let (tx, rx) = mpsc::channel(config.jobs.workers);
                *jobs.fleet_tasks.lock().await = Some(rx);
                Some((f.clone(), tx))
            }
            _ => None,
        };
        if let Err(e) = jobs.recover(retention).await {
            tracing::error!(target: "sluice::jobs", error = ?e, "could not take up stored jobs");
        }
        let client = match Caller::new(&**shared, config.jobs.workers) {
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
                while let Some((task, entry)) = shared.jobs().next_task().await {
                    client.run(&*shared, task).await;
                    shared.jobs().done(entry).await;
                }
            });
        }
        if let Some((fleet, tx)) = fleet {
            let shared = shared.clone();
            workers.spawn(async move { feed(&*shared, &fleet, tx).await });
        }
        let mut purge = tokio::time::interval(
            Duration::from_secs(1).max(retention.min(Duration::from_secs(60))),
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
        // up by the next process (from the store) or another node (from the stream).
        jobs.stopping.store(true, Ordering::Release);
        jobs.wake.notify_waiters();
        if let Some(Backend::Fleet(f)) = jobs.backend.get() {
            f.wake.notify_one();
        }
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

/// Longest a node's feed blocks on the stream when nothing is due. An idle node then makes
/// two calls in this time (move what is due, which runs two or three commands in Redis, and
/// the read), and claims dead nodes' tasks every `claim_after / 2`: well under one command a
/// second.
pub(super) const IDLE_BLOCK: Duration = Duration::from_secs(10);

/// In a fleet: move due tasks into the stream, read this node's share (no more than it has
/// free workers), claim tasks of dead nodes, keep this node's own, until stopping. Between
/// rounds it blocks on the stream (a new task wakes it) until the next task due later, at most
/// `IDLE_BLOCK`; a task scheduled here, or stopping, wakes it too.
async fn feed(shared: &dyn Process, fleet: &RedisJobStore, tx: mpsc::Sender<(String, Task)>) {
    let jobs = &shared.jobs();
    let mut reader = None;
    let mut last_claim: Option<Instant> = None;
    let mut last_keep = Instant::now();
    let keep_every = (fleet.claim_after / 3).max(Duration::from_millis(100));
    // A task is claimable only once idle for `claim_after`: looking more often gains little.
    let claim_every = (fleet.claim_after / 2).max(Duration::from_millis(500));
    let mut failing = false;
    // Running: a task scheduled here wakes this feed (not blocked: at its next read).
    fleet.blocked_until.store(u64::MAX, Ordering::Release);
    while !jobs.stopping.load(Ordering::Acquire) {
        let round: Result<(), super::JobStoreError> = async {
            let now = now_ms();
            // Tasks kept here while Redis was away.
            for (at, task) in jobs.take_due(u64::MAX) {
                if fleet.schedule(at, now, &task).await.is_err() {
                    jobs.schedule_here(at, task);
                    break;
                }
            }
            let moved = fleet.move_due(now).await?;
            if let Ok(mut b) = jobs.fleet_backlog.lock() {
                *b = moved.backlog;
            }
            let mut got = Vec::new();
            if tx.capacity() > 0 && last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
                last_claim = Some(Instant::now());
                got.extend(fleet.claim_abandoned(tx.capacity()).await?);
            }
            if last_keep.elapsed() >= keep_every {
                last_keep = Instant::now();
                fleet.keep().await?;
            }
            let free = tx.capacity().saturating_sub(got.len());
            if free > 0 && reader.is_none() {
                reader = Some(fleet.reader(IDLE_BLOCK).await?);
            }
            // Block until the next task due later, the next keep, or `IDLE_BLOCK`.
            let mut block = IDLE_BLOCK;
            if let Some(at) = moved.next_due {
                block = block.min(Duration::from_millis(at.saturating_sub(now_ms())));
            }
            if fleet.in_flight.lock().is_ok_and(|s| !s.is_empty()) {
                block = block.min(keep_every.saturating_sub(last_keep.elapsed()));
            }
            let block = block.max(Duration::from_millis(10));
            // A task scheduled here during this round: look again at once, without reading.
            let woken = fleet.wake.notified().now_or_never().is_some();
            let read = match reader.as_mut() {
                _ if woken => None,
                Some((conn, id)) if free > 0 => {
                    let until = now_ms().saturating_add(block.as_millis() as u64);
                    fleet.blocked_until.store(until, Ordering::Release);
                    let read = fleet.read(conn, free, block);
                    tokio::pin!(read);
                    let read = tokio::select! {
                        r = &mut read => r,
                        // Woken: Redis ends the read (what it got is not lost).
                        _ = fleet.wake.notified() => match fleet.unblock(*id).await {
                            Ok(()) => read.await,
                            Err(e) => Err(e),
                        },
                    };
                    fleet.blocked_until.store(u64::MAX, Ordering::Release);
                    Some(read)
                }
                _ => {
                    tokio::select! {
                        _ = tokio::time::sleep(block.min(Duration::from_millis(50))) => {}
                        _ = fleet.wake.notified() => {}
                    }
                    None
                }
            };
            match read {
                Some(Ok(tasks)) => got.extend(tasks),
                Some(Err(e)) => {
                    reader = None;
                    return Err(e);
                }
                None => {}
            }
            for (entry, task) in got {
                if let Ok(mut s) = fleet.in_flight.lock() {
                    s.insert(entry.clone());
                }
                if tx.send((entry, task)).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        match round {
            Ok(()) if failing => {
                tracing::info!(target: "sluice::jobs", "the fleet's job stream is back");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(target: "sluice::jobs", error = %e, "the fleet's job stream is away; trying again");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // Stopped: tasks scheduled here from now on wake the other nodes instead.
    fleet.blocked_until.store(0, Ordering::Release);
}
