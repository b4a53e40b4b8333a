//! Regions over real sockets, with fake upstreams as a host's regions: race, hedge, failover
//! with passive ejection, active health checks, side-effect safety, peer regions and loops.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

const HOST: &str = "api.example.test";

fn rt() -> tokio::runtime::Runtime {
    support::runtime(2)
}

/// A host with regions `a` and `b` at the given ports, pacing off, plus `more` host keys.
fn config(a: u16, b: u16, more: &str) -> String {
    format!(
        "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\n{more}\nregions = [\n  \
         {{ name = \"a\", address = \"127.0.0.1:{a}\" }},\n  \
         {{ name = \"b\", address = \"127.0.0.1:{b}\" }},\n]\n"
    )
}

/// A GET through sluice to the host; (status, Sluice-Region, Sluice-Attempts, body, elapsed).
async fn get(
    sluice: &Sluice,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String, String, Duration) {
    send(sluice, "GET", path, headers, "").await
}

async fn send(
    sluice: &Sluice,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String, String, Duration) {
    let client = direct_client();
    let started = Instant::now();
    let mut req = client
        .request(
            method.parse().expect("method"),
            format!("http://{}{path}", sluice.proxy),
        )
        .header("Sluice-Target", format!("http://{HOST}"))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("response");
    let h = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, region, attempts) = (
        r.status().as_u16(),
        h("sluice-region"),
        h("sluice-attempts"),
    );
    let body = r.text().await.expect("body");
    (status, region, attempts, body, started.elapsed())
}

/// A raw region that reads one request, answers it after `delay` unless the client closes
/// first, and reports whether (and after how long) the client closed.
fn slow_raw_region(delay: Duration) -> (u16, mpsc::Receiver<Option<Duration>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let accepted = Instant::now();
        let mut buf = [0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        s.set_read_timeout(Some(delay)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => {
                tx.send(Some(accepted.elapsed())).ok();
            }
            _ => {
                tx.send(None).ok();
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
                    .ok();
            }
        }
    });
    (port, rx)
}

#[test]
fn race_takes_the_first_answer_and_closes_the_other() {
    let (a, closed) = slow_raw_region(Duration::from_secs(3));
    let b = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "from b").latency(Duration::from_millis(50)),
        )
        .start();
    let sluice = Sluice::start("", &config(a, b.port(), "mode = \"race\""));
    rt().block_on(async {
        let (status, region, attempts, body, elapsed) = get(&sluice, "/x", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(region, "b");
        assert_eq!(body, "from b");
        assert_eq!(attempts, "2");
        eprintln!("race: answered by b in {elapsed:?}");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    });
    let when = closed
        .recv_timeout(Duration::from_secs(5))
        .expect("region a saw its connection end");
    let when = when.expect("region a's connection was closed before it answered");
    eprintln!("race: region a saw its connection closed {when:?} after accepting it");
    assert!(when < Duration::from_secs(2), "closed after {when:?}");
    assert_eq!(b.count(), 1);
    assert_eq!(
        sluice.metric(&format!("sluice_races_total{{host=\"{HOST}\"}}")),
        1.0
    );
}

