//! Jobs over real sockets: accepted with `202`, called through the pipeline, results delivered
//! to signed webhooks with a quorum, none lost to `kill -9`, none sent twice unless safe.

mod support;

use serde_json::{json, Value};
use sluice::jobs::sign;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn key() -> Vec<u8> {
    sluice::config::secret_key(SECRET).expect("key")
}

/// Webhook and job settings fast enough for a test.
fn jobs_config(extra: &str) -> String {
    format!(
        "[webhooks]\ndelivery_ttl = \"20s\"\nbackoff_base = \"50ms\"\nbackoff_max = \"300ms\"\n\
         timeout = \"2s\"\n[webhooks.secrets]\nmain = \"{SECRET}\"\n{extra}"
    )
}

async fn submit(client: &reqwest::Client, sluice: &Sluice, body: Value) -> (u16, Value) {
    let r = client
        .post(format!("{}/_sluice/v1/jobs", sluice.proxy_url()))
        .json(&body)
        .send()
        .await
        .expect("submit");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn job(client: &reqwest::Client, sluice: &Sluice, id: &str) -> Value {
    client
        .get(format!("{}/_sluice/v1/jobs/{id}", sluice.proxy_url()))
        .send()
        .await
        .expect("get job")
        .json()
        .await
        .expect("job json")
}

/// Wait until every job is in one of `states` (at most `secs`); their last views.
async fn until_all(
    client: &reqwest::Client,
    sluice: &Sluice,
    ids: &[String],
    states: &[&str],
    secs: u64,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let mut views = Vec::new();
        for id in ids {
            views.push(job(client, sluice, id).await);
        }
        let done = views
            .iter()
            .all(|v| states.contains(&v["state"].as_str().unwrap_or("")));
        if done {
            return views;
        }
        if Instant::now() > deadline {
            let left: Vec<_> = views
                .iter()
                .filter(|v| !states.contains(&v["state"].as_str().unwrap_or("")))
                .take(3)
                .collect();
            panic!(
                "jobs not {states:?} after {secs} s: {left:?}\n{}",
                sluice.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every delivery a receiver saw: job id -> how many, each signature checked.
fn deliveries(receiver: &FakeUpstream) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in receiver.requests() {
        let id = r.header("webhook-id").expect("webhook-id").to_string();
        let ts: u64 = r
            .header("webhook-timestamp")
            .and_then(|t| t.parse().ok())
            .expect("webhook-timestamp");
        let sig = r.header("webhook-signature").expect("webhook-signature");
        assert!(
            sign::verify(&key(), &id, ts, &r.body, sig),
            "signature of {id} does not verify"
        );
        let body: Value = serde_json::from_slice(&r.body).expect("payload json");
        assert_eq!(
            format!("msg_{}", body["data"]["id"].as_str().unwrap_or("")),
            id
        );
        *seen
            .entry(body["data"]["id"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    seen
}

#[test]
fn a_hundred_jobs_survive_kill_9_and_none_is_sent_twice_unless_safe() {
    let up = FakeUpstream::builder()
        .route(
            "/work",
            Reply::text(200, "done").latency(Duration::from_millis(150)),
        )
        .start();
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let host = format!("127.0.0.1:{}", up.port());
    let mut sluice = Sluice::start(
        "",
        &jobs_config(&format!(
            "[jobs]\nworkers = 8\n[hosts.\"{host}\"]\nrps = 1000.0\nburst = 100\n\
             [hosts.\"127.0.0.1:{}\"]\nrps = 1000.0\nburst = 100\n",
            hook.port()
        )),
    );
    let client = direct_client();
    let rt = rt();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for n in 0..100 {
            // Half can be sent again safely (an idempotency key), half cannot (a bare POST).
            let mut spec = json!({
                "url": format!("http://{host}/work?n={n}"),
                "method": "POST",
                "body": format!("job {n}"),
                "webhooks": [{"url": format!("http://127.0.0.1:{}/hook", hook.port()), "secret": "main"}],
                "metadata": {"n": n},
            });
            if n % 2 == 0 {
                spec["idempotency_key"] = json!(format!("key-{n}"));
            }
            let (status, body) = submit(&client, &sluice, spec).await;
            assert_eq!(status, 202, "{body}");
            ids.push(body["id"].as_str().expect("id").to_string());
        }
        ids
    });
    // Some calls done, some in flight: then no shutdown of any kind.
    assert_eventually!(up.count() >= 20, "calls under way: {}", up.count());
    let before = up.count();
    sluice.crash_and_restart();
    // A new client: the old one's pooled connections died with the process.
    let client = direct_client();
    let views = rt.block_on(until_all(&client, &sluice, &ids, &["delivered"], 60));
    let unknown = views
        .iter()
        .filter(|v| v["outcome"] == "outcome_unknown")
        .count();
    let mut sent: HashMap<String, usize> = HashMap::new();
    for r in up.requests() {
        *sent.entry(r.target.clone()).or_insert(0) += 1;
    }
    for (n, v) in views.iter().enumerate() {
        let times = sent.get(&format!("/work?n={n}")).copied().unwrap_or(0);
        if n % 2 == 1 {
            assert!(times <= 1, "job {n} (no key) sent {times} times");
            // Never sent: only if it was taken into the pipeline just before the crash.
            assert!(
                times == 1 || v["outcome"] == "outcome_unknown",
                "job {n} never sent: {v}"
            );
        } else {
            assert!(times >= 1, "job {n} never sent");
        }
        if v["outcome"] == "outcome_unknown" {
            assert_eq!(n % 2, 1, "only a call that cannot be replayed ends unknown");
        } else {
            assert_eq!(v["result"]["status"], 200, "{v}");
        }
        if n % 2 == 0 {
            assert_eq!(v["idempotency_key"], format!("key-{n}"));
        }
    }
    let seen = deliveries(&hook);
    for id in &ids {
        assert!(
            seen.get(id).copied().unwrap_or(0) >= 1,
            "{id} not delivered"
        );
    }
    println!(
        "crash after {before} calls; {} calls in all for 100 jobs; {unknown} outcome_unknown; \
         {} deliveries",
        up.count(),
        hook.count()
    );
}

/// Every call Redis has served so far (INFO commandstats), but the INFOs themselves.
fn redis_calls(url: &str) -> u64 {
    let client = ::redis::Client::open(url).expect("redis");
    let mut c = client.get_connection().expect("connect");
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .expect("info");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Jobs in a fleet on `redis` whose nodes say they are alive only once a minute (so that
/// what Redis serves is the job service's).
fn quiet_fleet(redis: &support::redis::Redis) -> String {
    jobs_config(&format!(
        "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\nheartbeat = \"60s\"\n",
        redis.url()
    ))
}

/// An idle fleet's job service costs Redis less than one command a second per node: each
/// node blocks on the stream until a task comes or is due, instead of asking every 200 ms.
#[test]
fn an_idle_fleets_job_service_asks_redis_less_than_once_a_second_per_node() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    // Heartbeats once a minute: what is counted is the job service.
    let config = quiet_fleet(&redis);
    let nodes = [Sluice::start("", &config), Sluice::start("", &config)];
    // Settled: connected, the first round of each node done.
    std::thread::sleep(Duration::from_secs(2));
    let before = redis_calls(&redis.url());
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let calls = redis_calls(&redis.url()) - before;
    let per_node_second = calls as f64 / nodes.len() as f64 / window.as_secs_f64();
    println!(
        "figure: idle job service, {} nodes, {}s: {calls} Redis commands = {per_node_second:.2} \
         a second per node",
        nodes.len(),
        window.as_secs()
    );
    assert!(
        per_node_second <= 1.0,
        "{per_node_second:.2} commands a second per node"
    );
    // And it still takes a job at once.
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let client = direct_client();
    rt().block_on(async {
        let (status, v) = submit(
            &client,
            &nodes[1],
            json!({"url": format!("http://127.0.0.1:{}/x", up.port())}),
        )
        .await;
        assert_eq!(status, 202);
        let id = v["id"].as_str().expect("id").to_string();
        let started = Instant::now();
        until_all(&client, &nodes[0], &[id], &["succeeded"], 10).await;
        println!(
            "figure: an idle fleet's job ran after {:?}",
            started.elapsed()
        );
        // A new task wakes the blocked reads at once (not after their 10 s).
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    });
}

/// A task scheduled for later while the node's feed blocks on the stream (a webhook to try
/// again 50-300 ms on) is not left waiting for the block's end.
#[test]
fn in_an_idle_fleet_a_delivery_tried_again_goes_on_time() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok").fail_first(1, 503))
        .start();
    let sluice = Sluice::start("", &quiet_fleet(&redis));
    // Idle: the feed blocks for its longest.
    std::thread::sleep(Duration::from_secs(2));
    let client = direct_client();
    rt().block_on(async {
        let (status, v) = submit(
            &client,
            &sluice,
            json!({
                "url": format!("http://127.0.0.1:{}/x", up.port()),
                "webhooks": [{"url": format!("http://127.0.0.1:{}/hook", hook.port()), "secret": "main"}],
            }),
        )
        .await;
        assert_eq!(status, 202);
        let id = v["id"].as_str().expect("id").to_string();
        let started = Instant::now();
        until_all(&client, &sluice, &[id], &["delivered"], 5).await;
        println!("figure: delivered, once tried again, after {:?}", started.elapsed());
    });
    assert_eq!(hook.count(), 2, "the first try failed, the second went");
}

#[test]
fn in_a_fleet_the_jobs_of_a_node_killed_mid_call_are_finished_by_another() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let up = FakeUpstream::builder()
        .route(
            "/work",
            Reply::text(200, "done").latency(Duration::from_millis(300)),
        )
        .start();
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let host = format!("127.0.0.1:{}", up.port());
    let node = |workers: usize| {
        Sluice::start(
            "",
            &jobs_config(&format!(
                "[jobs]\nworkers = {workers}\nclaim_after = \"1s\"\n\
                 [shared]\nbackend = \"redis\"\nredis_url = \"{}\"\n\
                 [hosts.\"{host}\"]\nrps = 1000.0\nburst = 100\n\
                 [hosts.\"127.0.0.1:{}\"]\nrps = 1000.0\nburst = 100\n",
                redis.url(),
                hook.port()
            )),
        )
    };
    let mut a = node(8);
    let client = direct_client();
    let rt = rt();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for n in 0..40 {
            let mut spec = json!({
                "url": format!("http://{host}/work?n={n}"),
                "method": "POST",
                "webhooks": [{"url": format!("http://127.0.0.1:{}/hook", hook.port()), "secret": "main"}],
            });
            if n % 2 == 0 {
                spec["idempotency_key"] = json!(format!("fleet-{n}"));
            }
            let (status, body) = submit(&client, &a, spec).await;
            assert_eq!(status, 202, "{body}");
            ids.push(body["id"].as_str().expect("id").to_string());
        }
        ids
    });
    // Node a is mid-call on several jobs when it dies; node b was not running yet.
    assert_eventually!(up.count() >= 10, "calls under way: {}", up.count());
    a.kill();
    let before = up.count();
    let b = node(8);
    let client = direct_client();
    let views = rt.block_on(until_all(&client, &b, &ids, &["delivered"], 60));
    let mut sent: HashMap<String, usize> = HashMap::new();
    for r in up.requests() {
        *sent.entry(r.target.clone()).or_insert(0) += 1;
    }
    for (n, v) in views.iter().enumerate() {
        let times = sent.get(&format!("/work?n={n}")).copied().unwrap_or(0);
        if n % 2 == 1 {
            assert!(times <= 1, "job {n} (no key) sent {times} times");
            assert!(
                times == 1 || v["outcome"] == "outcome_unknown",
                "job {n}: {v}"
            );
        } else {
            assert!(times >= 1, "job {n} never sent");
            assert_eq!(v["result"]["status"], 200, "{v}");
        }
    }
    let seen = deliveries(&hook);
    assert!(
        ids.iter().all(|id| seen.contains_key(id)),
        "every job delivered"
    );
    let unknown = views
        .iter()
        .filter(|v| v["outcome"] == "outcome_unknown")
        .count();
    println!(
        "node a killed after {before} calls; node b finished the rest: {} calls for 40 jobs, \
         {unknown} outcome_unknown",
        up.count()
    );
    assert!(b.log().contains("job called"), "node b made calls");
}

/// A node that died after ending a job's call but before handing its webhooks to Redis left
/// the job `succeeded` with its receiver owed, and the call's task unacknowledged: the node
/// that takes the task over delivers the result.
#[test]
fn in_a_fleet_a_called_job_whose_webhooks_were_never_handed_over_is_delivered() {
    let Some(server) = support::redis::Redis::start() else {
        return;
    };
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let now = sluice::jobs::now_ms();
    let job = json!({
        "id": "job_left", "client": null, "created": now, "deadline": now + 60_000,
        "state": "succeeded", "next_at": now, "attempts": 1, "outcome": null,
        "call": {"url": "http://127.0.0.1:9/x", "method": "POST", "headers": [], "body": "",
                 "mode": null, "regions": null, "retry_on": null, "idempotency_key": null},
        "answer": {"status": 200, "headers": [], "body": "", "truncated": false},
        "quorum": 1,
        "deliveries": [{"url": format!("http://127.0.0.1:{}/hook", hook.port()), "secret": "main",
                        "receipt": "pending", "attempts": 0, "last_status": null,
                        "last_error": null, "next_at": now}],
        "metadata": null, "finished": now,
    });
    // Stored as the dead node left it: the job, and its call's task still in the stream.
    let stored: sluice::jobs::Job = serde_json::from_value(job).expect("a job as stored");
    let client = ::redis::Client::open(server.url()).expect("redis");
    let mut conn = client.get_connection().expect("connect");
    let _: () = ::redis::cmd("SET")
        .arg("{sluice:jobs}:job:job_left")
        .arg(serde_json::to_string(&stored).expect("json"))
        .query(&mut conn)
        .expect("set");
    let _: String = ::redis::cmd("XADD")
        .arg("{sluice:jobs}:tasks")
        .arg("*")
        .arg("task")
        .arg("c:job_left")
        .query(&mut conn)
        .expect("xadd");
    let node = Sluice::start(
        "",
        &jobs_config(&format!(
            "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
            server.url()
        )),
    );
    let http = direct_client();
    let v = &rt().block_on(until_all(
        &http,
        &node,
        &["job_left".to_string()],
        &["delivered"],
        15,
    ))[0];
    assert_eq!(v["webhooks"][0]["state"], "acked", "{v}");
    assert_eq!(deliveries(&hook).get("job_left"), Some(&1));
}

#[test]
fn a_quorum_of_two_of_three_is_delivered_and_the_down_receiver_is_tried_until_the_ttl() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let a = FakeUpstream::builder()
        .route("/", Reply::text(204, ""))
        .start();
    let b = FakeUpstream::builder()
        .route("/", Reply::text(200, "thanks"))
        .start();
    let down = free_port();
    // The down receiver's host unpaced: its tries are spaced by the backoff alone (at the
    // 2 rps default, sluice's own retries of each refused connection would take the slots).
    let sluice = Sluice::start(
        "",
        &format!(
            "[webhooks]\ndelivery_ttl = \"2s\"\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n\
             [webhooks.secrets]\nmain = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\
             [hosts.\"127.0.0.1:{down}\"]\nrps = 0.0\n"
        ),
    );
    let client = direct_client();
    rt().block_on(async {
        let hooks: Vec<Value> = [a.port(), b.port(), down]
            .iter()
            .map(|p| json!({"url": format!("http://127.0.0.1:{p}/h"), "secret": "main"}))
            .collect();
        let (status, body) = submit(
            &client,
            &sluice,
            json!({"url": format!("http://127.0.0.1:{}/x", up.port()), "webhooks": hooks, "quorum": 2}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().expect("id").to_string();
        let v = &until_all(&client, &sluice, std::slice::from_ref(&id), &["delivered"], 10).await[0];
        assert_eq!(v["acked"], 2, "{v}");
        // The third receiver is still owed the result: tried again and again until the TTL.
        let deadline = Instant::now() + Duration::from_secs(10);
        let v = loop {
            let v = job(&client, &sluice, &id).await;
            if v["webhooks"][2]["state"] == "gave_up" || Instant::now() > deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(v["state"], "delivered", "{v}");
        assert_eq!(v["webhooks"][2]["state"], "gave_up", "{v}");
        let tries = v["webhooks"][2]["attempts"].as_u64().unwrap_or(0);
        assert!(tries >= 3, "the down receiver was tried {tries} times: {v}");
        println!("down receiver tried {tries} times within the 2 s TTL");
    });
    assert_eq!((a.count(), b.count()), (1, 1), "each live receiver once");
    assert!(sluice.metric("sluice_job_deliveries_total{outcome=\"gave_up\"}") == 1.0);
    assert!(sluice.metric("sluice_jobs_total{state=\"delivered\"}") == 1.0);
}

#[test]
fn a_job_to_a_paused_host_waits_out_the_pause() {
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "ok").fail_first(1, 429).retry_after("3"),
        )
        .start();
    let host = format!("127.0.0.1:{}", up.port());
    // A request may wait 1 s for its host: a 3 s pause is sluice's 429 to a caller.
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"{host}\"]\nmax_queue_wait = \"1s\"\n"),
    );
    let client = direct_client();
    rt().block_on(async {
        let r = client
            .get(format!("{}/first", sluice.proxy_url()))
            .header("Sluice-Target", format!("http://{host}"))
            .send()
            .await
            .expect("first");
        assert_eq!(r.status(), 429, "the host's 429, passed on");
        let (status, body) = submit(
            &client,
            &sluice,
            json!({"url": format!("http://{host}/job")}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().expect("id").to_string();
        let v = &until_all(&client, &sluice, &[id], &["succeeded", "failed"], 15).await[0];
        assert_eq!(v["state"], "succeeded", "{v}");
        assert_eq!(v["result"]["status"], 200);
        assert!(
            v["attempts"].as_u64().unwrap_or(0) >= 2,
            "asked, paused, asked again: {v}"
        );
    });
    let at: Vec<Instant> = up.requests().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 2, "the 429, then the job's call once");
    let waited = at[1] - at[0];
    assert!(
        waited >= Duration::from_millis(2_900),
        "sent {waited:?} after the 429"
    );
    println!("job sent {waited:?} after the host's 429 with Retry-After: 3");
}

