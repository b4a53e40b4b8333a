//! Way in 1: sluice as an `http_proxy` (absolute-URI requests).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::*;

#[test]
fn get_and_post_with_bodies_through_the_proxy() {
    let up = FakeUpstream::builder()
        .route(
            "/hello",
            Reply::text(200, "hello from upstream").header("x-up", "1"),
        )
        .route("/chunked", Reply::chunked(200, &["one,", "two,", "three"]))
        .start();
    let sluice = Sluice::start("", "");
    let client = proxied_client(&sluice, None);
    rt().block_on(async {
        let base = format!("http://127.0.0.1:{}", up.port());
        let r = client
            .get(format!("{base}/hello"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-up"], "1");
        assert_eq!(r.headers()["sluice-attempts"], "1");
        assert!(r.headers()["via"].to_str().unwrap_or("").contains("sluice"));
        assert_eq!(r.text().await.expect("body"), "hello from upstream");

        let payload = "x".repeat(100_000);
        let r = client
            .post(format!("{base}/echo?q=1"))
            .body(payload.clone())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-echo-method"], "POST");
        assert_eq!(r.headers()["x-echo-target"], "/echo?q=1");
        assert_eq!(r.text().await.expect("body"), payload);

        for method in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let r = client
                .request(m, format!("{base}/m"))
                .body("b")
                .send()
                .await
                .expect("request");
            assert_eq!(r.headers()["x-echo-method"], method);
        }

        let r = client
            .get(format!("{base}/chunked"))
            .send()
            .await
            .expect("chunked");
        assert_eq!(r.text().await.expect("body"), "one,two,three");
    });
    let received = up.requests();
    assert_eq!(received[0].target, "/hello", "upstream gets origin-form");
    assert_eq!(
        received[0].header("host"),
        Some(format!("127.0.0.1:{}", up.port()).as_str())
    );
}

#[test]
fn chunked_request_body_is_forwarded() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", "");
    let req = format!(
        "POST http://127.0.0.1:{p}/up HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        p = up.port()
    );
    let raw = raw_exchange(sluice.proxy, req.as_bytes()).expect("exchange");
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, "hello world");
    assert_eq!(up.requests()[0].body, b"hello world");
}

#[test]
fn keep_alive_on_both_sides() {
    keep_alive("");
}

/// One worker thread runs on a single-threaded runtime (no work stealing).
#[test]
fn keep_alive_on_both_sides_with_one_worker_thread() {
    keep_alive("threads = 1");
}

fn keep_alive(server: &str) {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(server, "");
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for i in 0..5 {
        let req = format!(
            "POST http://127.0.0.1:{p}/k{i} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nContent-Length: 2\r\n\r\nok",
            p = up.port()
        );
        conn.write_all(req.as_bytes()).expect("write");
        let head = read_head(&mut conn);
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "request {i} on one connection: {head}"
        );
        let len: usize = header_of(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .expect("content-length");
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).expect("body");
        assert_eq!(body, b"ok");
    }
    assert_eq!(up.count(), 5);
    assert_eq!(
        up.connections(),
        1,
        "upstream connection is pooled and reused"
    );
}

fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).expect("read head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_string()
}

#[test]
fn hop_by_hop_credentials_and_control_headers_are_not_forwarded() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", "");
    let req = format!(
        "GET http://127.0.0.1:{p}/h HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\
         Proxy-Authorization: Basic dXNlcjpwdw==\r\nProxy-Connection: keep-alive\r\n\
         Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Sluice-Mode: race\r\nSluice-Timeout: 5s\r\nAuthorization: Bearer for-upstream\r\n\
         X-Keep: yes\r\n\r\n",
        p = up.port()
    );
    let raw = raw_exchange(sluice.proxy, req.as_bytes()).expect("exchange");
    assert_eq!(split_response(&raw).0, 200);
    let got = &up.requests()[0];
    for gone in [
        "proxy-authorization",
        "proxy-connection",
        "x-hop",
        "keep-alive",
        "te",
        "sluice-mode",
        "sluice-timeout",
    ] {
        assert_eq!(got.header(gone), None, "{gone} must not reach the upstream");
    }
    assert_eq!(got.header("authorization"), Some("Bearer for-upstream"));
    assert_eq!(got.header("x-keep"), Some("yes"));
    // Via names this sluice's instance, so that a peer loop can be recognised.
    let (_, status) = sluice.admin_get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let via = format!(
        "1.1 sluice-{}",
        status["instance"].as_str().expect("instance")
    );
    assert_eq!(got.header("via"), Some(via.as_str()));
}

#[test]
fn failures_have_a_status_a_code_and_a_json_reason() {
    let slow = FakeUpstream::builder()
        .route(
            "/slow",
            Reply::text(200, "late").latency(Duration::from_secs(3)),
        )
        .start();
    let closed_port = free_port();
    let sluice = Sluice::start("read_timeout = \"300ms\"\nconnect_timeout = \"2s\"\n", "");
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: no-such-host.invalid\r\n".into(),
            502,
            "dns",
        ),
        (
            format!(
                "GET http://127.0.0.1:{closed_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{closed_port}\r\n"
            ),
            502,
            "connect_refused",
        ),
        (
            format!(
                "GET http://127.0.0.1:{p}/slow HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n",
                p = slow.port()
            ),
            504,
            "upstream_timeout",
        ),
        (
            "GET http://a.test:99999/ HTTP/1.1\r\nHost: a.test:99999\r\n".into(),
            400,
            "bad_target",
        ),
        (
            "GET /plain HTTP/1.1\r\nHost: x\r\n".into(),
            400,
            "no_target",
        ),
    ];
    for (head, want_status, want_code) in cases {
        let raw = raw_exchange(
            sluice.proxy,
            format!("{head}Connection: close\r\n\r\n").as_bytes(),
        )
        .expect("exchange");
        let (status, resp_head, body) = split_response(&raw);
        assert_eq!(status, want_status, "{head} -> {resp_head}\n{body}");
        assert_eq!(
            header_of(&resp_head, "sluice-error").as_deref(),
            Some(want_code)
        );
        let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
        assert_eq!(json["error"], want_code);
        assert!(!json["message"].as_str().unwrap_or("").is_empty());
    }
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"dns\",way=\"forward\"}") >= 1.0,
        "counted once logged"
    );
}