#[test]
fn hedge_sends_a_duplicate_after_the_delay_and_never_duplicates_a_post() {
    let a = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "from a").latency(Duration::from_secs(2)),
        )
        .start();
    let b = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "from b").latency(Duration::from_millis(20)),
        )
        .start();
    let extra = "mode = \"hedge\"\nhedge_after = \"100ms\"";
    let sluice = Sluice::start("", &config(a.port(), b.port(), extra));
    let order = [("Sluice-Regions", "a,b")];
    rt().block_on(async {
        let (status, region, attempts, body, elapsed) = get(&sluice, "/get", &order).await;
        assert_eq!(
            (status, region.as_str(), body.as_str()),
            (200, "b", "from b")
        );
        assert_eq!(attempts, "2");
        eprintln!("hedge: answered by b in {elapsed:?}");
        assert!(
            elapsed >= Duration::from_millis(100) && elapsed < Duration::from_millis(800),
            "{elapsed:?}"
        );
        assert_eq!(a.count_path("/get"), 1, "a got the first attempt");
        assert_eq!(b.count_path("/get"), 1, "b got the hedge");

        // A POST without Idempotency-Key runs single: one region, once, however slow.
        let (status, region, attempts, body, elapsed) =
            send(&sluice, "POST", "/post", &order, "charge").await;
        assert_eq!(
            (status, region.as_str(), body.as_str()),
            (200, "a", "from a")
        );
        assert_eq!(attempts, "1");
        assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(a.count_path("/post"), 1);
        assert_eq!(b.count_path("/post"), 0, "a POST was duplicated");

        // With an Idempotency-Key it may be hedged; the key reaches both regions unchanged.
        let mut h = order.to_vec();
        h.push(("Idempotency-Key", "k-123"));
        let (status, region, ..) = send(&sluice, "POST", "/keyed", &h, "charge").await;
        assert_eq!((status, region.as_str()), (200, "b"));
        let keys: Vec<String> = a
            .requests()
            .iter()
            .chain(b.requests().iter())
            .filter(|r| r.target == "/keyed")
            .map(|r| {
                format!(
                    "{}:{}",
                    r.header("idempotency-key").unwrap_or("-"),
                    String::from_utf8_lossy(&r.body)
                )
            })
            .collect();
        assert_eq!(keys, vec!["k-123:charge", "k-123:charge"]);
    });
    assert!(
        sluice.metric(&format!(
            "sluice_hedges_total{{host=\"{HOST}\",event=\"won\"}}"
        )) >= 2.0
    );
}

/// Wait until `f` holds, polling every 50 ms, for at most `within`.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn a_failing_region_is_ejected_until_its_checks_pass() {
    let a = FakeUpstream::builder()
        .route("/", Reply::text(503, "a is down"))
        .start();
    let b = FakeUpstream::builder()
        .route("/", Reply::text(200, "from b"))
        .start();
    // Checks every second: the first requests meet a while it still counts as healthy, so it
    // is their failures that eject it (its failing checks would take it out a second later).
    let extra = "health_check = { path = \"/health\", interval = \"1s\", timeout = \"500ms\" }\n\
                 outlier = { consecutive_failures = 3, base_ejection = \"1s\" }";
    let sluice = Sluice::start("", &config(a.port(), b.port(), extra));
    let order = [("Sluice-Regions", "a,b")];
    rt().block_on(async {
        for _ in 0..10 {
            let (status, region, _, body, _) = get(&sluice, "/api", &order).await;
            assert_eq!(
                (status, region.as_str(), body.as_str()),
                (200, "b", "from b")
            );
        }
    });
    let seen = a.count_path("/api");
    assert!(
        (1..=3).contains(&seen),
        "a saw {seen} requests before ejection"
    );
    rt().block_on(async {
        for _ in 0..10 {
            let (status, region, ..) = get(&sluice, "/api", &order).await;
            assert_eq!((status, region.as_str()), (200, "b"));
        }
    });
    assert_eq!(a.count_path("/api"), seen, "an ejected region got traffic");
    let (_, status) = sluice.admin_get("/status");
    let s: serde_json::Value = serde_json::from_str(&status).expect("json");
    let region_a = &s["regions"][0]["regions"][0];
    assert_eq!(region_a["name"], "a");
    assert_eq!(region_a["available"], false, "{status}");

    // a recovers: its checks pass, and it takes traffic again.
    a.set_status("/", 200);
    let back = eventually(Duration::from_secs(8), || {
        rt().block_on(get(&sluice, "/api", &order)).1 == "a"
    });
    assert!(back, "a never came back");
    assert!(
        sluice.metric(&format!(
            "sluice_region_ejections_total{{host=\"{HOST}\",region=\"a\"}}"
        )) >= 1.0
    );
}

