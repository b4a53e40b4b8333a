//! Where jobs are kept: the embedded store of this node (`store.rs`), or the fleet's Redis
//! (`fleet.rs`). The same three operations on either; the embedded store's blocking calls
//! run off the async workers.

use super::fleet::RedisJobStore;
use super::model::Job;
use super::spec;
use super::store::{JobStore, JobStoreError};
use std::sync::Arc;
use std::time::Duration;

pub enum Backend {
    Local(Arc<JobStore>),
    Fleet(Arc<RedisJobStore>),
}

/// Run an embedded store call off the async workers.
pub async fn blocking<R: Send + 'static>(
    store: &Arc<JobStore>,
    f: impl FnOnce(&JobStore) -> Result<R, JobStoreError> + Send + 'static,
) -> Result<R, JobStoreError> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r,
        Err(e) => Err(JobStoreError::from_message(format!(
            "job store call ended: {e}"
        ))),
    }
}

impl Backend {
    pub fn is_fleet(&self) -> bool {
        matches!(self, Backend::Fleet(_))
    }

    /// Store a new job, or find the one its idempotency key already names (`false`).
    pub async fn insert(&self, job: Job) -> Result<(Job, bool), JobStoreError> {
        match self {
            Backend::Local(s) => s.insert(job).await,
            Backend::Fleet(f) => f.insert(&job).await,
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>, JobStoreError> {
        match self {
            Backend::Local(s) => {
                let id = id.to_string();
                blocking(s, move |s| s.get(&id)).await
            }
            Backend::Fleet(f) => f.get(id).await,
        }
    }

    /// Change a job atomically (`f` may run more than once in a fleet, on a fresh read each
    /// time); a job left with nothing to do is kept `retention` from `now`.
    pub async fn change<R: Send + 'static>(
        &self,
        id: &str,
        now: u64,
        retention: Duration,
        f: impl FnMut(&mut Job) -> Option<R> + Send + 'static,
    ) -> Result<Option<(Job, R)>, JobStoreError> {
        match self {
            Backend::Local(s) => {
                let expires = now.saturating_add(spec::millis(retention));
                s.update(id, expires, f).await
            }
            Backend::Fleet(fl) => fl.update(id, retention, f).await,
        }
    }
}
