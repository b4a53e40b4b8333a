//! The fleet's job store (`[shared] backend = "redis"`): jobs as JSON strings, the tasks due
//! now in a Redis Stream read by one consumer group (every node a consumer), tasks due later
//! in a sorted set moved into the stream when due. A node acknowledges a task (`XACK`) when it
//! is done; a task left unacknowledged by a node that died is claimed by another after
//! `jobs.claim_after` (`XAUTOCLAIM`), while a live node keeps the tasks it works on (`XCLAIM`
//! of its own, which resets their idle time). Changes to a job are compare-and-set, so two
//! nodes never overwrite each other's.

use super::model::Job;
use super::store::JobStoreError;
use super::Task;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Script};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

const GROUP: &str = "sluice";
/// A stream entry that only wakes the nodes' feeds (read, it is acknowledged and dropped).
const WAKE: &str = "wake";

fn redis_error(e: redis::RedisError) -> JobStoreError {
    JobStoreError::from_message(format!("redis: {e}"))
}

pub struct RedisJobStore {
    client: redis::Client,
    conn: ConnectionManager,
    /// Key of one job: `{prefix}:jobs:job:{id}`. Every key shares the `{prefix}:jobs` hash tag.
    prefix: String,
    /// This node's name in the consumer group.
    pub consumer: String,
    pub claim_after: Duration,
    /// Stream entries this node is working on.
    pub in_flight: Mutex<HashSet<String>>,
    /// Wakes this node's feed from a blocked read: a task was scheduled here for before the
    /// read's end, or the node is stopping.
    pub wake: tokio::sync::Notify,
    /// When this node's feed is next to look at what is due (Unix ms): the end of its blocked
    /// read; `u64::MAX` between reads (it looks at its next round, after any wake); 0 when
    /// the feed is not running (stopping, or not started).
    pub blocked_until: std::sync::atomic::AtomicU64,
    insert: Script,
    cas: Script,
    mover: Script,
}

