//! A fleet of sluice processes sharing one Redis (started by each test on a free port): the
//! fleet holds a host's limit together, one node's 429 pauses every node, and losing Redis
//! falls back to each node's share of the limit without failing a request.
//!
//! Without `redis-server` the tests say why they are skipped and pass, unless
//! `SLUICE_REQUIRE_REDIS=1` (set by CI), when they fail.

mod support;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::redis::Redis;
use support::*;

/// These tests count requests over real time: one at a time, so they do not compete for the
/// machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Three sluice processes sharing `redis`, pacing the upstream's host at `rps = 10, burst = 1`.
fn fleet(redis: &Redis, up: &FakeUpstream, shared_extra: &str) -> Vec<Sluice> {
    fleet_on(&format!("\"{}\"", redis.url()), up, shared_extra)
}

/// As `fleet`, with `redis_url` given as TOML (a string, or a list of cluster seeds).
fn fleet_on(redis_url: &str, up: &FakeUpstream, shared_extra: &str) -> Vec<Sluice> {
    let config = format!(
        "[shared]\nbackend = \"redis\"\nredis_url = {redis_url}\nheartbeat = \"250ms\"\n{shared_extra}\n\
         [hosts.\"127.0.0.1:{}\"]\nrps = 10.0\nburst = 1\n",
        up.port()
    );
    let nodes: Vec<Sluice> = (0..3).map(|_| Sluice::start("", &config)).collect();
    for n in &nodes {
        assert_eventually!(
            status(n)["shared"]["live_nodes"] == 3,
            "every node counts three live nodes: {}",
            status(n)
        );
    }
    nodes
}

fn status(node: &Sluice) -> serde_json::Value {
    let (_, body) = node.admin_get("/status");
    serde_json::from_str(&body).expect("status json")
}

/// Saturating demand: `per_node` clients on each node, each sending one request after the
/// other until `run` is over. Returns (node, status) of every answer.
fn saturate(
    nodes: &[Sluice],
    up: &FakeUpstream,
    per_node: usize,
    run: Duration,
) -> Vec<(usize, u16)> {
    let clients: Vec<reqwest::Client> = nodes.iter().map(|n| proxied_client(n, None)).collect();
    let url = format!("http://127.0.0.1:{}/work", up.port());
    runtime(2).block_on(async {
        let stop = Instant::now() + run;
        let mut tasks = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            for _ in 0..per_node {
                let (client, url) = (client.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while Instant::now() < stop {
                        let status = match client
                            .get(&url)
                            .header("x-node", i.to_string())
                            .send()
                            .await
                        {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => 0,
                        };
                        answers.push((i, status));
                    }
                    answers
                }));
            }
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    })
}

/// Upstream arrivals as (node, offset from `start`).
fn arrivals(up: &FakeUpstream, start: Instant) -> Vec<(usize, Duration)> {
    let mut v: Vec<(usize, Duration)> = up
        .requests()
        .iter()
        .map(|r| {
            let node = r
                .header("x-node")
                .and_then(|n| n.parse().ok())
                .unwrap_or(99);
            (node, r.at.saturating_duration_since(start))
        })
        .collect();
    v.sort_by_key(|(_, at)| *at);
    v
}

fn count_between(arr: &[(usize, Duration)], from: Duration, to: Duration) -> usize {
    arr.iter().filter(|(_, at)| *at >= from && *at < to).count()
}

#[test]
fn three_nodes_hold_one_limit_together() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::builder().start();
    let nodes = fleet(&redis, &up, "");
    let started = Instant::now();
    let answers = saturate(&nodes, &up, 6, Duration::from_secs(10));
    assert!(
        answers.iter().all(|(_, s)| *s == 200),
        "every request answered 200"
    );
    let arr = arrivals(&up, started);
    let first = arr.first().map(|a| a.1).expect("requests arrived");
    let total = count_between(&arr, first, first + Duration::from_secs(10));
    // 10/s for 10 s (plus the burst of 1): 100 +/- 10%, not 300.
    let per_node: Vec<usize> = (0..3)
        .map(|i| arr.iter().filter(|(n, _)| *n == i).count())
        .collect();
    eprintln!("fleet: {total} requests in 10 s at the upstream, by node {per_node:?}");
    assert!((90..=110).contains(&total), "{total} requests in 10 s");
    for i in 0..3 {
        let mine = arr.iter().filter(|(n, _)| *n == i).count();
        assert!(
            mine >= 15,
            "node {i} sent only {mine}: the limit is shared, not taken by one node"
        );
    }
    // The calls to Redis are bounded by the pace, not by the 18 waiting clients.
    let calls: f64 = nodes
        .iter()
        .map(|n| n.metric("sluice_shared_redis_calls_total{op=\"acquire\"}"))
        .sum();
    assert!(
        calls < 800.0,
        "{calls} acquire calls for about 100 requests in 10 s"
    );
    for n in &nodes {
        assert_eq!(status(n)["shared"]["breaker"], "closed");
    }
}

