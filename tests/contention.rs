//! Many callers at one host, over real sockets: fair shares between callers, weights,
//! priorities, the per-caller in-flight cap, and the deadline rule (no request admitted that
//! its deadline would cut after it was sent).

mod support;

use sha2::Digest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// These tests measure pacing in real time: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn sha256_hex(secret: &str) -> String {
    format!("{:x}", sha2::Sha256::digest(secret.as_bytes()))
}

/// One GET through the forward proxy with these headers: (status, Retry-After, elapsed).
async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<u64>, Duration) {
    let started = Instant::now();
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("response");
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    (status, retry_after, started.elapsed())
}

#[test]
fn a_callers_one_request_does_not_wait_behind_anothers_flood() {
    let _serial = serial();
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", "[defaults]\nrps = 2.0\n");
    let client = proxied_client(&sluice, None);
    let url = format!("http://127.0.0.1:{}/x", up.port());
    let b = runtime(2).block_on(async {
        for _ in 0..30 {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                get(&client, &url, &[("Sluice-Caller", "a"), ("x-caller", "a")]).await
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        get(&client, &url, &[("Sluice-Caller", "b")]).await
    });
    eprintln!("figure: b answered after {:?} behind a's 30", b.2);
    assert_eq!(b.0, 200);
    assert!(
        b.2 < Duration::from_millis(1500),
        "b waited {:?} behind a's 30 requests",
        b.2
    );
    let from_a = up
        .requests()
        .iter()
        .filter(|r| r.header("x-caller") == Some("a"))
        .count();
    assert!(from_a < 30, "b did not wait for a's backlog");
}

/// Each caller keeps `workers` requests outstanding until `until`; counts its 200s.
async fn saturate(
    client: reqwest::Client,
    url: String,
    headers: Vec<(String, String)>,
    workers: usize,
    until: Instant,
) -> usize {
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, headers, ok) = (client.clone(), url.clone(), headers.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let (status, _, _) = get(&client, &url, &h).await;
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    ok.load(Ordering::Relaxed)
}

/// Upstream arrivals by the `x-caller` header, in `[from, to)` after the first arrival.
fn arrivals_by_caller(up: &FakeUpstream, from: Duration, to: Duration) -> HashMap<String, usize> {
    let seen = up.requests();
    let Some(first) = seen.iter().map(|r| r.at).min() else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for r in &seen {
        let t = r.at - first;
        if t >= from && t < to {
            let who = r.header("x-caller").unwrap_or("?").to_string();
            *out.entry(who).or_insert(0) += 1;
        }
    }
    out
}

#[test]
fn weights_share_a_saturated_host_in_proportion() {
    let _serial = serial();
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 20.0\nburst = 1\n\
             [[clients]]\nname = \"heavy\"\ntoken_sha256 = \"{}\"\nweight = 3\n\
             [[clients]]\nname = \"light\"\ntoken_sha256 = \"{}\"\n",
            sha256_hex("tok-heavy"),
            sha256_hex("tok-light")
        ),
    );
    let client = |token: &str| {
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(sluice.proxy_url())
                    .expect("proxy")
                    .custom_http_auth(format!("Bearer {token}").parse().expect("value")),
            )
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    };
    let url = format!("http://127.0.0.1:{}/w", up.port());
    let until = Instant::now() + Duration::from_secs(21);
    let (heavy, light) = runtime(2).block_on(async {
        let h = tokio::spawn(saturate(
            client("tok-heavy"),
            url.clone(),
            vec![("x-caller".into(), "heavy".into())],
            16,
            until,
        ));
        let l = tokio::spawn(saturate(
            client("tok-light"),
            url.clone(),
            vec![("x-caller".into(), "light".into())],
            16,
            until,
        ));
        (h.await.expect("heavy"), l.await.expect("light"))
    });
    // Over 20 s of saturation (the first second left out while the queues fill).
    let by = arrivals_by_caller(&up, Duration::from_secs(1), Duration::from_secs(21));
    let (h, l) = (by["heavy"] as f64, by["light"] as f64);
    let ratio = h / l;
    eprintln!("figure: heavy {h} : light {l} = {ratio:.3} over 20 s");
    assert!(
        (2.7..=3.3).contains(&ratio),
        "heavy {h} : light {l} = {ratio:.2} (answered {heavy} : {light})"
    );
    let total = h + l;
    assert!(
        (360.0..=420.0).contains(&total),
        "the host's pace holds: {total} in 20 s at 20/s"
    );
}

#[test]
fn low_requests_are_served_while_high_ones_keep_arriving() {
    let _serial = serial();
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", "[defaults]\nrps = 10.0\nburst = 1\n");
    let client = proxied_client(&sluice, None);
    let url = format!("http://127.0.0.1:{}/p", up.port());
    let until = Instant::now() + Duration::from_secs(8);
    let header = |caller: &str, priority: &str| {
        vec![
            ("Sluice-Caller".to_string(), caller.to_string()),
            ("Sluice-Priority".to_string(), priority.to_string()),
            ("x-caller".to_string(), caller.to_string()),
        ]
    };
    runtime(2).block_on(async {
        let hi = tokio::spawn(saturate(
            client.clone(),
            url.clone(),
            header("hi", "high"),
            12,
            until,
        ));
        let lo = tokio::spawn(saturate(
            client.clone(),
            url.clone(),
            header("lo", "low"),
            12,
            until,
        ));
        hi.await.expect("high");
        lo.await.expect("low");
    });
    let by = arrivals_by_caller(&up, Duration::from_secs(1), Duration::from_secs(8));
    let (hi, lo) = (by["hi"], by.get("lo").copied().unwrap_or(0));
    eprintln!("figure: high {hi}, low {lo} over 7 s");
    // High goes first; low, passed over, still gets one slot in five.
    assert!(hi > 3 * lo, "high first: {hi} high, {lo} low");
    assert!(lo * 6 >= hi + lo, "low is not starved: {lo} of {}", hi + lo);
    assert!(
        sluice.metric("sluice_caller_queue_wait_seconds_count{caller=\"other\",priority=\"low\"}")
            > 0.0
    );
}

