//! Security: the egress policy on resolved addresses, client authentication, CONNECT ports,
//! request limits and framing attacks; sluice keeps serving other clients throughout.

mod support;

use base64::Engine;
use sha2::Digest;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::*;

fn sha256_hex(secret: &str) -> String {
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn exchange(sluice: &Sluice, head: &str) -> (u16, String, String) {
    let raw = raw_exchange(sluice.proxy, head.as_bytes()).expect("exchange");
    split_response(&raw)
}

fn assert_refused(got: (u16, String, String), status: u16, code: &str) {
    let (s, head, body) = got;
    assert_eq!(s, status, "{head}\n{body}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some(code),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(json["error"], code);
    assert!(!json["message"].as_str().unwrap_or("").is_empty());
}

fn still_serves(sluice: &Sluice, up: &FakeUpstream) {
    let (s, head, _) = exchange(
        sluice,
        &format!(
            "GET http://127.0.0.1:{p}/ok HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
            p = up.port()
        ),
    );
    assert_eq!(s, 200, "other clients are still served: {head}");
}

#[test]
fn default_policy_refuses_internal_destinations() {
    let up = FakeUpstream::builder().start();
    let p = up.port();
    // The embedded default's policy: an empty [security] table.
    let sluice = Sluice::start(
        "",
        &format!("[security]\n[resolve]\n\"internal.test\" = [\"10.0.0.1:80\"]\n\"pinned.test\" = [\"127.0.0.1:{p}\"]\n"),
    );
    for head in [
        format!("GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n"),
        format!("GET http://[::ffff:127.0.0.1]:{p}/ HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:{p}\r\n"),
        "GET http://internal.test/ HTTP/1.1\r\nHost: internal.test\r\n".to_string(),
        format!("GET http://pinned.test:{p}/ HTTP/1.1\r\nHost: pinned.test:{p}\r\n"),
        "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            .to_string(),
    ] {
        let got = exchange(&sluice, &format!("{head}Connection: close\r\n\r\n"));
        assert_refused(got, 403, "forbidden_destination");
    }
    let got = exchange(
        &sluice,
        "GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://localhost:1\r\nConnection: close\r\n\r\n",
    );
    assert_refused(got, 403, "forbidden_destination");
    assert_refused(
        exchange(&sluice, "CONNECT [::ffff:127.0.0.1]:443 HTTP/1.1\r\n\r\n"),
        403,
        "forbidden_destination",
    );
    // Port 80 may carry plain HTTP in a tunnel, but not to a refused destination.
    assert_refused(
        exchange(&sluice, "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n"),
        403,
        "forbidden_destination",
    );
    assert_refused(
        exchange(&sluice, "CONNECT 169.254.169.254:443 HTTP/1.1\r\n\r\n"),
        403,
        "forbidden_destination",
    );
    assert_refused(
        exchange(&sluice, "CONNECT example.test:22 HTTP/1.1\r\n\r\n"),
        403,
        "forbidden_port",
    );
    assert_eq!(up.count(), 0, "nothing reached the loopback upstream");
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"forbidden_destination\"}") >= 8.0,
        "refusals counted by reason"
    );
}

#[test]
fn allow_lists_open_exactly_what_they_name() {
    let up = FakeUpstream::builder().start();
    let p = up.port();
    let sluice = Sluice::start(
        "",
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.1/32\"]\ndeny_hosts = [\"*.blocked.test\"]\n\
             connect_ports = [443, {p}]\n[resolve]\n\"pinned.test\" = [\"127.0.0.1:{p}\"]\n\"x.blocked.test\" = [\"127.0.0.1:{p}\"]\n"
        ),
    );
    let (s, _, _) = exchange(
        &sluice,
        &format!("GET http://pinned.test:{p}/ HTTP/1.1\r\nHost: pinned.test:{p}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(s, 200, "a pinned name inside an allowed range");
    assert_refused(
        exchange(
            &sluice,
            &format!("GET http://x.blocked.test:{p}/ HTTP/1.1\r\nHost: x.blocked.test:{p}\r\nConnection: close\r\n\r\n"),
        ),
        403,
        "forbidden_host",
    );
    assert_refused(
        exchange(
            &sluice,
            &format!("GET http://127.0.0.2:{p}/ HTTP/1.1\r\nHost: 127.0.0.2:{p}\r\nConnection: close\r\n\r\n"),
        ),
        403,
        "forbidden_destination",
    );
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\n\r\n").as_bytes())
        .expect("write");
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "allowed port"
    );
}

