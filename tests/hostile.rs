//! Hostile input, round 2: what a bad upstream and a bad client could still do, each with a
//! test that failed before its fix — learned pace out of bounds, `Retry-After: 0`, forged
//! `Sluice-*` response headers, an unsolicited `101`, a flood of `1xx`, client durations that
//! overflow a clock, and absolute targets with schemes sluice does not serve.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use support::*;

const HOST: &str = "api.hostile.test";

fn rt() -> tokio::runtime::Runtime {
    support::runtime(2)
}

/// `HOST` pinned to the port, as a `[hosts]` entry (so `/status` lists its pace).
fn pinned(port: u16, host_keys: &str) -> String {
    format!("[hosts.\"{HOST}\"]\n{host_keys}\n[resolve]\n\"{HOST}\" = [\"127.0.0.1:{port}\"]\n")
}

async fn get(sluice: &Sluice, path: &str, headers: &[(&str, &str)]) -> (u16, String, Duration) {
    let started = Instant::now();
    let mut req = direct_client()
        .get(format!("http://{}{path}", sluice.proxy))
        .header("Sluice-Target", format!("http://{HOST}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("response");
    let status = r.status().as_u16();
    let code = r
        .headers()
        .get("sluice-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, code, started.elapsed())
}

/// One `GET /x` to `HOST` through sluice on a raw connection; the raw answer.
fn raw_get(sluice: &Sluice) -> Vec<u8> {
    let head = format!(
        "GET /x HTTP/1.1\r\nHost: {HOST}\r\nSluice-Target: http://{HOST}\r\nConnection: close\r\n\r\n"
    );
    raw_exchange(sluice.proxy, head.as_bytes()).expect("exchange")
}

fn pace_of(sluice: &Sluice) -> f64 {
    let (_, status) = sluice.admin_get("/status");
    let s: serde_json::Value = serde_json::from_str(&status).expect("json");
    s["hosts"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|h| h["host"].as_str().is_some_and(|k| k.starts_with(HOST)))
        })
        .and_then(|h| h["pace_rps"].as_f64())
        .unwrap_or_else(|| panic!("no pace for {HOST}: {status}"))
}

#[test]
fn a_learned_pace_stays_between_one_an_hour_and_the_ceiling() {
    let up = FakeUpstream::builder()
        .route(
            "/crawl",
            Reply::text(200, "ok").header("X-EZTHROTTLE-RPS", "0.0000000001"),
        )
        .route(
            "/flood",
            Reply::text(200, "ok").header("X-EZTHROTTLE-RPS", "1000000"),
        )
        .start();
    let sluice = Sluice::start("", &pinned(up.port(), "rps = 2.0\nburst = 1"));
    rt().block_on(async {
        let (status, _, _) = get(&sluice, "/crawl", &[]).await;
        assert_eq!(status, 200);
        let pace = pace_of(&sluice);
        assert!(
            (pace - 1.0 / 3600.0).abs() < 1e-6,
            "the floor, one an hour: {pace}"
        );
        // Pacing is not off. The slot already reserved at the old pace (0.5 s on) goes; the
        // one after it is an hour away, past any wait.
        let (status, _, _) = get(&sluice, "/crawl", &[("Sluice-Timeout", "2s")]).await;
        assert_eq!(status, 200);
        let (status, code, elapsed) = get(&sluice, "/crawl", &[("Sluice-Timeout", "1s")]).await;
        assert_eq!((status, code.as_str()), (429, "rate_limited"));
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    });
    assert_eq!(up.count(), 2);

    // The ceiling: with no max_rps, an upstream cannot raise the pace past 1,000 rps.
    let sluice = Sluice::start("", &pinned(up.port(), "rps = 2.0"));
    rt().block_on(async {
        assert_eq!(get(&sluice, "/flood", &[]).await.0, 200);
    });
    assert_eq!(pace_of(&sluice), 1000.0);
    let sluice = Sluice::start("", &pinned(up.port(), "rps = 2.0\nmax_rps = 5.0"));
    rt().block_on(async {
        assert_eq!(get(&sluice, "/flood", &[]).await.0, 200);
    });
    assert_eq!(pace_of(&sluice), 5.0);
}

#[test]
fn retry_after_zero_still_pauses_and_resends_stop_at_max_attempts() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(429, "now!").retry_after("0"))
        .start();
    let sluice = Sluice::start("", &pinned(up.port(), "rps = 0.0\nmax_attempts = 2"));
    rt().block_on(async {
        let (status, _, elapsed) = get(&sluice, "/x", &[]).await;
        eprintln!("429 + Retry-After: 0 twice, answered after {elapsed:?}");
        assert_eq!(status, 429);
        assert!(
            elapsed >= Duration::from_millis(950),
            "the resend waited the 1 s floor: {elapsed:?}"
        );
    });
    assert_eq!(up.count(), 2);
}