#[test]
fn health_checks_take_a_region_out_and_back() {
    let a = FakeUpstream::builder()
        .route("/health", Reply::text(200, "ok"))
        .route("/", Reply::text(200, "from a"))
        .start();
    let b = FakeUpstream::builder()
        .route("/", Reply::text(200, "from b"))
        .start();
    let interval = Duration::from_millis(300);
    let extra = "health_check = { path = \"/health\", interval = \"300ms\", timeout = \"200ms\" }";
    let sluice = Sluice::start("", &config(a.port(), b.port(), extra));
    let order = [("Sluice-Regions", "a,b")];
    assert_eq!(rt().block_on(get(&sluice, "/", &order)).1, "a");

    a.set_status("/health", 503);
    let failed_at = Instant::now();
    let out = eventually(Duration::from_secs(3), || {
        sluice.metric(&format!(
            "sluice_region_healthy{{host=\"{HOST}\",region=\"a\"}}"
        )) == 0.0
    });
    assert!(out, "a stayed healthy");
    // Two failed checks are needed; the first may come up to one interval after the change.
    assert!(
        failed_at.elapsed() < 3 * interval + Duration::from_millis(300),
        "{:?}",
        failed_at.elapsed()
    );
    let before = a.count_path("/x");
    rt().block_on(async {
        for _ in 0..5 {
            let (status, region, ..) = get(&sluice, "/x", &order).await;
            assert_eq!((status, region.as_str()), (200, "b"));
        }
    });
    assert_eq!(a.count_path("/x"), before);

    a.set_status("/health", 200);
    let back = eventually(Duration::from_secs(3), || {
        rt().block_on(get(&sluice, "/x", &order)).1 == "a"
    });
    assert!(back, "a never came back");
}

#[test]
fn single_mode_fails_over_on_connect_errors_even_for_a_post() {
    // Nothing listens on a's port: connecting fails, so the POST is safe to send to b.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = dead.local_addr().expect("addr").port();
    drop(dead);
    let b = FakeUpstream::builder().start();
    let sluice = Sluice::start("", &config(a, b.port(), ""));
    rt().block_on(async {
        let (status, region, attempts, body, _) = send(
            &sluice,
            "POST",
            "/pay",
            &[("Sluice-Regions", "a,b")],
            "once",
        )
        .await;
        assert_eq!((status, region.as_str(), body.as_str()), (200, "b", "once"));
        assert_eq!(attempts, "2");
    });
    assert_eq!(b.count(), 1);
}

#[test]
fn a_post_is_not_retried_after_a_503() {
    let a = FakeUpstream::builder()
        .route("/", Reply::text(503, "busy"))
        .start();
    let b = FakeUpstream::builder().start();
    let sluice = Sluice::start("", &config(a.port(), b.port(), ""));
    rt().block_on(async {
        let (status, region, attempts, body, _) = send(
            &sluice,
            "POST",
            "/pay",
            &[("Sluice-Regions", "a,b")],
            "once",
        )
        .await;
        assert_eq!((status, region.as_str(), body.as_str()), (503, "a", "busy"));
        assert_eq!(attempts, "1");
    });
    assert_eq!(b.count(), 0);
}

#[test]
fn no_healthy_region_and_bad_controls_are_refused_clearly() {
    let a = FakeUpstream::builder().start();
    let b = FakeUpstream::builder().start();
    let sluice = Sluice::start("", &config(a.port(), b.port(), ""));
    rt().block_on(async {
        let (status, _, _, body, _) = get(&sluice, "/", &[("Sluice-Regions", "mars")]).await;
        assert_eq!(status, 503);
        assert!(body.contains("no_healthy_region"), "{body}");
        let (status, _, _, body, _) = get(&sluice, "/", &[("Sluice-Mode", "fastest")]).await;
        assert_eq!(status, 400);
        assert!(body.contains("Sluice-Mode"), "{body}");
    });
    assert_eq!(a.count() + b.count(), 0);
}