#[test]
fn racing_submissions_with_one_idempotency_key_get_one_job() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start("", "");
    let client = direct_client();
    let ids: Vec<String> = runtime(4).block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (client, url) = (client.clone(), sluice.proxy_url());
            let spec = json!({"url": format!("http://127.0.0.1:{}/pay", up.port()), "method": "POST",
                              "idempotency_key": "order-42"});
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(format!("{url}/_sluice/v1/jobs"))
                    .json(&spec)
                    .send()
                    .await
                    .expect("submit");
                assert_eq!(r.status(), 202);
                let v: Value = r.json().await.expect("json");
                v["id"].as_str().expect("id").to_string()
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.expect("task"));
        }
        ids
    });
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eventually!(up.count() == 1, "one call: {}", up.count());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(up.count(), 1, "and only one");
}

#[test]
fn bad_submissions_are_refused_naming_the_field() {
    let sluice = Sluice::start("", &jobs_config(""));
    let client = direct_client();
    rt().block_on(async {
        for (spec, field) in [
            (json!({"url": "http://127.0.0.1:9/x", "webhooks": [{"url": "http://169.254.169.254/latest", "secret": "main"}]}), "webhooks[0].url"),
            (json!({"url": "http://127.0.0.1:9/x", "priority": 1}), "priority"),
            (json!({"url": "http://127.0.0.1:9/x", "webhooks": [{"url": "http://127.0.0.1:9/h", "secret": "whsec_literal"}]}), "webhooks[0].secret"),
            (json!({"method": "GET"}), "url"),
        ] {
            let r = client
                .post(format!("{}/_sluice/v1/jobs", sluice.proxy_url()))
                .json(&spec)
                .send()
                .await
                .expect("submit");
            assert_eq!(r.status(), 400, "{spec}");
            assert_eq!(r.headers()["sluice-error"], "bad_request");
            let body: Value = r.json().await.expect("json");
            let message = body["message"].as_str().unwrap_or("");
            assert!(message.starts_with(field), "{spec}: {message}");
        }
        let r = client
            .get(format!("{}/_sluice/v1/jobs/job_nope", sluice.proxy_url()))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["sluice-error"], "not_found");
        let r = client
            .post(format!("{}/_sluice/v1/jobs", sluice.proxy_url()))
            .body(vec![b'x'; 2 * 1024 * 1024])
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status(), 413);
    });
}