#[test]
fn sluice_headers_from_upstream_are_dropped() {
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "ok")
                .header("Sluice-Error", "forged")
                .header("Sluice-Region", "evil")
                .header("Sluice-Anything", "x"),
        )
        .start();
    let sluice = Sluice::start("", &pinned(up.port(), "rps = 0.0"));
    let raw = raw_get(&sluice);
    let (status, head, _) = split_response(&raw);
    assert_eq!(status, 200);
    assert_eq!(header_of(&head, "sluice-error"), None, "{head}");
    assert_eq!(header_of(&head, "sluice-anything"), None, "{head}");
    assert_eq!(
        header_of(&head, "sluice-region").as_deref(),
        Some("default")
    );
}

/// A raw upstream that answers every connection's first request with `reply`.
fn raw_upstream(reply: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(&reply).ok();
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    port
}

#[test]
fn an_unsolicited_101_and_a_flood_of_1xx_are_refused() {
    let switch = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\nRAW BYTES"
            .to_vec(),
    );
    let mut flood = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".repeat(2000);
    flood.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let hints = raw_upstream(flood);
    for (port, what) in [(switch, "101"), (hints, "1xx flood")] {
        let sluice = Sluice::start("", &pinned(port, "rps = 0.0\nretry_on = []"));
        let raw = raw_get(&sluice);
        let (status, head, body) = split_response(&raw);
        assert_eq!(status, 502, "{what}: {head}\n{body}");
        assert_eq!(
            header_of(&head, "sluice-error").as_deref(),
            Some("upstream_protocol"),
            "{what}"
        );
        assert_eq!(
            raw.windows(6).filter(|w| w == b" 103 E").count(),
            0,
            "{what}: no interim response reached the client"
        );
    }
}

#[test]
fn client_durations_that_would_overflow_a_clock_are_refused() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", &pinned(up.port(), "rps = 0.0"));
    rt().block_on(async {
        for (name, value) in [
            ("Sluice-Timeout", "18446744073709551615s"),
            ("Sluice-Timeout", "2h"),
            ("Sluice-Hedge-After", "18446744073709551615s"),
            ("Sluice-Hedge-After", "5000h"),
        ] {
            for _ in 0..20 {
                let (status, code, _) = get(&sluice, "/x", &[(name, value)]).await;
                assert_eq!(
                    (status, code.as_str()),
                    (400, "bad_request"),
                    "{name}: {value}"
                );
            }
        }
        // Still serving, and nothing panicked.
        assert_eq!(get(&sluice, "/x", &[("Sluice-Timeout", "1h")]).await.0, 200);
    });
    let log = sluice.log();
    assert!(!log.contains("panicked"), "{log}");
    // A refusal's access-log line names the destination it had parsed.
    assert!(
        log.lines().any(|l| l.contains("sluice::access")
            && l.contains("host=\"api.hostile.test\"")
            && l.contains("error=\"bad_request\"")),
        "{log}"
    );
}

