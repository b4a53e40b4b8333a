//! The edges of the protocol a bad day finds: a framing header named hop-by-hop, a TLS
//! handshake sent to the plain listener, an upstream status outside 100-599, and an upstream
//! body cut by a reset, which must reach the client as cut, never as complete.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::*;

const HOST: &str = "api.edges.test";

fn pinned(port: u16) -> String {
    format!("[defaults]\nrps = 0.0\n[resolve]\n\"{HOST}\" = [\"127.0.0.1:{port}\"]\n")
}

/// An upstream that answers each connection's first request with `reply`, then (with
/// `reset`) resets the connection instead of closing it.
fn raw_upstream(reply: &'static [u8], reset: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(10) {
            let Ok(mut s) = conn else { return };
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            s.write_all(reply).ok();
            std::thread::sleep(Duration::from_millis(100));
            if reset {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let _guard = rt.enter();
                s.set_nonblocking(true).ok();
                if let Ok(t) = tokio::net::TcpStream::from_std(s) {
                    t.set_zero_linger().ok();
                    drop(t);
                }
            }
        }
    });
    port
}

/// Send `request` and read until sluice closes: (status, head, raw body bytes).
fn exchange(sluice: &Sluice, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(request.as_bytes()).expect("request");
    let mut raw = Vec::new();
    // A reset from sluice ends the read too: what arrived before it counts.
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => raw.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&raw[..at]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, raw[at..].to_vec())
}

/// Before: the body was dropped at this hop and the upstream got `POST /a` without it, while
/// the client got `200`.
#[test]
fn a_framing_header_named_hop_by_hop_is_refused() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", &pinned(up.port()));
    for (framing, body) in [
        ("Content-Length: 5\r\n", "hello"),
        ("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let name = framing.split(':').next().unwrap_or("");
        let request = format!(
            "POST /a HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n\
             Connection: keep-alive, {name}\r\n{framing}\r\n{body}"
        );
        let (status, head, body) = exchange(&sluice, &request);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{head}{body}");
        assert_eq!(
            header_of(&head, "sluice-error").as_deref(),
            Some("bad_request")
        );
        assert!(body.contains("framing header"), "{body}");
        assert!(
            header_of(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")),
            "the connection is closed: {head}"
        );
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
}

/// Before: held for the 10 s head timeout, then answered with a plaintext `408`.
#[test]
fn a_tls_handshake_on_the_plain_listener_is_closed_at_once_and_counted() {
    let sluice = Sluice::start("", "");
    let started = Instant::now();
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // The start of a TLS 1.2/1.3 ClientHello record.
    s.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ])
    .expect("hello");
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at once, not after the head timeout: {:?}",
        started.elapsed()
    );
    assert!(
        read.is_err() || out.is_empty(),
        "nothing is sent back: {out:?}"
    );
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"tls_on_plain_listener\",way=\"unknown\"}")
            >= 1.0,
        "counted"
    );
    assert_eventually!(
        sluice.log().contains("tls_on_plain_listener") && sluice.log().contains("http://"),
        "logged, with what to do: {}",
        sluice.log()
    );
}

/// Before: `999` was passed through to the client.
#[test]
fn an_upstream_status_outside_100_to_599_is_a_protocol_error() {
    let port = raw_upstream(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok", false);
    let sluice = Sluice::start("", &pinned(port));
    let (status, head, body) = exchange(
        &sluice,
        &format!("GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 502, "{head}{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("upstream_protocol")
    );
}

/// Before: a close-delimited body cut by a reset reached the client as if complete, with
/// `Connection: keep-alive`. Now the client's response is chunked and ends without its last
/// chunk, the connection closed.
#[test]
fn an_upstream_body_cut_by_a_reset_reaches_the_client_as_cut() {
    let port = raw_upstream(b"HTTP/1.1 200 OK\r\n\r\npart of the body", true);
    let sluice = Sluice::start("", &pinned(port));
    let (status, head, body) = exchange(
        &sluice,
        &format!("GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n\r\n"),
    );
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 200, "{head}");
    assert!(text.contains("part of the body"), "{text:?}");
    let chunked =
        header_of(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    assert!(
        chunked,
        "a body whose end the client must be able to tell: {head}"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "no last chunk: the client sees the body cut: {text:?}"
    );
    // A complete close-delimited body still arrives whole, ended.
    let whole = raw_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it",
        false,
    );
    let sluice = Sluice::start("", &pinned(whole));
    let (status, head, body) = exchange(
        &sluice,
        &format!(
            "GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 200, "{head}");
    assert!(
        text.contains("all of it") && text.ends_with("0\r\n\r\n"),
        "{head}{text:?}"
    );
}

/// Before: a certificate that fails verification was tried three times per request, each
/// retry waiting for the host's pace. Now the endpoint is not asked again.
#[test]
fn an_upstream_certificate_that_fails_verification_is_not_retried_on_the_same_endpoint() {
    let stranger = TestCa::new();
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "never"))
        .tls(&stranger)
        .start();
    let sluice = Sluice::start("", &pinned(up.port()));
    let (status, head, body) = exchange(
        &sluice,
        &format!(
            "GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: https://{HOST}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 502, "{head}{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("upstream_tls")
    );
    assert_eq!(up.connections(), 1, "one handshake, not three");
    assert_eq!(up.count(), 0);
}
