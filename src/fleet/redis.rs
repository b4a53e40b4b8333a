//! The Redis store: one multiplexed connection (reconnecting by itself), the Lua scripts that
//! keep each host's bucket, pause and learned limits atomic, and the subscription that brings
//! other nodes' pauses and limits. Keys carry the host as a hash tag (`sluice:{host:port}:tat`)
//! so every key of one script call lands on one Redis Cluster slot.
//!
//! Timeouts and the breaker are the caller's business (`super::Fleet`); this module only talks.

use super::{parse_event, Grant, Share, Store, StoreError, TokenOp};
use crate::admission::FleetEvent;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Learned limits are kept this long in Redis after the last statement (ms).
const LEARNED_TTL_MS: u64 = 3_600_000;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

enum Target {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

pub struct RedisStore {
    target: Target,
    /// Where events are subscribed (the one URL, or the first seed of a cluster: a cluster
    /// delivers every PUBLISH to every node).
    subscribe_to: redis::Client,
    /// The connection, made on first use and made again after `reset`.
    conn: tokio::sync::Mutex<Option<Conn>>,
    timeout: Duration,
    prefix: String,
    channel: String,
    acquire: Script,
    share: Script,
    give_back: Script,
    pause: Script,
    learn: Script,
    heartbeat: Script,
    place: Script,
    tokens: Script,
    /// Calls sent to Redis (every script invocation and command).
    calls: AtomicU64,
}

/// A Redis error as the store's error.
fn store_error(e: redis::RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

impl RedisStore {
    /// A store for `urls` (one URL, or a cluster's seeds); connects on first use.
    /// `ca_pem`: the CAs trusted for `rediss://` instead of the system roots.
    pub fn new(
        urls: &[&str],
        prefix: &str,
        timeout: Duration,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<RedisStore, StoreError> {
        let first = urls
            .first()
            .ok_or_else(|| StoreError::Redis("no Redis URL".into()))?;
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: ca_pem.clone(),
        };
        let subscribe_to = match &ca_pem {
            Some(_) => redis::Client::build_with_tls(*first, certs()),
            None => redis::Client::open(*first),
        }
        .map_err(store_error)?;
        let target = if urls.len() > 1 {
            let mut builder = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
                .connection_timeout(timeout.max(Duration::from_millis(200)))
                .response_timeout(timeout)
                .retries(0);
            if ca_pem.is_some() {
                builder = builder.certs(certs());
            }
            let cluster = builder.build().map_err(store_error)?;
            Target::Cluster(Box::new(cluster))
        } else {
            Target::Single(Box::new(subscribe_to.clone()))
        };
        Ok(RedisStore {
            target,
            subscribe_to,
            conn: tokio::sync::Mutex::new(None),
            timeout,
            prefix: prefix.to_string(),
            channel: format!("{prefix}:events"),
            acquire: Script::new(include_str!("lua/acquire.lua")),
            give_back: Script::new(include_str!("lua/give_back.lua")),
            pause: Script::new(include_str!("lua/pause.lua")),
            learn: Script::new(include_str!("lua/learn.lua")),
            share: Script::new(include_str!("lua/share.lua")),
            heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
            place: Script::new(include_str!("lua/place.lua")),
            tokens: Script::new(include_str!("lua/tokens.lua")),
            calls: AtomicU64::new(0),
        })
    }

    /// Calls sent to Redis so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let made = match &self.target {
            Target::Single(client) => {
                // No retries inside the manager: the breaker decides when to try again.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
                    .set_response_timeout(Some(self.timeout));
                ConnectionManager::new_lazy_with_config((**client).clone(), config)
                    .map(Conn::Single)
                    .map_err(store_error)?
            }
            Target::Cluster(client) => client
                .get_async_connection()
                .await
                .map(Conn::Cluster)
                .map_err(store_error)?,
        };
        *slot = Some(made.clone());
        Ok(made)
    }