#[test]
fn absolute_targets_with_other_schemes_are_refused_not_routed() {
    let routed = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[[routes]]\nprefix = \"/plain\"\ntarget = \"http://127.0.0.1:{}\"\n",
            routed.port()
        ),
    );
    for target in ["ftp://x/plain/get", "ws://x/plain/get", "wss://x/plain/get"] {
        let raw = raw_exchange(
            sluice.proxy,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("exchange");
        let (status, head, body) = split_response(&raw);
        assert_eq!(status, 400, "{target}: {head}");
        assert_eq!(
            header_of(&head, "sluice-error").as_deref(),
            Some("bad_target"),
            "{target}"
        );
        // ws:// and wss:// name an HTTP destination, for a WebSocket upgrade only.
        let why = if target.starts_with("ftp") {
            "http and https"
        } else {
            "upgrade"
        };
        assert!(body.contains(why), "{body}");
    }
    assert_eq!(routed.count(), 0, "nothing was served by the /plain route");
}

/// A raw upstream that reads one connection to its end and reports how many bytes came.
fn draining_upstream() -> (u16, std::sync::mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        tx.send(total).ok();
    });
    (port, rx)
}

#[test]
fn a_chunked_body_over_the_limit_gets_413_and_the_upstream_request_stops() {
    let (port, received) = draining_upstream();
    const MIB: usize = 1024 * 1024;
    let sluice = Sluice::start(
        "",
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\nmax_body_bytes = {MIB}\n{}",
            pinned(port, "rps = 0.0")
        ),
    );
    // As curl sends a large upload: chunked, with `Expect: 100-continue`, the body after the
    // `100` (or after a second without one).
    let mut s = std::net::TcpStream::connect(sluice.proxy).expect("connect");
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: {HOST}\r\nSluice-Target: http://{HOST}\r\n\
         Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("head");
    s.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut interim = [0u8; 256];
    let n = s.read(&mut interim).unwrap_or(0);
    assert!(
        interim[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&interim[..n])
    );
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(8 * MIB / chunk.len()) {
            let sent = w
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .and_then(|_| w.write_all(&chunk))
                .and_then(|_| w.write_all(b"\r\n"));
            if sent.is_err() {
                return;
            }
        }
        w.write_all(b"0\r\n\r\n").ok();
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    writer.join().ok();
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 413, "{head}\n{body}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("body_too_large")
    );
    let upstream_got = received
        .recv_timeout(Duration::from_secs(15))
        .expect("upstream connection ended");
    eprintln!("over-long chunked body: the upstream received {upstream_got} bytes");
    assert!(
        upstream_got < 2 * MIB,
        "the upstream request went on past the limit: {upstream_got} bytes"
    );
}

