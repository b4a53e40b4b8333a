//! The durable job store on one node: a redb database (`server.state_dir/jobs.redb`), one
//! ACID transaction per change, each committed to disk before it is acted on, so a job that
//! was answered `202` survives `kill -9`. Blocking calls: the service runs them off the
//! async workers.
//!
//! Tables: jobs by id (JSON), the id of each idempotency key (per client), and finished jobs
//! by the time their retention ends.

use super::model::Job;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::path::Path;
use std::sync::Arc;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency_keys");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// The store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct JobStoreError(String);

impl JobStoreError {
    pub fn from_message(m: impl Into<String>) -> JobStoreError {
        JobStoreError(m.into())
    }
}

impl From<redb::Error> for JobStoreError {
    fn from(e: redb::Error) -> Self {
        JobStoreError(e.to_string())
    }
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for JobStoreError {
            fn from(e: $t) -> Self {
                JobStoreError(redb::Error::from(e).to_string())
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

impl From<serde_json::Error> for JobStoreError {
    fn from(e: serde_json::Error) -> Self {
        JobStoreError(format!("a stored job does not parse: {e}"))
    }
}

pub struct JobStore {
    db: Arc<Database>,
    /// Changes go to one writer thread, which commits every change waiting at once in one
    /// transaction (a group commit: one disk sync for many submissions).
    writer: Option<std::sync::mpsc::Sender<Box<dyn Op>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for JobStore {
    /// The writer finishes what was queued and lets go of the file.
    fn drop(&mut self) {
        self.writer = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(target: "sluice::jobs", "the job store's writer panicked");
            }
        }
    }
}

/// A change waiting for the writer: made in the open transaction, answered after the commit.
trait Op: Send {
    /// Make the change; what to tell its caller once the commit is known.
    fn run(
        self: Box<Self>,
        txn: &WriteTransaction,
    ) -> Box<dyn FnOnce(Result<(), JobStoreError>) + Send>;
    /// No transaction could be begun.
    fn fail(self: Box<Self>, e: JobStoreError);
}

struct Pending<F, D> {
    change: F,
    done: D,
}

impl<R, F, D> Op for Pending<F, D>
where
    R: Send + 'static,
    F: FnOnce(&WriteTransaction) -> Result<R, JobStoreError> + Send,
    D: FnOnce(Result<R, JobStoreError>) + Send + 'static,
{
    fn run(
        self: Box<Self>,
        txn: &WriteTransaction,
    ) -> Box<dyn FnOnce(Result<(), JobStoreError>) + Send> {
        let result = (self.change)(txn);
        let done = self.done;
        Box::new(move |committed| done(committed.and(result)))
    }

    fn fail(self: Box<Self>, e: JobStoreError) {
        (self.done)(Err(e))
    }
}

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 1024;

fn write_loop(db: Arc<Database>, ops: std::sync::mpsc::Receiver<Box<dyn Op>>) {
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        match db.begin_write() {
            Err(e) => {
                let e = JobStoreError::from(e);
                for op in batch {
                    op.fail(JobStoreError(e.0.clone()));
                }
            }
            Ok(txn) => {
                let answers: Vec<_> = batch.into_iter().map(|op| op.run(&txn)).collect();
                let committed = txn.commit().map_err(JobStoreError::from);
                for answer in answers {
                    answer(match &committed {
                        Ok(()) => Ok(()),
                        Err(e) => Err(JobStoreError(e.0.clone())),
                    });
                }
            }
        }
    }
}

/// The idempotency key of a submission, scoped to its client.
fn key_of(client: Option<&str>, key: &str) -> String {
    format!("{}\u{0}{key}", client.unwrap_or(""))
}

fn read_job(
    jobs: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<Job>, JobStoreError> {
    let stored = jobs.get(id)?;
    Ok(stored
        .map(|v| serde_json::from_slice::<Job>(v.value()))
        .transpose()?)
}

/// Store a new job, unless its idempotency key already names one: then that job is returned
/// and nothing is stored (`false`). In the writer's one transaction, so two racing
/// submissions with one key get one job.
fn insert_in(txn: &WriteTransaction, job: &Job) -> Result<(Job, bool), JobStoreError> {
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
    if let Some(id) = existing {
        if let Some(old) = read_job(&jobs, &id)? {
            return Ok((old, false));
        }
    }
    jobs.insert(job.id.as_str(), serde_json::to_vec(job)?.as_slice())?;
    if let Some(k) = &key {
        keys.insert(k.as_str(), job.id.as_str())?;
    }
    Ok((job.clone(), true))
}

/// Change a job: `f` sees the stored job and returns what to keep (or `None` to leave it as
/// it was). A job left with nothing to do is kept until `expires_at`.
fn update_in<R>(
    txn: &WriteTransaction,
    id: &str,
    expires_at: u64,
    mut f: impl FnMut(&mut Job) -> Option<R>,
) -> Result<Option<(Job, R)>, JobStoreError> {
    let mut jobs = txn.open_table(JOBS)?;
    let Some(mut job) = read_job(&jobs, id)? else {
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
    Ok(Some((job, r)))
}

/// Delete jobs whose retention ended before `now` (Unix ms); their states.
fn purge_in(txn: &WriteTransaction, now: u64) -> Result<Vec<super::model::State>, JobStoreError> {
    let mut expiry = txn.open_table(EXPIRY)?;
    let mut jobs = txn.open_table(JOBS)?;
    let mut keys = txn.open_table(KEYS)?;
    let due: Vec<(u64, String)> = expiry
        .range((0, "")..(now, ""))?
        .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_string())))
        .collect::<Result<_, _>>()?;
    let mut gone = Vec::new();
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
    Ok(gone)
}

