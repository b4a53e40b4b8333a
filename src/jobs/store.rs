//! The durable job store on one node: a redb database (`server.state_dir/jobs.redb`), one
//! ACID transaction per change, each committed to disk before it is acted on, so a job that
//! was answered `202` survives `kill -9`. Blocking calls: the service runs them off the
//! async workers.
//!
//! Tables: jobs by id (JSON), the id of each idempotency key (per client), and finished jobs
//! by the time their retention ends.

use super::model::Job;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency_keys");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// The store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn from_message(m: impl Into<String>) -> StoreError {
        StoreError(m.into())
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError(e.to_string())
    }
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError(redb::Error::from(e).to_string())
            }
        }
    )*};
}
store_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(format!("a stored job does not parse: {e}"))
    }
}

pub struct Store {
    db: Database,
}

/// The idempotency key of a submission, scoped to its client.
fn key_of(client: Option<&str>, key: &str) -> String {
    format!("{}\u{0}{key}", client.unwrap_or(""))
}

impl Store {
    /// Open (or make) the store in `dir`. Fails while another process holds it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("cannot make {}: {e}", dir.display())))?;
        let db = Database::create(dir.join("jobs.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(KEYS)?;
        txn.open_table(EXPIRY)?;
        txn.commit()?;
        Ok(Store { db })
    }

    /// Store a new job, unless its idempotency key already names one: then that job is
    /// returned and nothing is stored (`false`). One write transaction, so two racing
    /// submissions with one key get one job.
    pub fn insert(&self, job: &Job) -> Result<(Job, bool), StoreError> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut jobs = txn.open_table(JOBS)?;
            let mut keys = txn.open_table(KEYS)?;
            let key = job
                .call
                .idempotency_key
                .as_deref()
                .map(|k| key_of(job.client.as_deref(), k));
            let existing = match &key {
                Some(k) => keys.get(k.as_str())?.map(|id| id.value().to_string()),
                None => None,
            };
            let found = match existing {
                Some(id) => jobs
                    .get(id.as_str())?
                    .map(|v| serde_json::from_slice::<Job>(v.value()))
                    .transpose()?,
                None => None,
            };
            match found {
                Some(old) => (old, false),
                None => {
                    jobs.insert(job.id.as_str(), serde_json::to_vec(job)?.as_slice())?;
                    if let Some(k) = &key {
                        keys.insert(k.as_str(), job.id.as_str())?;
                    }
                    (job.clone(), true)
                }
            }
        };
        txn.commit()?;
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let job = jobs.get(id)?;
        Ok(job.map(|v| serde_json::from_slice(v.value())).transpose()?)
    }

    /// Change a job in one transaction: `f` sees the stored job and returns what to keep (or
    /// `None` to leave it as it was). A job left with nothing to do is kept until
    /// `now + retention`. Returns the job as stored after.
    pub fn update<R>(
        &self,
        id: &str,
        expires_at: u64,
        mut f: impl FnMut(&mut Job) -> Option<R>,
    ) -> Result<Option<(Job, R)>, StoreError> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut jobs = txn.open_table(JOBS)?;
            let stored = jobs
                .get(id)?
                .map(|v| serde_json::from_slice::<Job>(v.value()))
                .transpose()?;
            let Some(mut job) = stored else {
                return Ok(None);
            };
            let was_done = job.done();
            let Some(r) = f(&mut job) else {
                return Ok(None);
            };
            jobs.insert(id, serde_json::to_vec(&job)?.as_slice())?;
            if job.done() && !was_done {
                txn.open_table(EXPIRY)?.insert((expires_at, id), ())?;
            }
            Some((job, r))
        };
        txn.commit()?;
        Ok(out)
    }

    /// Every job (to take up again after a start).
    pub fn all(&self) -> Result<Vec<Job>, StoreError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in jobs.iter()? {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// Delete jobs whose retention ended before `now` (Unix ms). Returns their states.
    pub fn purge(&self, now: u64) -> Result<Vec<super::model::State>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut gone = Vec::new();
        {
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut jobs = txn.open_table(JOBS)?;
            let mut keys = txn.open_table(KEYS)?;
            let due: Vec<(u64, String)> = expiry
                .range((0, "")..(now, ""))?
                .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_string())))
                .collect::<Result<_, _>>()?;
            for (at, id) in &due {
                expiry.remove((*at, id.as_str()))?;
                let removed = jobs
                    .remove(id.as_str())?
                    .map(|v| serde_json::from_slice::<Job>(v.value()))
                    .transpose()?;
                if let Some(job) = removed {
                    if let Some(k) = &job.call.idempotency_key {
                        keys.remove(key_of(job.client.as_deref(), k).as_str())?;
                    }
                    gone.push(job.state);
                }
            }
        }
        txn.commit()?;
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::*;
    use super::*;

    fn job(id: &str, key: Option<&str>) -> Job {
        Job {
            id: id.into(),
            client: Some("team".into()),
            created: 1,
            deadline: 10,
            state: State::Queued,
            next_at: 0,
            attempts: 0,
            outcome: None,
            call: Call {
                url: "http://a.test/x".into(),
                method: "POST".into(),
                headers: vec![("a".into(), "b".into())],
                body: b"{}".to_vec(),
                mode: None,
                regions: None,
                retry_on: None,
                idempotency_key: key.map(str::to_string),
            },
            answer: None,
            quorum: 0,
            deliveries: vec![],
            metadata: serde_json::json!({"n": 1}),
            finished: None,
        }
    }

    #[test]
    fn one_job_per_idempotency_key_and_changes_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let s = Store::open(dir.path()).expect("open");
            assert!(s.insert(&job("a", Some("k"))).expect("insert").1);
            let (same, new) = s.insert(&job("b", Some("k"))).expect("insert");
            assert_eq!((same.id.as_str(), new), ("a", false));
            assert!(s.insert(&job("c", None)).expect("insert").1);
            s.update("a", 100, |j| {
                j.state = State::Failed;
                j.finished = Some(5);
                Some(())
            })
            .expect("update");
        }
        let s = Store::open(dir.path()).expect("reopen");
        let all = s.all().expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(s.get("a").expect("get").expect("a").state, State::Failed);
        assert!(
            s.purge(50).expect("purge").is_empty(),
            "kept until its retention ends"
        );
        assert_eq!(s.purge(101).expect("purge"), vec![State::Failed]);
        assert!(s.get("a").expect("get").is_none());
        assert!(
            s.insert(&job("d", Some("k"))).expect("insert").1,
            "key freed"
        );
    }
}