/// A node that holds a share of a host's pace estimates a request's wait at its own share,
/// not at the host's whole pace: a burst it cannot serve within the requests' deadline is
/// refused at once, with the wait in `Retry-After`, instead of waiting out the deadline.
#[test]
fn a_burst_beyond_a_nodes_share_is_refused_at_once() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::builder().start();
    let nodes = fleet(&redis, &up, "");
    let url = format!("http://127.0.0.1:{}/burst", up.port());
    let answers = std::thread::scope(|scope| {
        // Nodes 0 and 1 at their shares (about 5/s each).
        scope.spawn(|| drive(&nodes[0], 0, &up, 3, Duration::from_secs(6)));
        scope.spawn(|| drive(&nodes[1], 1, &up, 3, Duration::from_secs(6)));
        std::thread::sleep(Duration::from_secs(3));
        let client = proxied_client(&nodes[0], None);
        runtime(2).block_on(async {
            let sent: Vec<_> = (0..20)
                .map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let r = client
                            .get(&url)
                            .header("x-node", "0")
                            .header("sluice-timeout", "1s")
                            .send()
                            .await
                            .expect("answer");
                        let error = r
                            .headers()
                            .get("sluice-error")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        (r.status().as_u16(), error, started.elapsed())
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in sent {
                all.push(t.await.expect("request"));
            }
            all
        })
    });
    let served = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
    let slow = refused
        .iter()
        .filter(|(_, _, took)| *took > Duration::from_millis(300))
        .count();
    eprintln!(
        "fleet: of a burst of 20 at a node with half of 10/s, {served} served, {} refused \
         ({slow} after more than 300 ms)",
        refused.len()
    );
    assert_eq!(served + refused.len(), 20, "{answers:?}");
    assert!(served <= 8, "{served} served within 1 s at about 5/s");
    assert!(
        refused
            .iter()
            .all(|(_, e, _)| matches!(e.as_deref(), Some("rate_limited" | "deadline"))),
        "{refused:?}"
    );
    assert!(slow <= 2, "{slow} refusals waited: {refused:?}");
}

/// The lease script itself, against a real Redis: max-min fair shares over the stated
/// demands, never more than the other leases leave free; a share given back is free for the
/// others; a pause and a learned limit written by any node reach a node when it renews (even
/// one that missed them on the event channel); the fleet's bucket holds only what the leases
/// leave.
#[test]
fn the_lease_script_shares_fairly_and_carries_pauses_and_limits() {
    use sluice::fleet::{redis::RedisStore, Store};
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let store = RedisStore::new(&[&redis.url()], "t", Duration::from_secs(2), None).expect("store");
    let (host, lasts) = ("api.test:443", Duration::from_secs(3));
    runtime(1).block_on(async {
        let share = |node: &'static str, pace: f64, demand: f64| {
            let store = &store;
            async move {
                store
                    .share(host, node, pace, demand, lasts)
                    .await
                    .expect("share")
            }
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-3;
        // Alone, a node gets what it asks for, up to the pace.
        let a = share("a", 10.0, 3.0).await;
        assert!(close(a.rate, 3.0) && close(a.fair, 3.0), "{a:?}");
        let a = share("a", 10.0, 50.0).await;
        assert!(close(a.rate, 10.0), "{a:?}");
        // A second node's fair share is half, but only what the first leaves is free.
        let b = share("b", 10.0, 10.0).await;
        assert!(close(b.fair, 5.0) && close(b.rate, 0.0), "{b:?}");
        assert_eq!((b.rank, b.leases), (1, 2));
        // The first renews: it keeps its half; the second then gets the other.
        let a = share("a", 10.0, 10.0).await;
        assert!(close(a.rate, 5.0), "{a:?}");
        let b = share("b", 10.0, 10.0).await;
        assert!(close(b.rate, 5.0), "{b:?}");
        // A third with a small demand gets all of it (max-min), the others split the rest.
        let c = share("c", 10.0, 1.0).await;
        assert!(
            close(c.fair, 1.0) && close(c.rate, 0.0),
            "only what is free: {c:?}"
        );
        let a = share("a", 10.0, 10.0).await;
        assert!(close(a.fair, 4.5) && close(a.rate, 4.5), "{a:?}");
        let c = share("c", 10.0, 1.0).await;
        assert!(close(c.rate, 0.5), "what a left free: {c:?}");
        // The fleet's bucket holds nothing while the leases hold the whole pace.
        let grant = store
            .acquire(host, "d", 1, 100_000, 1)
            .await
            .expect("acquire");
        assert_eq!(grant.granted, 0, "{grant:?}");
        // Given back, a share is free for the others.
        let gone = share("b", 10.0, 0.0).await;
        assert!(close(gone.rate, 0.0) && gone.lasts.is_zero(), "{gone:?}");
        let a = share("a", 10.0, 10.0).await;
        assert!(close(a.rate, 9.0) && close(a.fair, 9.0), "{a:?}");
        // A pause and a learned limit reach a node with its next renewal.
        store
            .pause(host, Duration::from_secs(2), 100_000, 1)
            .await
            .expect("pause");
        store
            .learn(host, Some(200_000), Some(3))
            .await
            .expect("learn");
        let a = share("a", 10.0, 10.0).await;
        assert!(
            a.paused_for > Duration::from_millis(1_500) && a.paused_for <= Duration::from_secs(2),
            "{a:?}"
        );
        assert_eq!((a.interval_us, a.max_concurrent), (200_000, Some(3)));
        assert!(
            close(a.rate, 4.0) && close(a.fair, 4.0),
            "a share of the learned 5/s: {a:?}"
        );
    });
}