#[test]
fn peer_regions_go_through_the_other_sluice_and_loops_are_refused() {
    let far = FakeUpstream::builder().start();
    let near = FakeUpstream::builder().start();
    // The peer serves region "far" directly.
    let peer = Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\nregions = [{{ name = \"far\", address = \"127.0.0.1:{}\" }}]\n",
            far.port()
        ),
    );
    let sluice = Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\nregions = [\n  \
             {{ name = \"near\", address = \"127.0.0.1:{}\" }},\n  \
             {{ name = \"far\", via = \"http://{}\" }},\n]\n",
            near.port(),
            peer.proxy
        ),
    );
    rt().block_on(async {
        let (status, region, _, body, _) =
            get(&sluice, "/v1/x?q=1", &[("Sluice-Regions", "far")]).await;
        assert_eq!((status, region.as_str()), (200, "far"), "{body}");
    });
    assert_eq!(near.count(), 0);
    let got = far.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, "/v1/x?q=1");
    assert_eq!(got[0].header("host"), Some(HOST));
    let via: Vec<&str> = got[0]
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("via"))
        .map(|(_, v)| v.as_str())
        .collect();
    let via = via.join(", ");
    assert_eq!(
        via.matches("sluice-").count(),
        2,
        "both sluices in Via: {via}"
    );
    assert!(got[0].header("sluice-target").is_none());

    // A request that already passed through this sluice is refused.
    let (_, status) = sluice.admin_get("/status");
    let s: serde_json::Value = serde_json::from_str(&status).expect("json");
    let id = s["instance"].as_str().expect("instance").to_string();
    rt().block_on(async {
        let via = format!("1.1 sluice-{id}");
        let (status, _, _, body, _) = get(&sluice, "/", &[("Via", via.as_str())]).await;
        assert_eq!(status, 508);
        assert!(body.contains("loop_detected"), "{body}");
    });
}

#[test]
fn a_body_over_the_buffer_cap_streams_to_one_region() {
    let a = FakeUpstream::builder().start();
    let b = FakeUpstream::builder().start();
    let extra = "mode = \"race\"\nmax_buffered_body = 1024";
    let sluice = Sluice::start("", &config(a.port(), b.port(), extra));
    let big = "x".repeat(100_000);
    rt().block_on(async {
        let (status, region, attempts, body, _) = send(
            &sluice,
            "PUT",
            "/upload",
            &[("Sluice-Regions", "a,b")],
            &big,
        )
        .await;
        assert_eq!(
            (status, region.as_str(), attempts.as_str()),
            (200, "a", "1")
        );
        assert_eq!(body.len(), big.len(), "the echo carries the whole body");
        // A small one is raced as configured.
        let (status, _, attempts, body, _) = send(&sluice, "PUT", "/small", &[], "tiny").await;
        assert_eq!(
            (status, attempts.as_str(), body.as_str()),
            (200, "2", "tiny")
        );
    });
    assert_eq!(a.count_path("/upload") + b.count_path("/upload"), 1);
    // The small PUT was sent to both (Sluice-Attempts: 2); whether the loser's copy was
    // received before it was cancelled is a race, so its upstream count is not asserted.
}

