//! One pipeline for every host: a host without regions (two DNS answers pinned with
//! `[resolve]`) gets the same retries, ejection, deadline, hedging and attempt limits as a host
//! with regions; bodies are read after admission and stream to the first attempt; a 429 from
//! one region means what the host's `quota` says.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::*;

const HOST: &str = "api.plain.test";

fn rt() -> tokio::runtime::Runtime {
    support::runtime(2)
}

/// A host without regions whose DNS answers are the two ports, pacing off.
fn two_answers(first: u16, second: u16, defaults: &str) -> String {
    format!(
        "[defaults]\nrps = 0.0\n{defaults}\n[resolve]\n\"{HOST}\" = [\"127.0.0.1:{first}\", \"127.0.0.1:{second}\"]\n"
    )
}

/// A request through sluice to `HOST` (explicit target); (status, headers, body, elapsed).
async fn send(
    sluice: &Sluice,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    scheme: &str,
) -> (u16, reqwest::header::HeaderMap, String, Duration) {
    let client = direct_client();
    let started = Instant::now();
    let mut req = client
        .request(
            method.parse().expect("method"),
            format!("http://{}{path}", sluice.proxy),
        )
        .header("Sluice-Target", format!("{scheme}://{HOST}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("response");
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let body = r.text().await.expect("body");
    (status, h, body, started.elapsed())
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A port on which nothing listens (connections are refused).
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let p = l.local_addr().expect("addr").port();
    drop(l);
    p
}

#[test]
fn a_503_from_the_first_answer_is_retried_on_the_second_for_a_get_only() {
    let first = FakeUpstream::builder()
        .route("/", Reply::text(503, "first is down"))
        .start();
    let second = FakeUpstream::builder()
        .route("/", Reply::text(200, "second"))
        .start();
    // No ejection, so every request meets the 503 first.
    let sluice = Sluice::start(
        "",
        &two_answers(
            first.port(),
            second.port(),
            "outlier = { consecutive_failures = 0 }",
        ),
    );
    rt().block_on(async {
        let (status, h, body, _) = send(&sluice, "GET", "/x", &[], "http").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "second");
        assert_eq!(header(&h, "sluice-attempts"), "2");
        assert_eq!(header(&h, "sluice-region"), "default");
        let (status, h, body, _) = send(&sluice, "POST", "/x", &[], "http").await;
        assert_eq!(status, 503, "a POST is not sent twice: {body}");
        assert_eq!(header(&h, "sluice-attempts"), "1");
        let key = [("Idempotency-Key", "k-1")];
        let (status, _, body, _) = send(&sluice, "POST", "/x", &key, "http").await;
        assert_eq!(status, 200, "with Idempotency-Key it may be: {body}");
    });
    assert_eq!(first.count(), 3);
    assert_eq!(second.count(), 2);
    let retried = sluice.metric("sluice_retries_total{host=\"other\",reason=\"status\"}");
    assert_eq!(retried, 2.0);
}

#[test]
fn a_dead_first_answer_is_ejected_so_the_next_request_goes_straight_to_the_second() {
    let live = FakeUpstream::builder()
        .route("/", Reply::text(200, "live"))
        .start();
    let sluice = Sluice::start("", &two_answers(dead_port(), live.port(), ""));
    rt().block_on(async {
        let (status, h, body, _) = send(&sluice, "GET", "/a", &[], "http").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&h, "sluice-attempts"), "2", "the dead address first");
        for _ in 0..3 {
            let (status, h, body, _) = send(&sluice, "GET", "/b", &[], "http").await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                header(&h, "sluice-attempts"),
                "1",
                "the dead address is out"
            );
        }
        // A POST without Idempotency-Key may go to another address after a refused
        // connection: nothing was sent.
        let (status, _, body, _) = send(&sluice, "POST", "/c", &[], "http").await;
        assert_eq!(status, 200, "{body}");
    });
    assert_eq!(live.count(), 5);
    let ejected = sluice.metric("sluice_region_ejections_total{host=\"other\",region=\"default\"}");
    assert_eq!(ejected, 1.0);
}