/// `clients` clients sending one request after the other through `node` (numbered `index` in
/// the `x-node` header) until `run` is over. Returns the status of every answer.
fn drive(
    node: &Sluice,
    index: usize,
    up: &FakeUpstream,
    clients: usize,
    run: Duration,
) -> Vec<u16> {
    let client = proxied_client(node, None);
    let url = format!("http://127.0.0.1:{}/work", up.port());
    runtime(2).block_on(async {
        let stop = Instant::now() + run;
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while Instant::now() < stop {
                        let sent = client.get(&url).header("x-node", index.to_string());
                        answers.push(sent.send().await.map_or(0, |r| r.status().as_u16()));
                    }
                    answers
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    })
}

/// How shares move when demand moves. A node alone at the limit leases the whole pace; a
/// second node that starts sending states its demand and, short of its fair share, asks the
/// first (on the event channel) to renew its lease: within about a second each has half. Once
/// the second stops, it gives its share back after a second without requests and tells the
/// first, which has the whole pace again within about two seconds. Waiting requests never ask
/// Redis: the round trips are a few lease renewals, not one per request.
#[test]
fn shares_follow_demand_between_nodes() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::builder().start();
    let nodes = fleet(&redis, &up, "");
    let started = Instant::now();
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| drive(&nodes[0], 0, &up, 4, Duration::from_secs(16)));
        std::thread::sleep(Duration::from_secs(5));
        let b = scope.spawn(|| drive(&nodes[1], 1, &up, 4, Duration::from_secs(6)));
        (
            a.join().expect("node 0's clients"),
            b.join().expect("node 1's clients"),
        )
    });
    assert!(
        a.iter().chain(&b).all(|s| *s == 200),
        "every request answered 200"
    );
    let arr = arrivals(&up, started);
    let secs = Duration::from_secs_f64;
    let sent = |node: usize, from: f64, to: f64| {
        arr.iter()
            .filter(|(n, at)| *n == node && *at >= secs(from) && *at < secs(to))
            .count()
    };
    let alone = sent(0, 2.0, 5.0);
    let (mine, theirs) = (sent(0, 6.5, 10.5), sent(1, 6.5, 10.5));
    let again = sent(0, 13.0, 16.0);
    let trips: f64 = nodes
        .iter()
        .map(|n| {
            n.metric("sluice_shared_redis_calls_total{op=\"share\"}")
                + n.metric("sluice_shared_redis_calls_total{op=\"acquire\"}")
        })
        .sum();
    eprintln!(
        "fleet: node 0 alone {alone} in 3 s; both {mine} + {theirs} in 4 s; node 0 alone again \
         {again} in 3 s; {trips} share and acquire round trips for {} requests",
        arr.len()
    );
    assert!(
        (26..=34).contains(&alone),
        "alone, node 0 sent {alone} in 3 s (10/s)"
    );
    assert!(
        (16..=24).contains(&mine),
        "node 0 sent {mine} in 4 s beside node 1 (5/s)"
    );
    assert!(
        (16..=24).contains(&theirs),
        "node 1 sent {theirs} in 4 s (5/s)"
    );
    assert!(
        mine.max(theirs) as f64 <= mine.min(theirs) as f64 * 1.2 + 1.0,
        "equal demand, shares within 20%: {mine} and {theirs}"
    );
    assert!(
        (26..=34).contains(&again),
        "alone again, node 0 sent {again} in 3 s"
    );
    assert!(
        trips < arr.len() as f64 * 0.5,
        "{trips} round trips for {} requests",
        arr.len()
    );
    for n in &nodes[..2] {
        let node = status(n);
        assert_eq!(node["shared"]["breaker"], "closed");
    }
}