#[test]
fn a_queued_job_can_be_canceled_and_a_finished_one_cannot() {
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "ok").fail_first(1, 429).retry_after("30"),
        )
        .start();
    let host = format!("127.0.0.1:{}", up.port());
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"{host}\"]\nmax_queue_wait = \"1s\"\n"),
    );
    let client = direct_client();
    rt().block_on(async {
        // The first job's call gets the host's 429 (a 30 s pause): it is the job's answer.
        let (_, first) = submit(&client, &sluice, json!({"url": format!("http://{host}/a")})).await;
        let first = first["id"].as_str().expect("id").to_string();
        let v = &until_all(
            &client,
            &sluice,
            std::slice::from_ref(&first),
            &["failed"],
            10,
        )
        .await[0];
        assert_eq!(v["result"]["status"], 429, "{v}");
        // The second waits out the pause in the queue, where it can be canceled.
        let (_, second) =
            submit(&client, &sluice, json!({"url": format!("http://{host}/b")})).await;
        let second = second["id"].as_str().expect("id").to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while job(&client, &sluice, &second).await["outcome"] != "paused" {
            assert!(
                Instant::now() < deadline,
                "the second job never met the pause"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = |id: &str| format!("{}/_sluice/v1/jobs/{id}", sluice.proxy_url());
        let r = client.delete(url(&second)).send().await.expect("delete");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["state"], "canceled", "{v}");
        let r = client.delete(url(&first)).send().await.expect("delete");
        assert_eq!(r.status(), 409);
        assert_eq!(r.headers()["sluice-error"], "job_started");
    });
    assert_eq!(up.count(), 1, "the canceled job was never sent");
}

