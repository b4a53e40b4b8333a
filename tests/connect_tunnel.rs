//! Way in 2: `https_proxy` — CONNECT tunnels terminated by sluice.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn https_through_connect_completes_tls_with_the_upstream() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder()
        .tls(&ca)
        .route("/secure", Reply::text(200, "tls ok"))
        .start();
    let sluice = Sluice::start("", "");
    let client = proxied_client(&sluice, Some(&ca));
    rt().block_on(async {
        for _ in 0..3 {
            let r = client
                .get(format!("https://localhost:{}/secure", up.port()))
                .send()
                .await
                .expect("https via CONNECT");
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.expect("body"), "tls ok");
        }
    });
    assert_eq!(up.count(), 3);
    assert_eventually!(
        sluice.metric("sluice_tunnels_opened_total") >= 1.0,
        "tunnel counted"
    );
}

#[test]
fn curl_https_proxy_works() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder()
        .tls(&ca)
        .route("/", Reply::text(200, "curl ok"))
        .start();
    let sluice = Sluice::start("", "");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca.ca_path())
        .args(["-x", &sluice.proxy_url()])
        .arg(format!("https://localhost:{}/", up.port()))
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("curl is needed for this test (.ci/run installs it): {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "curl ok");
}

#[test]
fn bytes_sent_right_after_the_head_are_kept_and_the_200_has_no_length() {
    let echo = EchoServer::start();
    let sluice = Sluice::start("", "");
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\nearly bytes",
        echo.addr
    );
    conn.write_all(head.as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).ends_with("early bytes") {
        let n = conn.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let (resp_head, rest) = text.split_once("\r\n\r\n").expect("head");
    assert!(resp_head.starts_with("HTTP/1.1 200"), "{resp_head}");
    assert_eq!(header_of(resp_head, "content-length"), None);
    assert_eq!(header_of(resp_head, "transfer-encoding"), None);
    assert_eq!(rest, "early bytes");
    conn.write_all(b" and more").expect("write");
    let mut more = [0u8; 9];
    conn.read_exact(&mut more).expect("echo");
    assert_eq!(&more, b" and more");
}

#[test]
fn connect_after_plain_requests_on_one_connection() {
    let up = FakeUpstream::builder().start();
    let echo = EchoServer::start();
    let sluice = Sluice::start("", "");
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req = format!(
        "GET http://127.0.0.1:{p}/first HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n",
        p = up.port()
    );
    conn.write_all(req.as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    conn.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr).as_bytes())
        .expect("connect head");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200 Connection"));
    conn.write_all(b"ping").expect("write");
    let mut four = [0u8; 4];
    conn.read_exact(&mut four).expect("echo");
    assert_eq!(&four, b"ping");
}

#[test]
fn refused_and_malformed_connects_get_a_status_and_a_code() {
    let sluice = Sluice::start("", "");
    let closed = free_port();
    for (head, status, code) in [
        (
            format!("CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n"),
            502,
            "connect_refused",
        ),
        (
            "CONNECT no-such-host.invalid:443 HTTP/1.1\r\n\r\n".to_string(),
            502,
            "dns",
        ),
        (
            "CONNECT example.test HTTP/1.1\r\n\r\n".to_string(),
            400,
            "bad_target",
        ),
        (
            "CONNECT a.test:443 HTTP/1.1\r\nBad Header\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
    ] {
        let raw = raw_exchange(sluice.proxy, head.as_bytes()).expect("exchange");
        let (got, resp_head, body) = split_response(&raw);
        assert_eq!(got, status, "{head}: {resp_head}");
        assert_eq!(header_of(&resp_head, "sluice-error").as_deref(), Some(code));
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["error"], code);
    }
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"connect_refused\",way=\"connect\"}") >= 1.0,
        "counted"
    );
}

#[test]
fn idle_tunnels_are_closed() {
    let echo = EchoServer::start();
    let sluice = Sluice::start("tunnel_idle_timeout = \"200ms\"\n", "");
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(format!("CONNECT {0} HTTP/1.1\r\n\r\n", echo.addr).as_bytes())
        .expect("write");
    let started = Instant::now();
    let mut all = Vec::new();
    // The read ends with EOF when sluice closes the idle tunnel; the 10 s read timeout would
    // turn a tunnel that never closes into an error instead.
    conn.read_to_end(&mut all)
        .expect("tunnel closed by sluice, not by the read timeout");
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eventually!(sluice.metric("sluice_tunnels_active") == 0.0, "tunnel gone");
}

/// Read from `conn` until `done` says the bytes so far are enough (bounded by the read
/// timeout).
fn read_until(conn: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&String::from_utf8_lossy(&got)) {
        let n = conn.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).to_string()
}

/// Before: with the port allowed, a tunnel carrying plain HTTP was opaque (no pace, no 429
/// seen, no Sluice-* headers). Now each request inside goes through the pipeline.
#[test]
fn plain_http_inside_an_allowed_tunnel_is_served_request_by_request() {
    let up = FakeUpstream::builder().start();
    // connect_any_port is on (the test default): the tunnel's port is allowed.
    let sluice = Sluice::start("", "");
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let authority = format!("127.0.0.1:{}", up.port());
    conn.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .expect("connect head");
    let opened = read_until(&mut conn, |t| t.contains("\r\n\r\n"));
    assert!(opened.starts_with("HTTP/1.1 200"), "{opened}");
    for path in ["/one", "/two"] {
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
            .expect("request");
        // The fake upstream echoes the request's (empty) body: the head is the response.
        let resp = read_until(&mut conn, |t| t.contains("\r\n\r\n"));
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(header_of(&resp, "x-echo-target").as_deref(), Some(path));
        assert!(
            resp.to_ascii_lowercase().contains("sluice-attempts: 1"),
            "served by the pipeline: {resp}"
        );
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.header("via").is_some()),
        "each request went through sluice's pipeline"
    );
    assert_eq!(
        sluice.metric("sluice_tunnels_opened_total"),
        0.0,
        "not an opaque tunnel"
    );
}

/// TLS, other protocols, and a server that speaks first stay opaque, bytes as they are.
#[test]
fn tls_and_other_protocols_in_a_tunnel_stay_opaque() {
    let echo = EchoServer::start();
    let sluice = Sluice::start("", "");
    for first in [
        &b"\x16\x03\x01\x00\x05hello"[..],
        b"SSH-2.0-client\r\n",
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr).as_bytes())
            .expect("connect head");
        read_until(&mut conn, |t| t.contains("\r\n\r\n"));
        conn.write_all(first).expect("first bytes");
        let mut back = vec![0u8; first.len()];
        conn.read_exact(&mut back).expect("echoed");
        assert_eq!(back, first, "carried as they are");
    }
    // A server that speaks first: its banner reaches a client that has sent nothing.
    let banner = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = banner.local_addr().expect("addr");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = banner.accept() {
            s.write_all(b"220 ready\r\n").ok();
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let mut conn = TcpStream::connect(sluice.proxy).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("connect head");
    let got = read_until(&mut conn, |t| t.contains("220 ready"));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eventually!(
        sluice.metric("sluice_tunnels_opened_total") == 4.0,
        "four opaque tunnels"
    );
}