#[test]
fn the_per_caller_cap_holds_while_another_caller_is_served() {
    let _serial = serial();
    let up = FakeUpstream::builder()
        .route(
            "/slow",
            Reply::text(200, "ok").latency(Duration::from_millis(400)),
        )
        .start();
    let sluice = Sluice::start(
        "",
        "[defaults]\nrps = 1000.0\nburst = 100\nmax_concurrent_per_caller = 2\n",
    );
    let client = proxied_client(&sluice, None);
    let url = format!("http://127.0.0.1:{}/slow", up.port());
    let (a, b) = runtime(2).block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                get(&client, &url, &[("Sluice-Caller", "a"), ("x-caller", "a")]).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The host's queue by caller, as an operator sees it.
        let (_, body) = sluice.admin_get("/status");
        let status: serde_json::Value = serde_json::from_str(&body).expect("status json");
        let line = status["hosts"]
            .as_array()
            .and_then(|hosts| {
                hosts
                    .iter()
                    .find(|h| h["host"] == format!("127.0.0.1:{}", up.port()))
            })
            .map(|h| h["callers"].clone())
            .expect("the host in /status");
        assert_eq!(line[0]["caller"], "a", "{line}");
        assert_eq!(line[0]["in_flight"], 2, "{line}");
        assert_eq!(line[0]["waiting"], 18, "{line}");
        assert_eq!(
            sluice.metric("sluice_caller_waiting{caller=\"other\"}"),
            18.0
        );
        let b = get(&client, &url, &[("Sluice-Caller", "b"), ("x-caller", "b")]).await;
        let mut a = Vec::new();
        for t in tasks {
            a.push(t.await.expect("a"));
        }
        (a, b)
    });
    assert_eq!(b.0, 200);
    assert!(b.2 < Duration::from_millis(1000), "b waited {:?}", b.2);
    assert!(a.iter().all(|r| r.0 == 200), "{a:?}");
    // a's arrivals at the upstream: never a third while two are in flight (each takes 400 ms).
    let mut at: Vec<Instant> = up
        .requests()
        .iter()
        .filter(|r| r.header("x-caller") == Some("a"))
        .map(|r| r.at)
        .collect();
    at.sort();
    assert_eq!(at.len(), 20);
    for w in at.windows(3) {
        assert!(
            w[2] - w[0] >= Duration::from_millis(380),
            "three of a's requests in flight at once: {:?} apart",
            w[2] - w[0]
        );
    }
}

#[test]
fn requests_are_refused_before_sending_rather_than_cut_by_their_deadline() {
    let _serial = serial();
    let up = FakeUpstream::builder()
        .route(
            "/d",
            Reply::text(200, "ok").latency(Duration::from_millis(20)),
        )
        .start();
    let sluice = Sluice::start("", "[defaults]\nrps = 10.0\nburst = 1\n");
    let url = format!("http://127.0.0.1:{}/d", up.port());
    let until = Instant::now() + Duration::from_secs(10);
    let outcomes = runtime(2).block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..12 {
            // Keep-alive clients that honour Retry-After, as SDKs do.
            let client = proxied_client(&sluice, None);
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while Instant::now() < until {
                    let (status, retry_after, took) =
                        get(&client, &url, &[("Sluice-Timeout", "1s")]).await;
                    seen.push((status, retry_after, took));
                    if status == 429 {
                        let secs = retry_after.unwrap_or(1).min(5);
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                    }
                }
                seen
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client"));
        }
        all
    });
    let ok = outcomes.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = outcomes.iter().filter(|(s, _, _)| *s == 429).collect();
    let other: Vec<_> = outcomes
        .iter()
        .filter(|(s, _, _)| *s != 200 && *s != 429)
        .collect();
    let slowest_refusal = refused.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    assert!(
        other.is_empty(),
        "answers other than 200 and 429: {other:?}"
    );
    eprintln!(
        "figure: {ok} answered 200, {} refused 429 before sending (the slowest after {:?}), {} other; upstream saw {}",
        refused.len(),
        slowest_refusal,
        other.len(),
        up.requests().len()
    );
    assert!(
        refused.iter().all(|(_, ra, _)| ra.is_some()),
        "every 429 says when to come back"
    );
    // Refused at once, not after waiting for a slot that could not be used.
    assert!(
        slowest_refusal < Duration::from_millis(300),
        "a refusal took {slowest_refusal:?}"
    );
    assert!(ok >= 50, "the host's pace is used: {ok} answered");
    assert_eq!(
        up.requests().len(),
        ok,
        "the upstream saw only requests whose answers reached a client"
    );
}