/// What fair shares between callers mean in a fleet: each node hands the slots it gets from
/// the fleet in fair order among its own callers. Caller `a` sends through all three nodes,
/// caller `b` through node 0 only, with the same demand on node 0.
#[test]
fn callers_share_each_nodes_slots_fairly_in_a_fleet() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::builder().start();
    let nodes = fleet(&redis, &up, "");
    let clients: Vec<reqwest::Client> = nodes.iter().map(|n| proxied_client(n, None)).collect();
    let url = format!("http://127.0.0.1:{}/work", up.port());
    let started = Instant::now();
    let run = Duration::from_secs(10);
    let answers = runtime(2).block_on(async {
        let stop = Instant::now() + run;
        let mut tasks = Vec::new();
        let mut spawn = |client: reqwest::Client, node: usize, caller: &'static str| {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < stop {
                    let r = client
                        .get(&url)
                        .header("x-node", node.to_string())
                        .header("x-caller", caller)
                        .header("Sluice-Caller", caller)
                        .header("Sluice-Timeout", "5s")
                        .send()
                        .await;
                    statuses.push(r.map_or(0, |r| r.status().as_u16()));
                }
                statuses
            }));
        };
        for (i, client) in clients.iter().enumerate() {
            for _ in 0..6 {
                spawn(client.clone(), i, "a");
            }
        }
        for _ in 0..6 {
            spawn(clients[0].clone(), 0, "b");
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });
    let other: Vec<&u16> = answers
        .iter()
        .filter(|s| **s != 200 && **s != 429)
        .collect();
    assert!(other.is_empty(), "no answer but 200 or 429: {other:?}");
    let seen = up.requests();
    let count = |node: &str, caller: &str| {
        seen.iter()
            .filter(|r| {
                r.at.saturating_duration_since(started) >= Duration::from_secs(1)
                    && r.header("x-node") == Some(node)
                    && r.header("x-caller") == Some(caller)
            })
            .count()
    };
    let (a0, b0) = (count("0", "a"), count("0", "b"));
    let a_all = a0 + count("1", "a") + count("2", "a");
    eprintln!("figure: node 0: a {a0}, b {b0}; fleet: a {a_all}, b {b0} (a on 3 nodes, b on 1)");
    // On node 0, a and b split that node's slots evenly.
    assert!(
        a0.abs_diff(b0) * 4 <= a0 + b0,
        "node 0 splits fairly: a {a0}, b {b0}"
    );
    // Across the fleet, a caller on three nodes gets a share on each.
    assert!(a_all > 2 * b0, "a {a_all}, b {b0}");
}