#[test]
fn a_proxied_request_that_prefers_async_becomes_a_job() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(201, "created").header("X-Order", "7"))
        .start();
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start("", &jobs_config(""));
    let client = direct_client();
    rt().block_on(async {
        let r = client
            .post(format!("{}/orders?x=1", sluice.proxy_url()))
            .header("Sluice-Target", format!("http://127.0.0.1:{}", up.port()))
            .header("Prefer", "respond-async, wait=0")
            .header(
                "Sluice-Webhook",
                format!("http://127.0.0.1:{}/hook", hook.port()),
            )
            .header("Idempotency-Key", "o-7")
            .body("{\"item\": 1}")
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status(), 202);
        let location = r.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        let v: Value = r.json().await.expect("json");
        let id = v["id"].as_str().expect("id").to_string();
        assert_eq!(location, format!("/_sluice/v1/jobs/{id}"));
        let v = &until_all(
            &client,
            &sluice,
            std::slice::from_ref(&id),
            &["delivered"],
            10,
        )
        .await[0];
        assert_eq!(v["result"]["status"], 201, "{v}");
    });
    let sent = &up.requests()[0];
    assert_eq!(sent.target, "/orders?x=1");
    assert_eq!(sent.body, b"{\"item\": 1}");
    assert_eq!(sent.header("idempotency-key"), Some("o-7"));
    assert!(sent.header("prefer").is_none() && sent.header("sluice-webhook").is_none());
    let payload: Value = serde_json::from_slice(&hook.requests()[0].body).expect("payload");
    assert_eq!(payload["type"], "job.succeeded");
    assert_eq!(payload["data"]["status"], 201);
    assert_eq!(deliveries(&hook).len(), 1);
}

