//! Jobs: a call taken now (`202`) and made later, its result delivered to signed webhooks.
//!
//! A job's call and its webhook deliveries enter sluice through its own proxy listener, as
//! explicit-target requests (`call.rs`): they take the one pipeline every request takes
//! (auth, egress policy, admission with its pauses, regions, retries, access log), so there is
//! no second way to an upstream. The durable state is the embedded store (`store.rs`); the
//! schedule of what is due when is in memory, rebuilt from the store at start.
//!
//! Nothing here imports `dispatch/`, `proxy/` or the process state: what the jobs need of the
//! process is the [`Process`] seam; the API (`api.rs`) is called by `proxy/`.

pub mod api;
mod backend;
mod call;
mod fleet;
mod metrics;
pub mod model;
mod service;
pub mod sign;
pub mod spec;
mod store;

use backend::Backend;
pub use metrics::JobMetrics;
use model::Receipt;
pub use model::{Job, State};
pub use service::{fleet_url, Service};
use store::{JobStore, JobStoreError};

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// The embedded store's page cache (redb's default is 1 GiB, most of it never needed: the
/// schedule is in memory, and a job is read when its task is due).
pub(crate) const STORE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Header carrying this process's job credential on its own loopback requests.
pub const JOB_TOKEN: http::HeaderName = http::HeaderName::from_static("sluice-job-token");
/// With it, the client whose job it is (its limits apply).
pub const JOB_CLIENT: &str = "sluice-job-client";

/// What the jobs need of the process they run in; the process state implements it, so that
/// jobs never import it.
pub trait Process: Send + Sync {
    fn jobs(&self) -> &Jobs;
    /// The configuration generation in force.
    fn generation(&self) -> Arc<crate::generation::Generation>;
    /// This process's id (its `Via` pseudonym, its name in the fleet's job streams).
    fn instance(&self) -> &str;
    fn metrics(&self) -> &crate::metrics::Metrics;
    /// The resolver (a webhook's host is checked against the egress policy when a job is
    /// taken).
    fn dns(&self) -> &crate::resolve::Dns;
}

/// Something due at a time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    /// Make the job's call.
    Call(String),
    /// Deliver the job's result to its receiver `n`.
    Deliver(String, usize),
}

/// The jobs of this process: the store (once open), the schedule and the counts.
pub struct Jobs {
    backend: OnceLock<Backend>,
    /// Due tasks by time (Unix ms), then order of scheduling. In a fleet: tasks that could
    /// not be handed to Redis yet.
    due: Mutex<BinaryHeap<Reverse<(u64, u64, Task)>>>,
    wake: Notify,
    seq: AtomicU64,
    /// Jobs by state now (index: `State::ALL`).
    counts: Mutex<[i64; 7]>,
    /// Jobs not yet called, by creation time (for the oldest one's age).
    waiting: Mutex<BTreeSet<(u64, String)>>,
    /// Stored jobs were taken up: new ones may be scheduled (before, a new job would be
    /// scheduled twice, by its submission and by the recovery).
    ready: tokio::sync::watch::Sender<bool>,
    /// In a fleet: tasks read from the stream (with their entry ids), for the workers.
    fleet_tasks: tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<(String, Task)>>>,
    /// In a fleet: tasks in the stream and due later, as last read.
    fleet_backlog: Mutex<(u64, u64)>,
    /// Shutting down: workers take no new task.
    stopping: std::sync::atomic::AtomicBool,
    /// The credential of this process's own requests (random, never stored).
    pub token: String,
    pub metrics: JobMetrics,
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, spec::millis)
}