/// `max_concurrent_per_caller` in a fleet counts a caller's requests on every node: caller `a`
/// sends 6 at once through each of three nodes, and the upstream never has more than 2 of
/// them in flight; caller `b` is served meanwhile.
#[test]
fn the_per_caller_cap_holds_across_the_fleet() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::builder()
        .route(
            "/slow",
            Reply::text(200, "ok").latency(Duration::from_millis(300)),
        )
        .start();
    let config = format!(
        "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\nheartbeat = \"250ms\"\n\
         [hosts.\"127.0.0.1:{}\"]\nrps = 1000.0\nburst = 100\nmax_concurrent_per_caller = 2\n",
        redis.url(),
        up.port()
    );
    let nodes: Vec<Sluice> = (0..3).map(|_| Sluice::start("", &config)).collect();
    let clients: Vec<reqwest::Client> = nodes.iter().map(|n| proxied_client(n, None)).collect();
    let url = format!("http://127.0.0.1:{}/slow", up.port());
    let (a, b) = runtime(2).block_on(async {
        let mut tasks = Vec::new();
        for client in &clients {
            for _ in 0..6 {
                let (client, url) = (client.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let r = client
                        .get(&url)
                        .header("Sluice-Caller", "a")
                        .header("x-caller", "a")
                        .send()
                        .await;
                    r.map_or(0, |r| r.status().as_u16())
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let b = clients[1]
            .get(&url)
            .header("Sluice-Caller", "b")
            .header("x-caller", "b")
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        let b_took = started.elapsed();
        let mut a = Vec::new();
        for t in tasks {
            a.push(t.await.expect("task"));
        }
        (a, (b, b_took))
    });
    assert!(a.iter().all(|s| *s == 200), "{a:?}");
    assert_eq!(b.0, 200);
    let mut at: Vec<Instant> = up
        .requests()
        .iter()
        .filter(|r| r.header("x-caller") == Some("a"))
        .map(|r| r.at)
        .collect();
    at.sort();
    assert_eq!(at.len(), 18);
    let closest = at.windows(3).map(|w| w[2] - w[0]).min().expect("arrivals");
    eprintln!(
        "figure: fleet cap 2: a's 18 requests over {:?}, closest three arrivals {closest:?} apart; b took {:?}",
        at[17] - at[0],
        b.1
    );
    // Never a third of a's requests while two are in flight (each takes 300 ms).
    assert!(
        closest >= Duration::from_millis(290),
        "three of a's requests in flight at once: {closest:?}"
    );
    assert!(b.1 < Duration::from_secs(1), "b waited {:?}", b.1);
    let places: f64 = nodes
        .iter()
        .map(|n| n.metric("sluice_shared_redis_calls_total{op=\"place\"}"))
        .sum();
    assert!(
        places >= 36.0,
        "each of a's requests took and gave back a place: {places}"
    );
}

#[test]
fn a_429_at_one_node_pauses_the_whole_fleet() {
    let _serial = serial();
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "ok").fail_first(1, 429).retry_after("2"),
        )
        .start();
    let nodes = fleet(&redis, &up, "");
    let started = Instant::now();
    let answers = saturate(&nodes, &up, 4, Duration::from_secs(4));
    assert!(
        answers.iter().all(|(_, s)| *s == 200),
        "the 429 was sent again after the pause"
    );
    let arr = arrivals(&up, started);
    assert!(arr.len() >= 10, "{arr:?}");
    let (_, first) = arr[0];
    let (_, second) = arr[1];
    eprintln!(
        "fleet: nothing reached the upstream for {:?} after the 429",
        second - first
    );
    assert!(
        second - first >= Duration::from_millis(1_950),
        "no node sent anything during the 2 s pause: {:?}",
        &arr[..4]
    );
    // After the pause, the fleet resumes at its pace, not in a burst.
    let resumed = count_between(&arr, second, second + Duration::from_secs(1));
    assert!(
        resumed <= 12,
        "{resumed} requests in the second after the pause"
    );
    for (i, n) in nodes.iter().enumerate() {
        assert!(
            n.metric("sluice_shared_events_total{kind=\"pause\"}") >= 1.0,
            "node {i} heard of the pause"
        );
    }
}