#[test]
fn a_webhook_request_that_would_get_sluices_429_becomes_a_job() {
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "ok").fail_first(1, 429).retry_after("2"),
        )
        .start();
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let host = format!("127.0.0.1:{}", up.port());
    let sluice = Sluice::start(
        "",
        &jobs_config(&format!("[hosts.\"{host}\"]\nmax_queue_wait = \"500ms\"\n")),
    );
    let client = direct_client();
    rt().block_on(async {
        let send = |path: &str| {
            client
                .get(format!("{}{path}", sluice.proxy_url()))
                .header("Sluice-Target", format!("http://{host}"))
                .header(
                    "Sluice-Webhook",
                    format!("http://127.0.0.1:{}/hook", hook.port()),
                )
                .send()
        };
        let r = send("/one").await.expect("one");
        assert_eq!(
            r.status(),
            429,
            "the upstream's own 429 is an answer, passed on"
        );
        // Now the host is paused past what a request may wait: a job instead of a refusal.
        let r = send("/two").await.expect("two");
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.expect("json");
        let id = v["id"].as_str().expect("id").to_string();
        let v = &until_all(&client, &sluice, &[id], &["delivered"], 10).await[0];
        assert_eq!(v["result"]["status"], 200, "{v}");
    });
    assert_eq!(up.count(), 2);
}