#[test]
fn an_absolute_target_sets_host_and_framing_refusals_are_sluices_own() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[resolve]\n\"api.case.test\" = [\"127.0.0.1:{}\"]\n",
            up.port()
        ),
    );
    // RFC 9112 3.2.2: the target's authority is the Host, whatever the client sent (Pingora
    // alone answered each of these with a bare 400).
    for host_lines in [
        "Host: api.case.test:80\r\n",
        "Host: API.CASE.TEST\r\n",
        "Host: api.case.test\r\nHost: other.test\r\n",
        "",
    ] {
        let raw = raw_exchange(
            sluice.proxy,
            format!("GET http://api.case.test/x HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("exchange");
        let (status, head, _) = split_response(&raw);
        assert_eq!(status, 200, "{host_lines:?}: {head}");
        let seen = up.requests();
        let last = seen.last().expect("request");
        assert_eq!(last.header("host"), Some("api.case.test"), "{host_lines:?}");
    }
    let a = "api.case.test";
    for (request, code) in [
        (
            format!("GET http://user:pw@{a}/x HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            "bad_target",
        ),
        (
            format!("POST http://{a}/x HTTP/1.1\r\nHost: {a}\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            "bad_request",
        ),
        (
            format!("POST http://{a}/x HTTP/1.0\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            "bad_request",
        ),
    ] {
        let raw = raw_exchange(sluice.proxy, request.as_bytes()).expect("exchange");
        let (status, head, body) = split_response(&raw);
        assert_eq!(status, 400, "{request:?}: {head}");
        assert_eq!(header_of(&head, "sluice-error").as_deref(), Some(code), "{request:?}");
        assert!(body.contains("\"message\""), "{body}");
    }
    assert_eq!(
        sluice.metric("sluice_requests_total{outcome=\"bad_request\"}")
            + sluice.metric("sluice_requests_total{outcome=\"bad_target\"}"),
        3.0,
        "every refusal is counted"
    );
}

/// A raw connection that sent one request and read its whole answer, now idle (kept alive).
fn idle_after_one_request(sluice: &Sluice, port: u16) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(
        format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
            .as_bytes(),
    )
    .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\nok") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    s
}

#[test]
fn a_trickled_body_is_cut_off_at_the_minimum_rate() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start(
        "",
        "[defaults]\nrps = 0.0\n[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
         min_body_rate = 100\nbody_grace = \"1s\"\n",
    );
    let mut s = std::net::TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s.write_all(
        format!(
            "POST http://127.0.0.1:{p}/upload HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nContent-Length: 1000\r\n\r\n",
            p = up.port()
        )
        .as_bytes(),
    )
    .expect("head");
    // One byte every 300 ms: far under 100 bytes/s.
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(10) {
        if s.write_all(b"x").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&answer).contains("\r\n\r\n{") {
                    break;
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("sluice-error: request_timeout"),
        "{text}"
    );
    assert!(text.contains("min_body_rate"), "{text}");
    // The grace (1 s) and a byte's worth at 100 B/s, not the 60 s read timeout.
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn one_client_address_cannot_take_every_connection() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start(
        "",
        "[defaults]\nrps = 0.0\n[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
         max_connections_per_client = 3\n",
    );
    let held: Vec<_> = (0..3)
        .map(|_| idle_after_one_request(&sluice, up.port()))
        .collect();
    let raw = raw_exchange(
        sluice.proxy,
        format!(
            "GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
            p = up.port()
        )
        .as_bytes(),
    )
    .expect("answer");
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 503, "{head}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("too_many_connections")
    );
    assert!(body.contains("max_connections_per_client"), "{body}");
    drop(held);
    assert_eventually!(
        raw_exchange(
            sluice.proxy,
            format!(
                "GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
                p = up.port()
            )
            .as_bytes(),
        )
        .is_ok_and(|r| split_response(&r).0 == 200),
        "served again once the client closed its connections"
    );
}

#[test]
fn idle_connections_make_room_when_the_listener_fills_up() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start(
        "",
        "[defaults]\nrps = 0.0\n[security]\nallow_cidrs = [\"127.0.0.0/8\"]\nmax_connections = 10\n",
    );
    // Ten idle kept-alive connections: the listener is full.
    let mut held: Vec<_> = (0..10)
        .map(|_| idle_after_one_request(&sluice, up.port()))
        .collect();
    let started = Instant::now();
    // Full, their idle time is down to a second: they are closed, and a new client is served.
    assert_eventually!(
        raw_exchange(
            sluice.proxy,
            format!(
                "GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
                p = up.port()
            )
            .as_bytes(),
        )
        .is_ok_and(|r| split_response(&r).0 == 200),
        "a new client is served while the idle ones held every slot"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mut buf = [0u8; 16];
    let mut closed = 0;
    for s in held.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e)
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                closed += 1
            }
            _ => {}
        }
    }
    assert!(closed >= 1, "idle connections were closed to make room");
}

#[test]
fn a_framing_error_in_a_body_says_its_reason() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let sluice = Sluice::start("", "[defaults]\nrps = 0.0\n");
    let raw = raw_exchange(
        sluice.proxy,
        format!(
            "POST http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            p = up.port()
        )
        .as_bytes(),
    )
    .expect("answer");
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 400, "{head}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("bad_request")
    );
    assert!(body.contains("chunk"), "the reason: {body}");
    assert!(
        !body.contains("peer addr") && !body.contains("127.0.0.1"),
        "no socket noise: {body}"
    );
}

/// A WebSocket-like upstream: answers an upgrade with `101`, then echoes every byte. Sends
/// back the request head it got.
fn upgrading_upstream() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&head).to_string());
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        );
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (port, rx)
}