#[test]
fn losing_redis_falls_back_to_each_nodes_share_and_recovers() {
    let _serial = serial();
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let up = FakeUpstream::builder().start();
    let nodes = fleet(
        &redis,
        &up,
        "on_error = \"local\"\nbreaker = { failure_threshold = 3, recovery_timeout = \"1s\", success_threshold = 2 }\n",
    );
    let started = Instant::now();
    let run = std::thread::scope(|scope| {
        let load = scope.spawn(|| saturate(&nodes, &up, 4, Duration::from_secs(13)));
        std::thread::sleep(Duration::from_secs(4));
        let killed_at = started.elapsed();
        redis.kill();
        for (i, n) in nodes.iter().enumerate() {
            assert_eventually!(
                status(n)["shared"]["breaker"] != "closed",
                "node {i}: the breaker opened"
            );
        }
        assert!(nodes
            .iter()
            .all(
                |n| n.metric("sluice_shared_breaker_state{state=\"open\"}") == 1.0
                    || n.metric("sluice_shared_breaker_state{state=\"half_open\"}") == 1.0
            ));
        std::thread::sleep(Duration::from_secs(4));
        let restarted_at = started.elapsed();
        redis.restart();
        for (i, n) in nodes.iter().enumerate() {
            assert_eventually!(
                status(n)["shared"]["breaker"] == "closed",
                "node {i}: the breaker closed again: {}",
                status(n)
            );
        }
        let closed_at = started.elapsed();
        let fallback_then: f64 = nodes
            .iter()
            .map(|n| n.metric("sluice_shared_fallback_total{on_error=\"local\"}"))
            .sum();
        let leased_then: f64 = nodes
            .iter()
            .map(|n| n.metric("sluice_shared_tokens_leased_total"))
            .sum();
        let answers = load.join().expect("load");
        (
            answers,
            killed_at,
            restarted_at,
            closed_at,
            fallback_then,
            leased_then,
        )
    });
    let (answers, killed_at, restarted_at, closed_at, fallback_then, leased_then) = run;
    let failed: Vec<_> = answers.iter().filter(|(_, s)| *s != 200).collect();
    assert!(failed.is_empty(), "no client request fails: {failed:?}");
    let arr = arrivals(&up, started);
    // While Redis was away (leaving the first half second to the breaker): each node at a
    // third of the limit, the fleet near it.
    let from = killed_at + Duration::from_millis(500);
    let span = restarted_at - from;
    let expected = span.as_secs_f64() * 10.0;
    let total = count_between(&arr, from, restarted_at) as f64;
    let shares: Vec<usize> = (0..3)
        .map(|i| {
            arr.iter()
                .filter(|(n, at)| *n == i && *at >= from && *at < restarted_at)
                .count()
        })
        .collect();
    eprintln!(
        "fleet: {total} requests in {span:?} without Redis (expected about {expected:.0}), by node {shares:?}"
    );
    assert!(
        (expected * 0.75..=expected * 1.25 + 2.0).contains(&total),
        "{total} requests in {span:?} without Redis (expected about {expected})"
    );
    for i in 0..3 {
        let mine = arr
            .iter()
            .filter(|(n, at)| *n == i && *at >= from && *at < restarted_at)
            .count() as f64;
        assert!(
            (expected / 3.0 * 0.6..=expected / 3.0 * 1.4 + 1.0).contains(&mine),
            "node {i} sent {mine} without Redis (its share: about {})",
            expected / 3.0
        );
    }
    // Back on Redis: shared pacing resumes (tokens leased again, no more fallback).
    let after = count_between(&arr, closed_at, closed_at + Duration::from_secs(2)) as f64;
    eprintln!("fleet: {after} requests in the 2 s after the breakers closed");
    assert!(
        (14.0..=24.0).contains(&after),
        "{after} requests in 2 s after recovery"
    );
    let fallback_now: f64 = nodes
        .iter()
        .map(|n| n.metric("sluice_shared_fallback_total{on_error=\"local\"}"))
        .sum();
    let leased_now: f64 = nodes
        .iter()
        .map(|n| n.metric("sluice_shared_tokens_leased_total"))
        .sum();
    assert!(
        fallback_then > 0.0,
        "the fallback paced requests while Redis was away"
    );
    assert!(
        fallback_now - fallback_then <= 3.0,
        "the fallback stopped once the breaker closed: {fallback_then} -> {fallback_now}"
    );
    assert!(
        leased_now - leased_then >= 10.0,
        "tokens leased again: {leased_then} -> {leased_now}"
    );
}

#[test]
fn throttle_refuses_with_503_while_redis_is_away() {
    let _serial = serial();
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let up = FakeUpstream::builder().start();
    let host = format!("127.0.0.1:{}", up.port());
    let node = Sluice::start(
        "",
        &format!(
            "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\non_error = \"throttle\"\n\
             breaker = {{ failure_threshold = 1, recovery_timeout = \"30s\", success_threshold = 1 }}\n\
             [hosts.\"{host}\"]\nrps = 100.0\n",
            redis.url()
        ),
    );
    let get = |path: &str| {
        let started = Instant::now();
        let raw = raw_exchange(
            node.proxy,
            format!(
                "GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("exchange");
        (split_response(&raw), started.elapsed())
    };
    assert_eq!((get("/a").0).0, 200);
    redis.kill();
    let ((status, head, body), took) = get("/b");
    assert_eq!(status, 503, "{head}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("shared_state_unavailable")
    );
    assert!(body.contains("shared_state_unavailable"), "{body}");
    assert!(
        took < Duration::from_millis(500),
        "no wait on a dead Redis: {took:?}"
    );
    assert_eq!(status_of(&node)["shared"]["breaker"], "open");
    assert!(node.metric("sluice_shared_redis_errors_total") >= 1.0);
    assert_eq!(up.count(), 1);
}

fn status_of(node: &Sluice) -> serde_json::Value {
    status(node)
}

/// A three-node Redis Cluster (no replicas) of this test, on free ports; stopped when dropped.
struct Cluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        // Only when the single server is there too (same package); it says why it skips.
        drop(Redis::start()?);
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for p in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (cluster node)");
            nodes.push(child);
        }
        let cluster = Cluster {
            nodes,
            ports,
            _dir: dir,
        };
        for p in &cluster.ports {
            let r = Redis {
                child: None,
                port: *p,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !r.ping() {
                assert!(Instant::now() < deadline, "cluster node {p} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &cluster.ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &cluster.ports {
            assert_eventually!(
                Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok")),
                "cluster node {p} reports cluster_state:ok"
            );
        }
        Some(cluster)
    }

    fn urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"redis://127.0.0.1:{p}\""))
            .collect();
        format!("[{}]", urls.join(", "))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            if let Err(e) = c.kill() {
                eprintln!("stopping a cluster node: {e}");
            }
            if let Err(e) = c.wait() {
                eprintln!("waiting for a cluster node: {e}");
            }
        }
    }
}