#[test]
fn tls_regions_use_their_own_sni_for_requests_and_health_checks() {
    let ca = TestCa::new();
    let a = FakeUpstream::builder().tls(&ca).start();
    let b = FakeUpstream::builder().tls(&ca).start();
    // b's SNI names a host its certificate does not cover: its checks and requests fail.
    let sluice = Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", ca.ca_path().display()),
        &format!(
            "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\n\
             health_check = {{ path = \"/health\", interval = \"200ms\", timeout = \"500ms\" }}\n\
             regions = [\n  \
             {{ name = \"a\", address = \"127.0.0.1:{}\", tls = true }},\n  \
             {{ name = \"b\", address = \"127.0.0.1:{}\", tls = true, sni = \"other.invalid\" }},\n]\n",
            a.port(),
            b.port()
        ),
    );
    let healthy = |r: &str| {
        sluice.metric(&format!(
            "sluice_region_healthy{{host=\"{HOST}\",region=\"{r}\"}}"
        ))
    };
    assert!(
        eventually(Duration::from_secs(3), || healthy("b") == 0.0),
        "b's checks fail on its certificate"
    );
    assert_eq!(healthy("a"), 1.0, "a's checks pass over TLS");
    let client = direct_client();
    rt().block_on(async {
        let r = client
            .get(format!("http://{}/v1/x", sluice.proxy))
            .header("Sluice-Target", format!("https://{HOST}"))
            .send()
            .await
            .expect("response");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["sluice-region"], "a");
    });
    let got = a
        .requests()
        .into_iter()
        .find(|r| r.target == "/v1/x")
        .expect("a got the request");
    assert_eq!(got.header("host"), Some(HOST));
    assert!(a.count_path("/health") >= 1, "a was checked");
}

#[test]
fn a_reload_adds_a_region_and_keeps_the_others_state() {
    let a = FakeUpstream::builder().start();
    let b = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\nregions = [{{ name = \"a\", address = \"127.0.0.1:{}\" }}]\n",
            a.port()
        ),
    );
    assert_eq!(rt().block_on(get(&sluice, "/", &[])).1, "a");
    let (_, before) = sluice.admin_get("/status");
    let before: serde_json::Value = serde_json::from_str(&before).expect("json");
    assert!(before["regions"][0]["regions"][0]["latency_ewma_ms"].is_number());

    let text = std::fs::read_to_string(sluice.config_path()).expect("config");
    let text = text.replace(
        "regions = [{",
        &format!(
            "regions = [{{ name = \"b\", address = \"127.0.0.1:{}\" }}, {{",
            b.port()
        ),
    );
    std::fs::write(sluice.config_path(), text).expect("write config");
    sluice.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || {
            sluice.metric("sluice_config_reloads_total{result=\"ok\"}") >= 1.0
        }),
        "the reload was applied: {}",
        sluice.log()
    );
    let (status, region, ..) = rt().block_on(get(&sluice, "/", &[("Sluice-Regions", "b")]));
    assert_eq!((status, region.as_str()), (200, "b"));
    let (_, after) = sluice.admin_get("/status");
    let after: serde_json::Value = serde_json::from_str(&after).expect("json");
    let list = after["regions"][0]["regions"].as_array().expect("regions");
    let a_after = list.iter().find(|r| r["name"] == "a").expect("a");
    assert_eq!(
        a_after["latency_ewma_ms"], before["regions"][0]["regions"][0]["latency_ewma_ms"],
        "a's latency estimate survived the reload"
    );
}

#[test]
fn a_duplicate_never_queues_for_the_pace() {
    let a = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "from a").latency(Duration::from_millis(300)),
        )
        .start();
    let b = FakeUpstream::builder().start();
    // One request per second: the hedge at 50 ms finds no free slot and is not sent.
    let text = config(
        a.port(),
        b.port(),
        "mode = \"hedge\"\nhedge_after = \"50ms\"",
    )
    .replace("rps = 0.0", "rps = 1.0\nburst = 1");
    let sluice = Sluice::start("", &text);
    rt().block_on(async {
        let (status, region, attempts, _, elapsed) =
            get(&sluice, "/", &[("Sluice-Regions", "a,b")]).await;
        assert_eq!(
            (status, region.as_str(), attempts.as_str()),
            (200, "a", "1")
        );
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    });
    assert_eq!(b.count(), 0);
    assert_eq!(
        sluice.metric(&format!(
            "sluice_upstream_attempts_total{{host=\"{HOST}\",region=\"b\"}}"
        )),
        0.0
    );
}