#[test]
fn sluice_timeout_ends_a_request_stuck_in_connect() {
    // Accepts TCP and never answers the TLS handshake: the connect never completes.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        let mut kept = Vec::new();
        silent.set_nonblocking(false).ok();
        if let Ok((s, _)) = silent.accept() {
            kept.push(s);
        }
        std::thread::sleep(Duration::from_secs(6));
        drop(kept);
    });
    let sluice = Sluice::start(
        "connect_timeout = \"30s\"",
        &format!("[defaults]\nrps = 0.0\n[resolve]\n\"{HOST}\" = [\"127.0.0.1:{port}\"]\n"),
    );
    rt().block_on(async {
        let t = [("Sluice-Timeout", "1s")];
        let (status, h, body, elapsed) = send(&sluice, "GET", "/x", &t, "https").await;
        eprintln!("stuck connect answered {status} after {elapsed:?}");
        assert_eq!(status, 504, "{body}");
        assert_eq!(header(&h, "sluice-error"), "upstream_timeout");
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        assert!(
            elapsed < Duration::from_secs(5),
            "not the 30 s connect timeout: {elapsed:?}"
        );
    });
    held.join().ok();
}

#[test]
fn a_hedge_of_a_host_without_regions_goes_to_the_other_answer() {
    let slow = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "slow").latency(Duration::from_secs(3)),
        )
        .start();
    let fast = FakeUpstream::builder()
        .route("/", Reply::text(200, "fast"))
        .start();
    let sluice = Sluice::start("", &two_answers(slow.port(), fast.port(), ""));
    rt().block_on(async {
        let h = [("Sluice-Mode", "hedge"), ("Sluice-Hedge-After", "50ms")];
        let (status, headers, body, elapsed) = send(&sluice, "GET", "/x", &h, "http").await;
        eprintln!("hedge answered by {body} in {elapsed:?}");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "fast");
        assert_eq!(header(&headers, "sluice-attempts"), "2");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    });
    assert_eq!(slow.count(), 1);
    assert_eq!(fast.count(), 1);
    assert_eq!(
        sluice.metric("sluice_hedges_total{event=\"won\",host=\"other\"}"),
        1.0
    );
}

#[test]
fn resends_after_429_stop_at_max_attempts() {
    let limited = FakeUpstream::builder()
        .route("/", Reply::text(429, "slow down").retry_after("1"))
        .start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 0.0\nmax_attempts = 2\n[resolve]\n\"{HOST}\" = [\"127.0.0.1:{}\"]\n",
            limited.port()
        ),
    );
    rt().block_on(async {
        let (status, h, body, elapsed) = send(&sluice, "POST", "/x", &[], "http").await;
        eprintln!("429 twice, answered after {elapsed:?}");
        assert_eq!(status, 429, "{body}");
        assert_eq!(header(&h, "sluice-attempts"), "2");
        assert!(
            !header(&h, "retry-after").is_empty(),
            "the pause left is said"
        );
    });
    assert_eq!(limited.count(), 2, "one request, max_attempts = 2");
    assert_eq!(
        sluice.metric("sluice_retries_total{host=\"other\",reason=\"429\"}"),
        1.0
    );
    assert!(
        !sluice.log().contains("Fail to proxy"),
        "a resend is a decision, not an error"
    );
}