#[test]
fn a_websocket_upgrade_the_client_asked_for_is_relayed() {
    let sluice = Sluice::start("", "[defaults]\nrps = 0.0\n");
    // As an explicit target, and through the forward proxy as `ws://` (what aiohttp sends).
    for way in ["target", "ws"] {
        let (port, heads) = upgrading_upstream();
        let start = match way {
            "target" => format!(
                "GET /chat HTTP/1.1\r\nHost: x\r\nSluice-Target: http://127.0.0.1:{port}\r\n"
            ),
            _ => format!("GET ws://127.0.0.1:{port}/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"),
        };
        let mut s = std::net::TcpStream::connect(sluice.proxy).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(
            format!(
                "{start}Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).expect("read");
            assert_eq!(n, 1, "{way}: closed: {}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{way}: {head}");
        assert_eq!(header_of(&head, "upgrade").as_deref(), Some("websocket"));
        assert_eq!(
            header_of(&head, "sec-websocket-accept").as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        let sent = heads
            .recv_timeout(Duration::from_secs(5))
            .expect("upstream head");
        assert!(sent.starts_with("GET /chat HTTP/1.1"), "{way}: {sent}");
        assert_eq!(header_of(&sent, "upgrade").as_deref(), Some("websocket"));
        assert!(header_of(&sent, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")));
        assert!(header_of(&sent, "sec-websocket-key").is_some(), "{sent}");
        // Frames both ways, as bytes.
        for msg in [&b"\x81\x05hello"[..], &b"\x81\x05again"[..]] {
            s.write_all(msg).expect("frame");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).expect("echo");
            assert_eq!(back, msg);
        }
        assert_eq!(sluice.metric("sluice_tunnels_active"), 1.0);
        drop(s);
        assert_eventually!(
            sluice.metric("sluice_tunnels_active") == 0.0,
            "the relay ends with the client"
        );
    }
}

/// Every response in `raw`, in order: (status, body).
fn responses(mut raw: &[u8]) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len: usize = header_of(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = &raw[end + 4..(end + 4 + len).min(raw.len())];
        out.push((status, String::from_utf8_lossy(body).to_string()));
        raw = &raw[(end + 4 + len).min(raw.len())..];
    }
    out
}

#[test]
fn pipelined_requests_are_each_answered_in_order() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"127.0.0.1:{}\"]\nrps = 0.0\n", up.port()),
    );
    let target = format!("Sluice-Target: http://127.0.0.1:{}\r\n", up.port());
    // Four requests in one write: no body, a Content-Length body, a chunked body with a
    // trailer, and a last one that closes.
    let batch = format!(
        "GET /one HTTP/1.1\r\nHost: x\r\n{target}\r\n\
         POST /two HTTP/1.1\r\nHost: x\r\n{target}Content-Length: 5\r\n\r\nhello\
         POST /three HTTP/1.1\r\nHost: x\r\n{target}Transfer-Encoding: chunked\r\n\r\n\
         3\r\nabc\r\n2\r\nde\r\n0\r\nX-Check: 1\r\n\r\n\
         GET /four HTTP/1.1\r\nHost: x\r\n{target}Connection: close\r\n\r\n"
    );
    let raw = raw_exchange(sluice.proxy, batch.as_bytes()).expect("exchange");
    let got = responses(&raw);
    assert_eq!(
        got,
        vec![
            (200, String::new()),
            (200, "hello".to_string()),
            (200, "abcde".to_string()),
            (200, String::new()),
        ],
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let targets: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/one", "/two", "/three", "/four"]);
}

#[test]
fn a_request_sent_ahead_while_a_body_streams_waits_for_its_turn() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"127.0.0.1:{}\"]\nrps = 0.0\n", up.port()),
    );
    let target = format!("Sluice-Target: http://127.0.0.1:{}\r\n", up.port());
    let mut s = std::net::TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The head, then a chunked body in two writes, the second carrying the next request too
    // (Pingora reads a chunked body in whole reads, so without sluice's framing the next
    // request would be read into this one's buffer).
    let head = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\n{target}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    );
    s.write_all(head.as_bytes()).expect("write");
    std::thread::sleep(Duration::from_millis(50));
    let next = format!(
        "3\r\ndef\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n{target}Connection: close\r\n\r\n"
    );
    s.write_all(next.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let got = responses(&raw);
    assert_eq!(
        got,
        vec![(200, "abcdef".to_string()), (200, String::new())],
        "{}",
        String::from_utf8_lossy(&raw)
    );
}