/// Random bytes as hex (ids and the job credential).
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // No OS randomness: still unique (time and a counter), only less unguessable.
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed) ^ now_ms().rotate_left(20);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (n >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn index(s: State) -> usize {
    State::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// Why the jobs API could not do what was asked.
#[derive(Debug)]
pub enum JobsError {
    Unavailable(String),
    Store(JobStoreError),
}

impl From<JobStoreError> for JobsError {
    fn from(e: JobStoreError) -> Self {
        JobsError::Store(e)
    }
}

impl Jobs {
    pub fn new() -> Result<Jobs, prometheus::Error> {
        Ok(Jobs {
            backend: OnceLock::new(),
            due: Mutex::new(BinaryHeap::new()),
            wake: Notify::new(),
            seq: AtomicU64::new(0),
            counts: Mutex::new([0; 7]),
            waiting: Mutex::new(BTreeSet::new()),
            ready: tokio::sync::watch::Sender::new(false),
            fleet_tasks: tokio::sync::Mutex::new(None),
            fleet_backlog: Mutex::new((0, 0)),
            stopping: std::sync::atomic::AtomicBool::new(false),
            token: random_hex(32),
            metrics: JobMetrics::new()?,
        })
    }

    /// A new job id: its creation time first, so ids sort by age.
    pub fn new_id() -> String {
        format!("job_{:012x}{}", now_ms(), random_hex(10))
    }

    /// The store is open: jobs can be taken.
    fn open(&self, backend: Backend) -> bool {
        self.backend.set(backend).is_ok()
    }

    /// Open the embedded store in `dir` now (at start, before the listeners take requests).
    /// An error leaves it to the service, which tries again until the holder lets go.
    pub fn open_dir(&self, dir: &std::path::Path) -> Result<(), String> {
        let store = JobStore::open(dir, STORE_CACHE_BYTES).map_err(|e| e.to_string())?;
        self.open(Backend::Local(Arc::new(store)));
        Ok(())
    }

    /// Jobs are kept in the fleet's Redis.
    pub fn in_fleet(&self) -> bool {
        self.backend.get().is_some_and(Backend::is_fleet)
    }

    pub fn is_open(&self) -> bool {
        self.backend.get().is_some()
    }

    fn backend(&self) -> Result<&Backend, JobsError> {
        self.backend.get().ok_or_else(|| {
            JobsError::Unavailable(
                "the job store is not open yet (another sluice process may still hold it)".into(),
            )
        })
    }

    /// The embedded store (recovery and retention are its own; Redis does both itself).
    fn local(&self) -> Option<&Arc<JobStore>> {
        match self.backend.get() {
            Some(Backend::Local(s)) => Some(s),
            _ => None,
        }
    }

    /// Change a job atomically (see `Backend::change`).
    async fn change<R: Send + 'static>(
        &self,
        id: &str,
        now: u64,
        retention: Duration,
        f: impl FnMut(&mut Job) -> Option<R> + Send + 'static,
    ) -> Result<Option<(Job, R)>, JobsError> {
        Ok(self.backend()?.change(id, now, retention, f).await?)
    }

    /// Make `task` due at `at`: on this node's schedule, or the fleet's (kept here and handed
    /// over later if Redis cannot take it now).
    async fn schedule(&self, at: u64, task: Task) {
        if let Some(Backend::Fleet(f)) = self.backend.get() {
            match f.schedule(at, now_ms(), &task).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(target: "sluice::jobs", error = %e, "task kept here until Redis takes it")
                }
            }
        }
        self.schedule_here(at, task);
    }

    fn schedule_here(&self, at: u64, task: Task) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut due) = self.due.lock() {
            due.push(Reverse((at, seq, task)));
        }
        self.wake.notify_one();
    }

    /// Tasks on this node's schedule that are due (a fleet hands them to Redis).
    fn take_due(&self, now: u64) -> Vec<(u64, Task)> {
        let mut out = Vec::new();
        if let Ok(mut due) = self.due.lock() {
            while let Some(Reverse((at, _, _))) = due.peek() {
                if *at > now {
                    break;
                }
                if let Some(Reverse((at, _, task))) = due.pop() {
                    out.push((at, task));
                }
            }
        }
        out
    }

    /// The next task for a worker, and its stream entry in a fleet; `None` once stopping.
    async fn next_task(&self) -> Option<(Task, Option<String>)> {
        if !self.backend.get().is_some_and(Backend::is_fleet) {
            return self.next().await.map(|t| (t, None));
        }
        let mut rx = self.fleet_tasks.lock().await;
        let rx = rx.as_mut()?;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            let got = tokio::time::timeout(Duration::from_millis(250), rx.recv()).await;
            match got {
                Ok(Some((entry, task))) => return Some((task, Some(entry))),
                Ok(None) => return None,
                Err(_) => {}
            }
        }
    }

    /// A task is done: in a fleet, acknowledged so no other node takes it.
    async fn done(&self, entry: Option<String>) {
        if let (Some(entry), Some(Backend::Fleet(f))) = (entry, self.backend.get()) {
            if let Ok(mut s) = f.in_flight.lock() {
                s.remove(&entry);
            }
            if let Err(e) = f.ack(&entry).await {
                tracing::warn!(target: "sluice::jobs", error = %e, entry, "task not acknowledged; another node may take it again");
            }
        }
    }

    /// The next due task, waiting for it; `None` once shutting down.
    async fn next(&self) -> Option<Task> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            let now = now_ms();
            let wait = match self.due.lock() {
                Ok(mut due) => match due.peek() {
                    Some(Reverse((at, _, _))) if *at <= now => {
                        if let Some(Reverse((_, _, task))) = due.pop() {
                            // Another worker may have work too.
                            if due.peek().is_some() {
                                self.wake.notify_one();
                            }
                            return Some(task);
                        }
                        continue;
                    }
                    Some(Reverse((at, _, _))) => Duration::from_millis(at - now),
                    None => Duration::from_secs(3600),
                },
                Err(_) => Duration::from_secs(1),
            };
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    fn count(&self, from: Option<State>, to: State) {
        if let Ok(mut c) = self.counts.lock() {
            if let Some(f) = from {
                c[index(f)] -= 1;
            }
            c[index(to)] += 1;
        }
        self.metrics.jobs.with_label_values(&[to.as_str()]).inc();
        self.metrics.waiting.set(self.waiting_count() as i64);
    }

    fn waiting_count(&self) -> usize {
        self.waiting.lock().map_or(0, |w| w.len())
    }

    /// Jobs by state, and the age of the oldest not yet called (for `/status`).
    pub fn summary(&self) -> serde_json::Value {
        let counts = self.counts.lock().map(|c| *c).unwrap_or_default();
        let mut by_state = serde_json::Map::new();
        for (s, n) in State::ALL.iter().zip(counts) {
            by_state.insert(s.as_str().into(), n.into());
        }
        let oldest = self
            .waiting
            .lock()
            .ok()
            .and_then(|w| w.iter().next().map(|(created, _)| *created));
        serde_json::json!({
            "open": self.backend.get().is_some(),
            "backend": match self.backend.get() {
                Some(Backend::Fleet(_)) => "redis",
                Some(Backend::Local(_)) => "embedded",
                None => "-",
            },
            "fleet_tasks": self.fleet_backlog.lock().ok().map(|b| {
                serde_json::json!({"now": b.0, "later": b.1})
            }),
            "by_state": by_state,
            "oldest_waiting_s": oldest.map(|c| now_ms().saturating_sub(c) as f64 / 1000.0),
        })
    }

    /// Store a new job (or find the one its idempotency key names) and schedule its call.
    pub async fn submit(&self, job: Job) -> Result<(Job, bool), JobsError> {
        let mut ready = self.ready.subscribe();
        let taken_up = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok());
        if !taken_up {
            return Err(JobsError::Unavailable(
                "stored jobs are still being taken up; try again".into(),
            ));
        }
        let (job, new) = self.backend()?.insert(job).await?;
        if new {
            if let Ok(mut w) = self.waiting.lock() {
                w.insert((job.created, job.id.clone()));
            }
            self.count(None, State::Queued);
            self.schedule(job.next_at, Task::Call(job.id.clone())).await;
            tracing::info!(target: "sluice::jobs", id = %job.id, url = %job.call.url, "job accepted");
        }
        Ok((job, new))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>, JobsError> {
        Ok(self.backend()?.get(id).await?)
    }

    /// Cancel a job whose call was not sent. `Ok(None)`: no such job; `Err(job)` inside:
    /// too late.
    pub async fn cancel(
        &self,
        retention: Duration,
        id: &str,
    ) -> Result<Option<Result<Job, Job>>, JobsError> {
        let now = now_ms();
        let changed = self
            .change(id, now, retention, move |j| {
                (j.state == State::Queued).then(|| {
                    j.state = State::Canceled;
                    j.finished = Some(now);
                    for d in &mut j.deliveries {
                        d.receipt = Receipt::GaveUp;
                        d.last_error = Some("the job was canceled".into());
                    }
                })
            })
            .await?;
        if let Some((job, ())) = changed {
            self.unwait(&job);
            self.count(Some(State::Queued), State::Canceled);
            return Ok(Some(Ok(job)));
        }
        Ok(self.get(id).await?.map(Err))
    }

    fn unwait(&self, job: &Job) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&(job.created, job.id.clone()));
        }
    }

    /// Take up every stored job after a start: calls still to make, deliveries still owed. A
    /// call that was in flight when the last process died is made again only if that is
    /// safe; otherwise it ends `failed` with `outcome_unknown`, and its webhooks say so.
    pub async fn recover(&self, retention: Duration) -> Result<(), JobsError> {
        let Some(store) = self.local() else {
            // A fleet's tasks left by a node that died are claimed from the stream instead.
            self.ready.send_replace(true);
            return Ok(());
        };
        let jobs = backend::blocking(store, |s| s.all()).await?;
        let (mut calls, mut unknown, mut owed) = (0, 0, 0);
        for job in jobs {
            if let Ok(mut c) = self.counts.lock() {
                c[index(job.state)] += 1;
            }
            match job.state {
                State::Queued => {
                    calls += 1;
                    self.track_waiting(&job);
                    self.schedule(job.next_at, Task::Call(job.id.clone())).await;
                }
                State::Running if job.call.replayable() => {
                    calls += 1;
                    self.track_waiting(&job);
                    self.requeue(&job.id, now_ms(), retention, None).await?;
                }
                State::Running => {
                    unknown += 1;
                    self.track_waiting(&job);
                    let now = now_ms();
                    self.finish(
                        &job.id,
                        State::Failed,
                        None,
                        Some("outcome_unknown".into()),
                        now,
                        retention,
                    )
                    .await?;
                }
                _ => {
                    for (n, d) in job.deliveries.iter().enumerate() {
                        if d.receipt == Receipt::Pending {
                            owed += 1;
                            self.schedule(d.next_at, Task::Deliver(job.id.clone(), n))
                                .await;
                        }
                    }
                }
            }
        }
        self.metrics.waiting.set(self.waiting_count() as i64);
        self.ready.send_replace(true);
        tracing::info!(target: "sluice::jobs", calls, unknown, deliveries = owed, "jobs taken up");
        Ok(())
    }

    fn track_waiting(&self, job: &Job) {
        if let Ok(mut w) = self.waiting.lock() {
            w.insert((job.created, job.id.clone()));
        }
    }

    /// Back to the queue (its call was not made, or may safely be made again) at `at`.
    async fn requeue(
        &self,
        id: &str,
        at: u64,
        retention: Duration,
        why: Option<String>,
    ) -> Result<(), JobsError> {
        let changed = self
            .change(id, now_ms(), retention, move |j| {
                (j.state == State::Running).then(|| {
                    j.state = State::Queued;
                    j.next_at = at;
                    j.outcome = why.clone();
                })
            })
            .await?;
        if changed.is_some() {
            self.count(Some(State::Running), State::Queued);
            self.schedule(at, Task::Call(id.to_string())).await;
        }
        Ok(())
    }

    /// The call is over (or given up): keep the answer, and owe the webhooks.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        id: &str,
        state: State,
        answer: Option<model::StoredAnswer>,
        outcome: Option<String>,
        now: u64,
        retention: Duration,
    ) -> Result<(), JobsError> {
        let changed = self
            .change(id, now, retention, move |j| {
                let from = j.state;
                (!from.called()).then(|| {
                    j.state = state;
                    j.answer = answer.clone();
                    j.outcome = outcome.clone();
                    j.finished = Some(now);
                    for d in &mut j.deliveries {
                        d.next_at = now;
                    }
                    from
                })
            })
            .await?;
        let Some((job, from)) = changed else {
            return Ok(());
        };
        self.unwait(&job);
        self.count(Some(from), state);
        tracing::info!(
            target: "sluice::jobs",
            id = %job.id,
            state = state.as_str(),
            status = job.answer.as_ref().map_or(0, |a| a.status),
            outcome = job.outcome.as_deref().unwrap_or("-"),
            attempts = job.attempts,
            "job called"
        );
        for n in 0..job.deliveries.len() {
            self.schedule(now, Task::Deliver(job.id.clone(), n)).await;
        }
        Ok(())
    }

    /// Delete finished jobs past their retention.
    pub async fn purge(&self) -> Result<usize, JobsError> {
        let Some(store) = self.local() else {
            return Ok(0);
        };
        let now = now_ms();
        let gone = store.purge(now).await?;
        if let Ok(mut c) = self.counts.lock() {
            for state in &gone {
                c[index(*state)] -= 1;
            }
        }
        Ok(gone.len())
    }
}