#[test]
fn expect_100_continue_is_answered_only_after_admission() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 1.0\nburst = 1\n[resolve]\n\"{HOST}\" = [\"127.0.0.1:{}\"]\n",
            up.port()
        ),
    );
    let first = format!("GET /warm HTTP/1.1\r\nHost: {HOST}\r\nSluice-Target: http://{HOST}\r\nConnection: close\r\n\r\n");
    let raw = raw_exchange(sluice.proxy, first.as_bytes()).expect("first");
    assert_eq!(split_response(&raw).0, 200);
    // The slot is used: the next request waits about 1 s for admission.
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let started = Instant::now();
    let head = format!(
        "POST /x HTTP/1.1\r\nHost: {HOST}\r\nSluice-Target: http://{HOST}\r\n\
         Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("head");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).expect("interim");
    let continued = started.elapsed();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");
    s.write_all(b"hello").expect("body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "hello");
    let queued: u64 = header_of(&head, "sluice-queued-ms")
        .and_then(|v| v.parse().ok())
        .expect("queued");
    eprintln!("100 Continue after {continued:?}; queued {queued} ms");
    assert!(queued >= 300, "the request did wait: {queued} ms");
    assert!(
        continued >= Duration::from_millis(queued.saturating_sub(50)),
        "100 came after {continued:?}, before the {queued} ms wait ended"
    );
    let got = up.requests();
    let last = got.last().expect("request");
    assert_eq!(last.header("expect"), None, "sluice answered Expect itself");
}

/// A host with regions `a` (429 + `Retry-After: 2` to its first request, then 200) and `b`.
fn quota_config(a: u16, b: u16, quota: &str) -> String {
    format!(
        "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\nquota = \"{quota}\"\nregions = [\n  \
         {{ name = \"a\", address = \"127.0.0.1:{a}\" }},\n  \
         {{ name = \"b\", address = \"127.0.0.1:{b}\" }},\n]\n"
    )
}

fn limited_region() -> FakeUpstream {
    FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "a").fail_first(1, 429).retry_after("2"),
        )
        .start()
}

/// Before: `Sluice-Queued-Ms: 0` on a request that waited about 2 s for the pause before its
/// resend. The header accounts for every wait of the request, not only its first admission.
#[test]
fn queued_ms_counts_the_wait_for_a_pause_before_a_resend() {
    let a = limited_region();
    let b = FakeUpstream::builder()
        .route("/", Reply::text(200, "b"))
        .start();
    let sluice = Sluice::start("", &quota_config(a.port(), b.port(), "host"));
    rt().block_on(async {
        let (status, h, body, elapsed) =
            send(&sluice, "GET", "/x", &[("Sluice-Regions", "a,b")], "http").await;
        assert_eq!((status, body.as_str()), (200, "a"));
        assert_eq!(header(&h, "sluice-attempts"), "2");
        let queued: u64 = header(&h, "sluice-queued-ms").parse().expect("a number");
        assert!(
            queued >= 1500 && queued <= elapsed.as_millis() as u64,
            "Sluice-Queued-Ms {queued} for a request that waited the 2 s pause ({elapsed:?})"
        );
    });
}

#[test]
fn a_429_from_one_region_pauses_the_host_when_the_quota_is_the_hosts() {
    let a = limited_region();
    let b = FakeUpstream::builder()
        .route("/", Reply::text(200, "b"))
        .start();
    let sluice = Sluice::start("", &quota_config(a.port(), b.port(), "host"));
    rt().block_on(async {
        // Region order: a first (config order, nothing measured yet).
        let (status, h, body, elapsed) =
            send(&sluice, "GET", "/x", &[("Sluice-Regions", "a,b")], "http").await;
        eprintln!("quota = host: answered by {body} after {elapsed:?}");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "a", "the same region after the pause");
        assert_eq!(header(&h, "sluice-attempts"), "2");
        assert!(
            elapsed >= Duration::from_millis(1800),
            "waited the pause: {elapsed:?}"
        );
    });
    assert_eq!(b.count(), 0, "no other region was tried");
}

#[test]
fn a_429_from_one_region_moves_on_at_once_when_the_quota_is_the_regions() {
    let a = limited_region();
    let b = FakeUpstream::builder()
        .route("/", Reply::text(200, "b"))
        .start();
    let sluice = Sluice::start("", &quota_config(a.port(), b.port(), "region"));
    rt().block_on(async {
        let (status, h, body, elapsed) =
            send(&sluice, "GET", "/x", &[("Sluice-Regions", "a,b")], "http").await;
        eprintln!("quota = region: answered by {body} after {elapsed:?}");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "b");
        assert_eq!(header(&h, "sluice-region"), "b");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
        // Region a is held out for its pause; the host is not paused.
        let (status, h, _, elapsed) = send(&sluice, "GET", "/y", &[], "http").await;
        assert_eq!(status, 200);
        assert_eq!(header(&h, "sluice-region"), "b");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    });
    assert_eq!(a.count(), 1);
}