#[test]
fn a_redis_cluster_holds_the_limit_and_carries_pauses() {
    let _serial = serial();
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "ok").fail_first(1, 429).retry_after("1"),
        )
        .start();
    let nodes = fleet_on(&cluster.urls_toml(), &up, "");
    let started = Instant::now();
    let answers = saturate(&nodes, &up, 4, Duration::from_secs(6));
    assert!(
        answers.iter().all(|(_, s)| *s == 200),
        "every request answered 200"
    );
    let arr = arrivals(&up, started);
    let (_, first) = arr[0];
    let (_, second) = arr[1];
    eprintln!(
        "cluster: nothing reached the upstream for {:?} after the 429",
        second - first
    );
    assert!(
        second - first >= Duration::from_millis(950),
        "the 429's 1 s pause held across the cluster: {:?}",
        &arr[..3]
    );
    // From the end of the pause: 10/s for the fleet, not 30.
    let total = count_between(&arr, second, second + Duration::from_secs(4));
    eprintln!("cluster: {total} requests in the 4 s after the pause");
    assert!((36..=46).contains(&total), "{total} requests in 4 s");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(status(n)["shared"]["breaker"], "closed", "node {i}");
        assert!(
            n.metric("sluice_shared_events_total{kind=\"pause\"}") >= 1.0,
            "node {i} heard of the pause through the cluster"
        );
    }
}

/// A `redis-server` speaking only TLS, with the test CA's certificate; stopped when dropped.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(ca: &TestCa) -> Option<TlsRedis> {
        drop(Redis::start()?);
        let dir = ca.dir.path();
        std::fs::write(dir.join("redis.crt"), &ca.cert_pem).expect("write cert");
        std::fs::write(dir.join("redis.key"), &ca.key_pem).expect("write key");
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &dir.join("redis.crt").display().to_string(),
            ])
            .args([
                "--tls-key-file",
                &dir.join("redis.key").display().to_string(),
            ])
            .args(["--tls-ca-cert-file", &ca.ca_path().display().to_string()])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (TLS)");
        let r = TlsRedis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "TLS redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("stopping redis-server (TLS): {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("waiting for redis-server (TLS): {e}");
        }
    }
}

#[test]
fn rediss_is_verified_against_the_configured_ca() {
    let _serial = serial();
    let ca = TestCa::new();
    let Some(redis) = TlsRedis::start(&ca) else {
        return;
    };
    let up = FakeUpstream::builder().start();
    let node_with = |ca_line: &str| {
        Sluice::start(
            "",
            &format!(
                "[shared]\nbackend = \"redis\"\nredis_url = \"rediss://localhost:{}\"\n\
                 on_error = \"local\"\ntimeout = \"500ms\"\n{ca_line}\n\
                 breaker = {{ failure_threshold = 1, recovery_timeout = \"30s\", success_threshold = 1 }}\n\
                 [hosts.\"127.0.0.1:{}\"]\nrps = 50.0\nburst = 5\n",
                redis.port,
                up.port()
            ),
        )
    };
    let get = |node: &Sluice| {
        let raw = raw_exchange(
            node.proxy,
            format!(
                "GET http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
                p = up.port()
            )
            .as_bytes(),
        )
        .expect("exchange");
        split_response(&raw).0
    };

    // Trusting the test CA: shared pacing over TLS.
    let trusted = node_with(&format!("tls_ca_file = \"{}\"", ca.ca_path().display()));
    for _ in 0..3 {
        assert_eq!(get(&trusted), 200);
    }
    assert!(trusted.metric("sluice_shared_redis_calls_total") >= 1.0);
    assert_eq!(trusted.metric("sluice_shared_redis_errors_total"), 0.0);
    assert_eq!(status(&trusted)["shared"]["breaker"], "closed");

    // With only the system roots, the server's certificate is refused: the breaker opens and
    // requests are still served (on_error = local).
    let untrusted = node_with("");
    for _ in 0..3 {
        assert_eq!(get(&untrusted), 200);
    }
    assert_eventually!(
        status(&untrusted)["shared"]["breaker"] == "open",
        "an unverified Redis is not used: {}",
        status(&untrusted)
    );
    assert!(untrusted.metric("sluice_shared_redis_errors_total") >= 1.0);
}