#[test]
fn clients_must_authenticate_and_credentials_never_reach_the_upstream() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder().start();
    let tls_up = FakeUpstream::builder().tls(&ca).start();
    let p = up.port();
    let sluice = Sluice::start(
        "",
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\nconnect_any_port = true\n\
             [[clients]]\nname = \"billing\"\npassword_sha256 = \"{pw}\"\ntoken_sha256 = \"{tok}\"\n\
             [[clients]]\nname = \"slow\"\ntoken_sha256 = \"{slow}\"\nlimits = {{ rps = 1.0, burst = 1 }}\n",
            pw = sha256_hex("hunter2"),
            tok = sha256_hex("tok-billing"),
            slow = sha256_hex("tok-slow"),
        ),
    );
    let get = |extra: &str| {
        exchange(
            &sluice,
            &format!("GET http://127.0.0.1:{p}/a HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n{extra}Connection: close\r\n\r\n"),
        )
    };
    let got = get("");
    assert!(
        header_of(&got.1, "proxy-authenticate").is_some(),
        "{}",
        got.1
    );
    assert_refused(got, 407, "auth_required");
    assert_refused(
        get("Proxy-Authorization: Bearer wrong\r\n"),
        407,
        "auth_failed",
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("billing:wrong");
    assert_refused(
        get(&format!("Proxy-Authorization: Basic {basic}\r\n")),
        407,
        "auth_failed",
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("billing:hunter2");
    assert_eq!(
        get(&format!("Proxy-Authorization: Basic {basic}\r\n")).0,
        200
    );
    assert_eq!(get("Proxy-Authorization: Bearer tok-billing\r\n").0, 200);
    assert_eq!(up.count(), 2, "refused requests never reached the upstream");
    for r in up.requests() {
        assert_eq!(r.header("proxy-authorization"), None);
    }

    // Explicit target: Sluice-Key, 401 without it; the client's Authorization goes through.
    let target = |extra: &str| {
        exchange(
            &sluice,
            &format!("GET /t HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://127.0.0.1:{p}\r\nAuthorization: Bearer upstream-key\r\n{extra}Connection: close\r\n\r\n"),
        )
    };
    let got = target("");
    assert!(header_of(&got.1, "www-authenticate").is_some());
    assert_refused(got, 401, "auth_required");
    assert_refused(target("Sluice-Key: nope\r\n"), 401, "auth_failed");
    assert_eq!(target("Sluice-Key: tok-billing\r\n").0, 200);
    let last = up.requests().pop().expect("request");
    assert_eq!(last.header("sluice-key"), None);
    assert_eq!(last.header("authorization"), Some("Bearer upstream-key"));

    // CONNECT needs credentials too.
    assert_refused(
        exchange(
            &sluice,
            &format!("CONNECT localhost:{} HTTP/1.1\r\n\r\n", tls_up.port()),
        ),
        407,
        "auth_required",
    );
    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(sluice.proxy_url())
                .expect("proxy")
                .basic_auth("billing", "hunter2"),
        )
        .add_root_certificate(ca.reqwest_cert())
        .build()
        .expect("client");
    let status = rt().block_on(async {
        client
            .get(format!("https://localhost:{}/s", tls_up.port()))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(status.expect("https through an authenticated tunnel"), 200);

    // A client's own pace: 1/s, so a second request at once is beyond a 100 ms deadline.
    assert_eq!(get("Proxy-Authorization: Bearer tok-slow\r\n").0, 200);
    let got = get("Proxy-Authorization: Bearer tok-slow\r\nSluice-Timeout: 100ms\r\n");
    assert!(header_of(&got.1, "retry-after").is_some());
    assert_refused(got, 429, "rate_limited");
}

#[test]
fn limits_answer_their_status_and_sluice_keeps_serving() {
    let up = FakeUpstream::builder()
        .route(
            "/slow",
            Reply::text(200, "slow").latency(Duration::from_secs(3)),
        )
        .start();
    let p = up.port();
    let sluice = Sluice::start(
        "header_read_timeout = \"300ms\"\n",
        "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\nmax_header_bytes = 4096\nmax_uri_bytes = 1024\n\
         max_body_bytes = 1000\nmax_connections = 4\n",
    );
    let big_header = "x".repeat(5000);
    assert_refused(
        exchange(
            &sluice,
            &format!("GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nX-Big: {big_header}\r\n\r\n"),
        ),
        431,
        "head_too_large",
    );
    still_serves(&sluice, &up);
    let long = "a".repeat(2000);
    assert_refused(
        exchange(
            &sluice,
            &format!("GET http://127.0.0.1:{p}/{long} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n"),
        ),
        414,
        "uri_too_long",
    );
    assert_refused(
        exchange(
            &sluice,
            &format!("POST http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"),
        ),
        413,
        "body_too_large",
    );
    // The same cap holds for a chunked body, counted as it streams.
    let chunk = "y".repeat(600);
    let got = exchange(
        &sluice,
        &format!(
            "POST http://127.0.0.1:{p}/chunked HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
        ),
    );
    assert_eq!(got.0, 413, "{}", got.1);
    assert_eq!(
        header_of(&got.1, "sluice-error").as_deref(),
        Some("body_too_large")
    );
    still_serves(&sluice, &up);
    // Slowloris: half a head, then silence.
    let mut slow = TcpStream::connect(sluice.proxy).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    slow.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .expect("write");
    let mut out = Vec::new();
    slow.read_to_end(&mut out)
        .expect("closed by sluice, not by the read timeout");
    let (s, head, _) = split_response(&out);
    assert_eq!(s, 408, "{head}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("request_timeout")
    );
    still_serves(&sluice, &up);
    // Connection cap: 4 connections busy with a slow request each, the 5th is refused.
    // (Idle kept-alive ones would make room: their idle time shrinks as the listener fills.)
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(sluice.proxy).expect("connect");
            s.write_all(
                format!("GET http://127.0.0.1:{p}/slow HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n")
                    .as_bytes(),
            )
            .expect("request");
            s
        })
        .collect();
    assert_eventually!(
        {
            let got = exchange(&sluice, "GET / HTTP/1.1\r\n\r\n");
            got.0 == 503
                && header_of(&got.1, "sluice-error").as_deref() == Some("too_many_connections")
        },
        "the fifth connection is refused"
    );
    drop(held);
    assert_eventually!(
        {
            let raw = raw_exchange(
                sluice.proxy,
                format!("GET http://127.0.0.1:{p}/ok HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            raw.map(|r| split_response(&r).0 == 200).unwrap_or(false)
        },
        "served again once connections close"
    );
}

#[test]
fn framing_attacks_are_refused_and_the_connection_closed() {
    let up = FakeUpstream::builder().start();
    let p = up.port();
    let sluice = Sluice::start("", "");
    let start = format!("POST http://127.0.0.1:{p}/smuggle HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n");
    for (name, head) in [
        (
            "CL+TE",
            format!("{start}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"),
        ),
        (
            "duplicate CL",
            format!("{start}Content-Length: 3\r\nContent-Length: 40\r\n\r\nabc"),
        ),
        ("CL list", format!("{start}Content-Length: 3, 3\r\n\r\nabc")),
        (
            "TE not chunked",
            format!("{start}Transfer-Encoding: gzip\r\n\r\nabc"),
        ),
        (
            "obs-fold",
            format!("{start}X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
        ),
    ] {
        // raw_exchange reads to EOF: it returns only because sluice closed the connection.
        let got = exchange(&sluice, &head);
        assert_eq!(got.0, 400, "{name}: {}", got.1);
        assert_eq!(
            header_of(&got.1, "sluice-error").as_deref(),
            Some("bad_request"),
            "{name}"
        );
    }
    // A bad chunk size: the request fails with 400 and goes no further.
    let got = exchange(
        &sluice,
        &format!("{start}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    );
    assert_eq!(got.0, 400, "bad chunk size: {}", got.1);
    assert!(
        up.requests()
            .iter()
            .all(|r| r.target != "/smuggle" || r.body.is_empty()),
        "no smuggled body reached the upstream"
    );
    still_serves(&sluice, &up);
}