    fn key(&self, host: &str, what: &str) -> String {
        format!("{}:{{{host}}}:{what}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match self.conn().await? {
            Conn::Single(mut c) => invocation.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => invocation.invoke_async(&mut c).await,
        }
        .map_err(store_error)
    }

    /// Follow the event channel until the connection ends (then the caller subscribes again).
    pub async fn follow(&self, on: &(dyn Fn(Heard) + Send + Sync)) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        let connect = self.subscribe_to.get_async_pubsub();
        let mut pubsub = tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| StoreError::Timeout)?
            .map_err(store_error)?;
        pubsub.subscribe(&self.channel).await.map_err(store_error)?;
        tracing::info!(channel = self.channel.as_str(), "following fleet events");
        on(Heard::Following);
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let text: String = match msg.get_payload() {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(error = %e, "unreadable fleet event");
                    continue;
                }
            };
            if let Some(asked) = text.strip_prefix("share ") {
                // `share <host> <node>`: the node short of its share of the host.
                if let Some((host, node)) = asked.rsplit_once(' ') {
                    on(Heard::Share { host, node });
                }
                continue;
            }
            match parse_event(&text) {
                Some(event) => on(Heard::Event(event)),
                None => tracing::debug!(event = text.as_str(), "unknown fleet event"),
            }
        }
        Err(StoreError::Redis("event subscription closed".into()))
    }
}

/// What the event channel brings a node.
pub enum Heard<'a> {
    /// The node follows the channel from now on.
    Following,
    /// Another node's pause or learned limits.
    Event(FleetEvent),
    /// A node short of its fair share of a host asks the others to renew their leases.
    Share { host: &'a str, node: &'a str },
}

#[async_trait]
impl Store for RedisStore {
    async fn acquire(
        &self,
        host: &str,
        node: &str,
        want: u32,
        interval_us: u64,
        burst: u32,
    ) -> Result<Grant, StoreError> {
        let mut inv = self.acquire.prepare_invoke();
        inv.key(self.key(host, "tat"))
            .key(self.key(host, "pause"))
            .key(self.key(host, "limits"))
            .key(self.key(host, "leases"))
            .arg(interval_us)
            .arg(burst)
            .arg(want)
            .arg(node);
        let (granted, due_us, interval_us, max_concurrent, paused_us): (i64, i64, i64, i64, i64) =
            self.run(inv).await?;
        Ok(Grant {
            granted: u32::try_from(granted.max(0)).unwrap_or(0),
            due: Duration::from_micros(due_us.max(0) as u64),
            interval_us: interval_us.max(0) as u64,
            max_concurrent: u32::try_from(max_concurrent).ok(),
            paused_for: Duration::from_micros(paused_us.max(0) as u64),
        })
    }

    async fn share(
        &self,
        host: &str,
        node: &str,
        pace: f64,
        demand: f64,
        lasts: Duration,
    ) -> Result<Share, StoreError> {
        let mut inv = self.share.prepare_invoke();
        inv.key(self.key(host, "leases"))
            .arg(node)
            .arg(format!("{pace:.6}"))
            .arg(format!("{demand:.6}"))
            .arg(lasts.as_micros() as u64)
            .arg(&self.channel)
            .arg(host);
        let answer: Vec<String> = self.run(inv).await?;
        let bad = || StoreError::Redis("unreadable lease".into());
        let [rate, fair, lasts, rank, leases, paused, interval, mc] = &answer[..] else {
            return Err(bad());
        };
        let num = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
        let micros = |s: &str| s.parse::<u64>().map(Duration::from_micros);
        Ok(Share {
            rate: num(rate).ok_or_else(bad)?,
            fair: num(fair).ok_or_else(bad)?,
            lasts: micros(lasts).map_err(|_| bad())?,
            rank: rank.parse().map_err(|_| bad())?,
            leases: leases.parse().map_err(|_| bad())?,
            paused_for: micros(paused).map_err(|_| bad())?,
            interval_us: interval.parse().map_err(|_| bad())?,
            max_concurrent: mc.parse::<i64>().ok().and_then(|m| u32::try_from(m).ok()),
        })
    }