impl JobStore {
    /// Open (or make) the store in `dir`, its page cache at most `cache_bytes`. Fails while
    /// another process holds it.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<JobStore, JobStoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| JobStoreError(format!("cannot make {}: {e}", dir.display())))?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(dir.join("jobs.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(KEYS)?;
        txn.open_table(EXPIRY)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (writer, ops) = std::sync::mpsc::channel();
        let for_writer = db.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-job-store".into())
            .spawn(move || write_loop(for_writer, ops))
            .map_err(|e| JobStoreError(format!("cannot start the store's writer: {e}")))?;
        Ok(JobStore {
            db,
            writer: Some(writer),
            thread: Some(thread),
        })
    }

    fn queue<R: Send + 'static>(
        &self,
        change: impl FnOnce(&WriteTransaction) -> Result<R, JobStoreError> + Send + 'static,
        done: impl FnOnce(Result<R, JobStoreError>) + Send + 'static,
    ) {
        let op: Box<dyn Op> = Box::new(Pending { change, done });
        let sent = match &self.writer {
            Some(w) => w.send(op).map_err(|std::sync::mpsc::SendError(op)| op),
            None => Err(op),
        };
        if let Err(op) = sent {
            op.fail(JobStoreError("the store's writer has stopped".into()));
        }
    }

    /// A change, committed (with whatever else is waiting) before it answers.
    pub async fn write<R: Send + 'static>(
        &self,
        change: impl FnOnce(&WriteTransaction) -> Result<R, JobStoreError> + Send + 'static,
    ) -> Result<R, JobStoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue(change, move |r| {
            // The caller may have gone; the change stands either way.
            let _ = tx.send(r);
        });
        rx.await
            .map_err(|_| JobStoreError("the store's writer dropped a change".into()))?
    }

    /// As `write`, for a blocking caller.
    #[cfg(test)]
    pub fn write_blocking<R: Send + 'static>(
        &self,
        change: impl FnOnce(&WriteTransaction) -> Result<R, JobStoreError> + Send + 'static,
    ) -> Result<R, JobStoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.queue(change, move |r| {
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| JobStoreError("the store's writer dropped a change".into()))?
    }

    pub async fn insert(&self, job: Job) -> Result<(Job, bool), JobStoreError> {
        self.write(move |txn| insert_in(txn, &job)).await
    }

    pub async fn update<R: Send + 'static>(
        &self,
        id: &str,
        expires_at: u64,
        f: impl FnMut(&mut Job) -> Option<R> + Send + 'static,
    ) -> Result<Option<(Job, R)>, JobStoreError> {
        let id = id.to_string();
        self.write(move |txn| update_in(txn, &id, expires_at, f))
            .await
    }

    pub async fn purge(&self, now: u64) -> Result<Vec<super::model::State>, JobStoreError> {
        self.write(move |txn| purge_in(txn, now)).await
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, JobStoreError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        read_job(&jobs, id)
    }

    /// Every job (to take up again after a start).
    pub fn all(&self) -> Result<Vec<Job>, JobStoreError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in jobs.iter()? {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
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
        let insert =
            |s: &JobStore, j: Job| s.write_blocking(move |t| insert_in(t, &j)).expect("insert");
        {
            let s = JobStore::open(dir.path(), 1 << 20).expect("open");
            assert!(insert(&s, job("a", Some("k"))).1);
            let (same, new) = insert(&s, job("b", Some("k")));
            assert_eq!((same.id.as_str(), new), ("a", false));
            assert!(insert(&s, job("c", None)).1);
            s.write_blocking(|t| {
                update_in(t, "a", 100, |j| {
                    j.state = State::Failed;
                    j.finished = Some(5);
                    Some(())
                })
            })
            .expect("update");
        }
        let s = JobStore::open(dir.path(), 1 << 20).expect("reopen");
        let all = s.all().expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(s.get("a").expect("get").expect("a").state, State::Failed);
        let purge = |s: &JobStore, now| s.write_blocking(move |t| purge_in(t, now)).expect("purge");
        assert!(purge(&s, 50).is_empty(), "kept until its retention ends");
        assert_eq!(purge(&s, 101), vec![State::Failed]);
        assert!(s.get("a").expect("get").is_none());
        assert!(insert(&s, job("d", Some("k"))).1, "key freed");
    }

    #[test]
    fn many_changes_waiting_at_once_are_one_commit_and_each_gets_its_answer() {
        let dir = tempfile::tempdir().expect("dir");
        let s = std::sync::Arc::new(JobStore::open(dir.path(), 1 << 20).expect("open"));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for n in 0..50 {
                        let j = job(&format!("j{t}-{n}"), Some(&format!("k{}", n % 10)));
                        s.write_blocking(move |tx| insert_in(tx, &j))
                            .expect("insert");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(
            s.all().expect("all").len(),
            10,
            "one job per key, however raced"
        );
    }
}
