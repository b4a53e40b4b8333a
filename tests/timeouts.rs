//! What bounds a request in time: a whole-request deadline by default (the host's
//! `request_timeout` when the client sends no `Sluice-Timeout`), covering the wait, the
//! connects and the response head; a timed-out attempt never retried on the endpoint that just
//! timed out; and a response body bounded by its silences (`body_idle_timeout`), never by the
//! deadline.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const HOST: &str = "api.timeouts.test";

/// An upstream that accepts connections, reads what it is sent and never answers. Counts its
/// connections.
fn silent_upstream() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(mut s) = conn else { return };
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    (port, count)
}

/// An upstream that answers every request with a chunked body whose second piece comes
/// `gap` after the first.
fn slow_body_upstream(gap: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let first = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                if s.write_all(first.as_bytes()).is_err() {
                    return;
                }
                std::thread::sleep(gap);
                s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").ok();
                // Hold the connection until the client leaves.
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

fn pinned(port: u16, host_keys: &str) -> String {
    format!(
        "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\n{host_keys}\n\
         [resolve]\n\"{HOST}\" = [\"127.0.0.1:{port}\"]\n"
    )
}

/// One GET through an explicit target, `Connection: close`: (status, head, body, elapsed).
fn get(sluice: &Sluice, extra: &str) -> (u16, String, String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s.write_all(
        format!(
            "GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n{extra}\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let (status, head, body) = split_response(&raw);
    (status, head, body, started.elapsed())
}

/// A chunked POST through an explicit target whose body comes as `pieces` pieces of 5 bytes,
/// 200 ms apart, then its end; the connection, to read the answer from (20 s at most).
fn slow_upload(sluice: &Sluice, pieces: usize) -> TcpStream {
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s.write_all(
        format!(
            "POST /slow HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("head");
    for _ in 0..pieces {
        s.write_all(b"5\r\nhello\r\n").expect("piece");
        std::thread::sleep(Duration::from_millis(200));
    }
    s.write_all(b"0\r\n\r\n").expect("end");
    s
}

/// The host's `request_timeout` clock stops while the body streams in and starts when it is
/// whole: an upload longer than the bound to an upstream that never answers still ends, with
/// `504`, once the bound has run after the body's end (the deadline's timer moved, not lost).
#[test]
fn the_deadline_runs_again_once_a_streamed_body_is_whole() {
    let (port, connections) = silent_upstream();
    let sluice = Sluice::start("", &pinned(port, "request_timeout = \"1s\""));
    // Eight pieces 200 ms apart: the body takes 1.6 s, past the 1 s request_timeout.
    let mut s = slow_upload(&sluice, 8);
    let whole = Instant::now();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("response before the client's 20 s read timeout");
    let after_body = whole.elapsed();
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 504, "{head}\n{body}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("upstream_timeout")
    );
    // Not at the body's end: the bound runs from there (less the few ms before the body).
    assert!(
        after_body >= Duration::from_millis(500),
        "cut {after_body:?} after the body's end, before its 1 s request_timeout ran"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

/// Before: no deadline unless the client sent one, and each of three attempts waited the
/// 60 s read timeout on the same address (180 s). Now the host's `request_timeout` bounds the
/// request, and the one address is asked once.
#[test]
fn a_request_without_sluice_timeout_ends_at_the_hosts_request_timeout() {
    let (port, connections) = silent_upstream();
    let sluice = Sluice::start("", &pinned(port, "request_timeout = \"1s\""));
    let (status, head, body, elapsed) = get(&sluice, "");
    assert_eq!(status, 504, "{head}\n{body}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("upstream_timeout")
    );
    assert!(
        body.contains("request_timeout"),
        "the reason names the bound: {body}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "ended by the 1 s request_timeout, not a 60 s read timeout: {elapsed:?}"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

/// A per-read cap shorter than the deadline times out the attempt; the retry the timeout
/// allows must go to another endpoint, and with none left the request ends.
#[test]
fn a_timed_out_attempt_is_not_retried_on_the_endpoint_that_timed_out() {
    let (port, connections) = silent_upstream();
    let sluice = Sluice::start("read_timeout = \"300ms\"\n", &pinned(port, ""));
    let (status, head, body, _) = get(&sluice, "");
    assert_eq!(status, 504, "{head}\n{body}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("upstream_timeout")
    );
    // Give a wrong retry the time to show (it would follow within a backoff of 25-75 ms).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the one address that timed out was not asked again"
    );
}

/// With two addresses, the timed-out one is left and the other answers.
#[test]
fn a_timed_out_attempt_is_retried_on_another_endpoint() {
    let (silent, silent_connections) = silent_upstream();
    let live = FakeUpstream::builder()
        .route("/", Reply::text(200, "live"))
        .start();
    let sluice = Sluice::start(
        "read_timeout = \"300ms\"\n",
        &format!(
            "[defaults]\nrps = 0.0\noutlier = {{ consecutive_failures = 0 }}\n\
             [resolve]\n\"{HOST}\" = [\"127.0.0.1:{silent}\", \"127.0.0.1:{}\"]\n",
            live.port()
        ),
    );
    let (status, head, body, _) = get(&sluice, "");
    assert_eq!((status, body.as_str()), (200, "live"), "{head}");
    assert_eq!(header_of(&head, "sluice-attempts").as_deref(), Some("2"));
    assert_eq!(silent_connections.load(Ordering::SeqCst), 1);
    assert_eq!(live.count(), 1);
}

/// A streamed body silent for longer than the request's deadline is not cut: the deadline
/// bounds the wait for the head only.
#[test]
fn a_body_outlives_the_deadline_while_it_is_not_idle_too_long() {
    let port = slow_body_upstream(Duration::from_millis(1500));
    let sluice = Sluice::start("", &pinned(port, "request_timeout = \"1s\""));
    let (status, head, body, _) = get(&sluice, "Sluice-Timeout: 1s\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(
        body.contains("first") && body.contains("second") && body.ends_with("0\r\n\r\n"),
        "the whole body, ended: {body:?}"
    );
}

/// A body silent for longer than `body_idle_timeout` is cut, and the client sees it cut: no
/// last chunk, the connection closed.
#[test]
fn a_body_silent_past_body_idle_timeout_is_cut_as_an_error() {
    let port = slow_body_upstream(Duration::from_secs(3));
    let sluice = Sluice::start("", &pinned(port, "body_idle_timeout = \"500ms\""));
    let (status, head, body, elapsed) = get(&sluice, "");
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("first"), "{body:?}");
    assert!(
        !body.contains("second") && !body.ends_with("0\r\n\r\n"),
        "a cut body never looks complete: {body:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "cut at its idle bound: {elapsed:?}"
    );
}

/// Before: a client that cancelled a stream was logged as `ERROR ... Fail to filter request
/// ... Connection reset by peer`. A client leaving is `client_closed` in the access log.
#[test]
fn a_client_that_leaves_mid_stream_is_client_closed_not_an_error() {
    let port = slow_body_upstream(Duration::from_millis(700));
    let sluice = Sluice::start("", &pinned(port, ""));
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(
        format!("GET /x HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n\r\n")
            .as_bytes(),
    )
    .expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    // Leave with a reset, as a client cancelling a stream often does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    {
        let _guard = rt.enter();
        s.set_nonblocking(true).ok();
        let t = tokio::net::TcpStream::from_std(s).expect("tokio stream");
        t.set_zero_linger().ok();
        drop(t);
    }
    assert_eventually!(
        sluice.log().contains("client_closed"),
        "the access line says client_closed: {}",
        sluice.log()
    );
    let log = sluice.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && (l.contains("Fail to") || l.contains("reset"))),
        "a client leaving is no error: {log}"
    );
}

/// Before: with the default deadline on every request, an upload that took longer than
/// `request_timeout` to a healthy upstream was cut with `504`. The host's own bound covers the
/// wait, the connects and the head; its clock stops while the body streams in.
#[test]
fn an_upload_longer_than_request_timeout_is_not_cut() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", &pinned(up.port(), "request_timeout = \"1s\""));
    // Ten pieces 200 ms apart: the body takes 2 s, twice the request_timeout.
    let mut s = slow_upload(&sluice, 10);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(up.requests()[0].body.len(), 50);
}