impl RedisJobStore {
    pub async fn connect(
        url: &str,
        prefix: &str,
        consumer: &str,
        claim_after: Duration,
    ) -> Result<RedisJobStore, JobStoreError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(redis_error)?;
        let store = RedisJobStore {
            client,
            conn,
            prefix: format!("{{{prefix}:jobs}}"),
            consumer: consumer.to_string(),
            claim_after,
            in_flight: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
            blocked_until: std::sync::atomic::AtomicU64::new(0),
            insert: Script::new(include_str!("lua/insert.lua")),
            cas: Script::new(include_str!("lua/cas.lua")),
            mover: Script::new(include_str!("lua/move_due.lua")),
        };
        let made: Result<(), redis::RedisError> = store
            .conn
            .clone()
            .xgroup_create_mkstream(store.stream(), GROUP, "0")
            .await;
        match made {
            Ok(()) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(redis_error(e)),
        }
        Ok(store)
    }

    fn stream(&self) -> String {
        format!("{}:tasks", self.prefix)
    }

    fn due(&self) -> String {
        format!("{}:due", self.prefix)
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn idem_key(&self, job: &Job) -> String {
        match &job.call.idempotency_key {
            Some(k) => format!(
                "{}:key:{}\u{0}{k}",
                self.prefix,
                job.client.as_deref().unwrap_or("")
            ),
            None => String::new(),
        }
    }

    pub async fn insert(&self, job: &Job) -> Result<(Job, bool), JobStoreError> {
        let json = serde_json::to_string(job)?;
        let (new, stored): (i64, String) = self
            .insert
            .key(self.job_key(&job.id))
            .key(self.idem_key(job))
            .arg(&job.id)
            .arg(&json)
            .arg(format!("{}:job:", self.prefix))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok((serde_json::from_str(&stored)?, new == 1))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>, JobStoreError> {
        let text: Option<String> = self
            .conn
            .clone()
            .get(self.job_key(id))
            .await
            .map_err(redis_error)?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// Change a job: read, change, write if nobody wrote meanwhile (else again). A job left
    /// with nothing to do expires after `retention`.
    pub async fn update<R>(
        &self,
        id: &str,
        retention: Duration,
        mut f: impl FnMut(&mut Job) -> Option<R>,
    ) -> Result<Option<(Job, R)>, JobStoreError> {
        for _ in 0..32 {
            let key = self.job_key(id);
            let old: Option<String> = self.conn.clone().get(&key).await.map_err(redis_error)?;
            let Some(old) = old else { return Ok(None) };
            let mut job: Job = serde_json::from_str(&old)?;
            let Some(r) = f(&mut job) else {
                return Ok(None);
            };
            let ttl = if job.done() {
                super::spec::millis(retention).max(1)
            } else {
                0
            };
            let written: i64 = self
                .cas
                .key(&key)
                .key(self.idem_key(&job))
                .arg(&old)
                .arg(serde_json::to_string(&job)?)
                .arg(ttl)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
            if written == 1 {
                return Ok(Some((job, r)));
            }
        }
        Err(JobStoreError::from_message(format!(
            "job {id}: too many concurrent changes"
        )))
    }

    /// Make `task` due at `at` (Unix ms): in the stream now, or in the sorted set until then.
    pub async fn schedule(&self, at: u64, now: u64, task: &Task) -> Result<(), JobStoreError> {
        let text = encode(task);
        let mut c = self.conn.clone();
        if at <= now {
            let _: String = c
                .xadd(self.stream(), "*", &[("task", text)])
                .await
                .map_err(redis_error)?;
        } else {
            let _: i64 = c.zadd(self.due(), text, at).await.map_err(redis_error)?;
            // This node's feed, to look past `at`, looks again now. Without a running feed
            // (stopping), the other nodes are told through the stream, unless they look
            // before `at` anyway.
            let looks = self
                .blocked_until
                .load(std::sync::atomic::Ordering::Acquire);
            if looks == 0 {
                if at < now.saturating_add(super::service::IDLE_BLOCK.as_millis() as u64) {
                    let _: String = c
                        .xadd(self.stream(), "*", &[("task", WAKE)])
                        .await
                        .map_err(redis_error)?;
                }
            } else if at < looks {
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// Move tasks that are due into the stream; what is left: the next due time (Unix ms)
    /// and the backlog (tasks in the stream, tasks due later).
    pub async fn move_due(&self, now: u64) -> Result<Moved, JobStoreError> {
        let (_, next, in_stream, later): (i64, i64, u64, u64) = self
            .mover
            .key(self.due())
            .key(self.stream())
            .arg(now)
            .arg(256)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(Moved {
            next_due: u64::try_from(next).ok(),
            backlog: (in_stream, later),
        })
    }

    /// A connection of its own for blocking reads (a blocked read would hold up every other
    /// command on the shared one), whose answers may take `longest_block` and a margin; and
    /// its client id (to end a blocked read: `unblock`).
    pub async fn reader(
        &self,
        longest_block: Duration,
    ) -> Result<(MultiplexedConnection, i64), JobStoreError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(longest_block + Duration::from_secs(2)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_error)?;
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok((conn, id))
    }

    /// End the blocked read of the reading connection `id` now, as if its time were up: it
    /// answers what it got, and the connection stays usable.
    pub async fn unblock(&self, id: i64) -> Result<(), JobStoreError> {
        let _: i64 = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// New tasks for this node (blocking up to `block`).
    pub async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, Task)>, JobStoreError> {
        let options = StreamReadOptions::default()
            .group(GROUP, &self.consumer)
            .count(count)
            .block(block.as_millis() as usize);
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[self.stream()], &[">"], &options)
            .await
            .map_err(redis_error)?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let text: Option<String> = entry.get("task");
                match text.as_deref().and_then(decode) {
                    Some(task) => out.push((entry.id, task)),
                    None => self.ack(&entry.id).await?,
                }
            }
        }
        Ok(out)
    }

    /// Tasks another node took and left unacknowledged for `claim_after` (it died).
    pub async fn claim_abandoned(
        &self,
        count: usize,
    ) -> Result<Vec<(String, Task)>, JobStoreError> {
        let reply: StreamAutoClaimReply = self
            .conn
            .clone()
            .xautoclaim_options(
                self.stream(),
                GROUP,
                &self.consumer,
                self.claim_after.as_millis() as u64,
                "0-0",
                StreamAutoClaimOptions::default().count(count),
            )
            .await
            .map_err(redis_error)?;
        let mut out = Vec::new();
        for entry in reply.claimed {
            let text: Option<String> = entry.get("task");
            match text.as_deref().and_then(decode) {
                Some(task) => out.push((entry.id, task)),
                None => self.ack(&entry.id).await?,
            }
        }
        Ok(out)
    }

    /// Keep this node's tasks in progress its own (their idle time starts again).
    pub async fn keep(&self) -> Result<(), JobStoreError> {
        let ids: Vec<String> = match self.in_flight.lock() {
            Ok(s) => s.iter().cloned().collect(),
            Err(_) => return Ok(()),
        };
        if ids.is_empty() {
            return Ok(());
        }
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(self.stream())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(0)
            .arg(&ids)
            .arg("JUSTID")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    pub async fn ack(&self, entry: &str) -> Result<(), JobStoreError> {
        let mut c = self.conn.clone();
        let _: i64 = c
            .xack(self.stream(), GROUP, &[entry])
            .await
            .map_err(redis_error)?;
        let _: i64 = c.xdel(self.stream(), &[entry]).await.map_err(redis_error)?;
        Ok(())
    }
}

/// What `move_due` left: when the next task is due, and the fleet's backlog.
pub struct Moved {
    /// Unix ms; `None`: nothing is due later.
    pub next_due: Option<u64>,
    /// Tasks in the stream (not yet acknowledged), and due later.
    pub backlog: (u64, u64),
}

fn encode(task: &Task) -> String {
    match task {
        Task::Call(id) => format!("c:{id}"),
        Task::Deliver(id, n) => format!("d:{n}:{id}"),
    }
}

fn decode(text: &str) -> Option<Task> {
    if let Some(id) = text.strip_prefix("c:") {
        return Some(Task::Call(id.to_string()));
    }
    let (n, id) = text.strip_prefix("d:")?.split_once(':')?;
    Some(Task::Deliver(id.to_string(), n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_read_back_as_written() {
        for t in [Task::Call("job_1".into()), Task::Deliver("job_2".into(), 3)] {
            assert_eq!(decode(&encode(&t)), Some(t));
        }
        assert_eq!(decode("x:1"), None);
        assert_eq!(decode("d:a:job"), None);
    }
}