/// A host with a token budget reads a request's body before admission (to estimate its
/// tokens): one refused for its tokens still becomes a job, with its body.
#[test]
fn a_webhook_request_refused_for_its_tokens_becomes_a_job_with_its_body() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let hook = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let host = format!("127.0.0.1:{}", up.port());
    // 60,000 tokens a minute: 1,000 a second.
    let sluice = Sluice::start(
        "",
        &jobs_config(&format!(
            "[hosts.\"{host}\"]\nmax_queue_wait = \"500ms\"\ntokens_per_minute = 60000\n"
        )),
    );
    let client = direct_client();
    let big = json!({"max_tokens": 59_000, "messages": [{"role": "user", "content": "hi"}]});
    let second = json!({"max_tokens": 1_990, "messages": [{"role": "user", "content": "keep me"}]});
    rt().block_on(async {
        let send = |body: &Value, webhook: bool| {
            let mut r = client
                .post(format!("{}/v1/chat", sluice.proxy_url()))
                .header("Sluice-Target", format!("http://{host}"))
                .json(body);
            if webhook {
                r = r.header(
                    "Sluice-Webhook",
                    format!("http://127.0.0.1:{}/hook", hook.port()),
                );
            }
            r.send()
        };
        let r = send(&big, false).await.expect("big");
        assert_eq!(r.status(), 200);
        // About 1,000 tokens are left: the second needs 2,000, a second away, past its
        // wait of 500 ms.
        let r = send(&second, false).await.expect("refused");
        assert_eq!(r.status(), 429);
        let r = send(&second, true).await.expect("second");
        assert_eq!(r.status(), 202, "a job instead of a refusal");
        let v: Value = r.json().await.expect("json");
        let id = v["id"].as_str().expect("id").to_string();
        let v = &until_all(&client, &sluice, &[id], &["delivered"], 20).await[0];
        assert_eq!(v["result"]["status"], 200, "{v}");
    });
    let sent = up.requests();
    assert_eq!(sent.len(), 2, "the big one and the job's");
    let body: Value = serde_json::from_slice(&sent[1].body).expect("the job's body is JSON");
    assert_eq!(body, second, "the job sent the request's body");
}