#[test]
fn the_breaker_closes_within_one_recovery_timeout_of_redis_returning() {
    let _serial = serial();
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let up = FakeUpstream::builder().start();
    let node = Sluice::start(
        "",
        &format!(
            "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\nheartbeat = \"250ms\"\n\
             timeout = \"200ms\"\non_error = \"local\"\n\
             breaker = {{ failure_threshold = 1, recovery_timeout = \"2s\", success_threshold = 2 }}\n",
            redis.url()
        ),
    );
    assert_eventually!(
        status(&node)["shared"]["breaker"] == "closed",
        "closed at start"
    );
    redis.kill();
    assert_eventually!(status(&node)["shared"]["breaker"] == "open", "opened");
    // Away long enough for probes to fail against the dead server.
    std::thread::sleep(Duration::from_secs(5));
    assert!(node.metric("sluice_shared_breaker_transitions_total{to=\"half_open\"}") >= 1.0);
    redis.restart();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    while status(&node)["shared"]["breaker"] != "closed" {
        assert!(Instant::now() < deadline, "not closed: {}", status(&node));
        std::thread::sleep(Duration::from_millis(20));
    }
    // One recovery timeout (2 s) for the next probe, plus the probes themselves.
    let took = back.elapsed();
    eprintln!("breaker closed {took:?} after Redis returned");
    assert!(
        took < Duration::from_millis(2600),
        "closed {took:?} after Redis returned"
    );
    // And requests pace through Redis again.
    let raw = raw_exchange(
        node.proxy,
        format!(
            "GET http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
            p = up.port()
        )
        .as_bytes(),
    )
    .expect("answer");
    assert_eq!(split_response(&raw).0, 200);
}

#[test]
fn a_dropped_connection_is_retried_before_it_counts_against_the_breaker() {
    let _serial = serial();
    let Some(redis) = Redis::start() else {
        return;
    };
    let up = FakeUpstream::builder().start();
    // One failure would open the breaker.
    let node = Sluice::start(
        "",
        &format!(
            "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\ntimeout = \"500ms\"\n\
             on_error = \"local\"\n\
             breaker = {{ failure_threshold = 1, recovery_timeout = \"30s\", success_threshold = 1 }}\n\
             retry = {{ max_retries = 2, delay = \"5ms\", backoff = 2.0 }}\n\
             [hosts.\"127.0.0.1:{p}\"]\nrps = 100.0\nburst = 1\n",
            redis.url(),
            p = up.port()
        ),
    );
    let get = || {
        let raw = raw_exchange(
            node.proxy,
            format!(
                "GET http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
                p = up.port()
            )
            .as_bytes(),
        )
        .expect("answer");
        split_response(&raw).0
    };
    assert_eq!(get(), 200);
    assert_eventually!(status(&node)["shared"]["breaker"] == "closed", "closed");
    for round in 0..3 {
        // Redis drops every client connection (as a restart or a proxy in front of it would).
        let killed = Command::new("redis-cli")
            .args([
                "-p",
                &redis.port.to_string(),
                "CLIENT",
                "KILL",
                "TYPE",
                "normal",
            ])
            .output()
            .expect("redis-cli");
        assert!(killed.status.success(), "round {round}");
        assert_eq!(get(), 200, "round {round}");
    }
    assert_eq!(
        status(&node)["shared"]["breaker"],
        "closed",
        "{}",
        status(&node)
    );
    assert_eq!(
        node.metric("sluice_shared_breaker_transitions_total{to=\"open\"}"),
        0.0
    );
    assert!(node.metric("sluice_shared_redis_retries_total") >= 1.0);
    assert_eq!(
        node.metric("sluice_shared_fallback_total{on_error=\"local\"}"),
        0.0
    );
}