    async fn give_back(&self, host: &str, tokens: u32, interval_us: u64) -> Result<(), StoreError> {
        let mut inv = self.give_back.prepare_invoke();
        inv.key(self.key(host, "tat")).arg(tokens).arg(interval_us);
        self.run::<i64>(inv).await.map(|_| ())
    }

    async fn pause(
        &self,
        host: &str,
        length: Duration,
        interval_us: u64,
        burst: u32,
    ) -> Result<(), StoreError> {
        let mut inv = self.pause.prepare_invoke();
        inv.key(self.key(host, "tat"))
            .key(self.key(host, "pause"))
            .key(self.key(host, "leases"))
            .arg(length.as_micros() as u64)
            .arg(interval_us)
            .arg(burst.max(1))
            .arg(&self.channel)
            .arg(host);
        self.run::<i64>(inv).await.map(|_| ())
    }

    async fn learn(
        &self,
        host: &str,
        interval_us: Option<u64>,
        max_concurrent: Option<u32>,
    ) -> Result<(), StoreError> {
        let mut inv = self.learn.prepare_invoke();
        inv.key(self.key(host, "limits"))
            .key(self.key(host, "leases"))
            .arg(interval_us.map_or(String::new(), |i| i.to_string()))
            .arg(max_concurrent.map_or(String::new(), |m| m.to_string()))
            .arg(LEARNED_TTL_MS)
            .arg(&self.channel)
            .arg(host);
        self.run::<i64>(inv).await.map(|_| ())
    }

    async fn take_place(
        &self,
        host: &str,
        caller: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = self.place.prepare_invoke();
        inv.key(self.key(host, &format!("places:{caller}")))
            .arg("take")
            .arg(holder)
            .arg(cap)
            .arg(ttl.as_millis().max(1) as u64);
        let taken: i64 = self.run(inv).await?;
        Ok(taken == 1)
    }

    async fn give_place(&self, host: &str, caller: &str, holder: &str) -> Result<(), StoreError> {
        let mut inv = self.place.prepare_invoke();
        inv.key(self.key(host, &format!("places:{caller}")))
            .arg("give")
            .arg(holder)
            .arg(0)
            .arg(1);
        self.run::<i64>(inv).await.map(|_| ())
    }

    async fn tokens(
        &self,
        host: &str,
        op: TokenOp,
        buckets: &[(String, [u64; 3])],
        amounts: [i64; 3],
    ) -> Result<i64, StoreError> {
        let mut inv = self.tokens.prepare_invoke();
        let within = match op {
            TokenOp::Reserve(d) => d.as_millis().min(3_600_000) as u64,
            _ => 0,
        };
        inv.arg(op.as_str()).arg(within);
        for a in amounts {
            inv.arg(a);
        }
        for (key, limits) in buckets {
            // Keys under one host share its hash tag: one slot in a Redis Cluster.
            inv.key(self.key(host, key));
            for l in limits {
                inv.arg(*l);
            }
        }
        self.run(inv).await
    }

    async fn heartbeat(&self, node: &str, ttl: Duration, tidy: bool) -> Result<u32, StoreError> {
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key(format!("{}:nodes", self.prefix))
            .arg(node)
            .arg(ttl.as_millis() as u64)
            .arg(u8::from(tidy));
        let n: i64 = self.run(inv).await?;
        Ok(u32::try_from(n.max(1)).unwrap_or(1))
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(format!("{}:nodes", self.prefix)).arg(node);
        match self.conn().await? {
            Conn::Single(mut c) => cmd.query_async::<i64>(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async::<i64>(&mut c).await,
        }
        .map(|_| ())
        .map_err(store_error)
    }

    async fn reset(&self) {
        // A connection that failed may still be waiting out its own reconnection: the next
        // call (the breaker's probe) makes a new one and so learns at once whether Redis is
        // back.
        *self.conn.lock().await = None;
    }

    fn calls(&self) -> u64 {
        RedisStore::calls(self)
    }
}