#[test]
fn finished_jobs_are_deleted_after_their_retention() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start("", "[jobs]\nretention = \"1s\"\n");
    let client = direct_client();
    rt().block_on(async {
        let (_, v) = submit(
            &client,
            &sluice,
            json!({"url": format!("http://127.0.0.1:{}/x", up.port())}),
        )
        .await;
        let id = v["id"].as_str().expect("id").to_string();
        until_all(
            &client,
            &sluice,
            std::slice::from_ref(&id),
            &["succeeded"],
            10,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client
                .get(format!("{}/_sluice/v1/jobs/{id}", sluice.proxy_url()))
                .send()
                .await
                .expect("get");
            if r.status() == 404 {
                break;
            }
            assert!(Instant::now() < deadline, "still kept after 10 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (_, status) = sluice.admin_get("/status");
    let status: Value = serde_json::from_str(&status).expect("status");
    assert_eq!(
        status["jobs"]["by_state"]["succeeded"], 0,
        "{}",
        status["jobs"]
    );
    assert_eq!(status["jobs"]["open"], true);
}

#[test]
fn with_clients_a_job_needs_a_key_is_seen_by_its_client_only_and_a_410_stops_its_receiver() {
    use sha2::Digest;
    let hex = |t: &str| format!("{:x}", sha2::Sha256::digest(t.as_bytes()));
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let gone = FakeUpstream::builder()
        .route("/", Reply::text(410, "gone"))
        .start();
    let sluice = Sluice::start(
        "",
        &jobs_config(&format!(
            "[[clients]]\nname = \"a\"\ntoken_sha256 = \"{}\"\n\
             [[clients]]\nname = \"b\"\ntoken_sha256 = \"{}\"\n",
            hex("token-a-0123456789"),
            hex("token-b-0123456789")
        )),
    );
    let client = direct_client();
    rt().block_on(async {
        let url = format!("{}/_sluice/v1/jobs", sluice.proxy_url());
        let spec = json!({"url": format!("http://127.0.0.1:{}/x", up.port()),
                          "webhooks": [{"url": format!("http://127.0.0.1:{}/h", gone.port()), "secret": "main"}]});
        let r = client.post(&url).json(&spec).send().await.expect("no key");
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["sluice-error"], "auth_required");
        let r = client
            .post(&url)
            .header("Sluice-Key", "token-a-0123456789")
            .json(&spec)
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.expect("json");
        let id = v["id"].as_str().expect("id").to_string();
        let get = |key: &'static str| {
            client
                .get(format!("{url}/{id}"))
                .header("Sluice-Key", key)
                .send()
        };
        assert_eq!(get("token-b-0123456789").await.expect("b").status(), 404, "not b's job");
        let deadline = Instant::now() + Duration::from_secs(10);
        let v = loop {
            let v: Value = get("token-a-0123456789").await.expect("a").json().await.expect("json");
            if v["state"] == "dead" || Instant::now() > deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(v["state"], "dead", "its only receiver is gone: {v}");
        assert_eq!(v["webhooks"][0]["state"], "gone", "{v}");
        assert_eq!(v["result"]["status"], 200);
    });
    assert_eq!(gone.count(), 1, "a 410 is never tried again");
    assert_eq!(
        sluice.metric("sluice_job_deliveries_total{outcome=\"gone\"}"),
        1.0
    );
    // The call itself passed authentication as client a's (a 200, not sluice's 401).
    assert_eq!(up.count(), 1);
}
