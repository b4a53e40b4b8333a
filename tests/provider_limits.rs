//! Every "nothing left until T" form providers send holds the host's next request until T,
//! whichever budget ran out (requests or tokens): one upstream per form answers `200` with
//! the form's headers (T three seconds away), and the next request, allowed one second, is
//! refused at once without reaching the upstream.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;

fn form(name: &'static str, headers: Vec<(&'static str, String)>) -> (&'static str, FakeUpstream) {
    let mut reply = Reply::text(200, "ok");
    for (k, v) in &headers {
        reply = reply.header(k, v);
    }
    (name, FakeUpstream::builder().route("/", reply).start())
}

fn get(sluice: &Sluice, port: u16, timeout: &str) -> (u16, String) {
    let raw = raw_exchange(
        sluice.proxy,
        format!(
            "GET http://127.0.0.1:{port}/v1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Sluice-Timeout: {timeout}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("exchange");
    let (status, head, _) = split_response(&raw);
    (status, head)
}

#[test]
fn every_provider_form_holds_the_next_request_until_its_reset() {
    let now = SystemTime::now();
    let epoch = now.duration_since(UNIX_EPOCH).expect("clock").as_secs() + 3;
    let rfc3339 = humantime::format_rfc3339(now + Duration::from_secs(3)).to_string();
    let forms = vec![
        form(
            "openai requests",
            vec![
                ("x-ratelimit-remaining-requests", "0".into()),
                ("x-ratelimit-reset-requests", "3s".into()),
            ],
        ),
        form(
            "openai tokens",
            vec![
                ("x-ratelimit-remaining-requests", "499".into()),
                ("x-ratelimit-reset-requests", "120ms".into()),
                ("x-ratelimit-remaining-tokens", "0".into()),
                ("x-ratelimit-reset-tokens", "3s".into()),
            ],
        ),
        form(
            "anthropic requests",
            vec![
                ("anthropic-ratelimit-requests-remaining", "0".into()),
                ("anthropic-ratelimit-requests-reset", rfc3339.clone()),
            ],
        ),
        form(
            "anthropic tokens",
            vec![
                ("anthropic-ratelimit-tokens-remaining", "0".into()),
                ("anthropic-ratelimit-tokens-reset", rfc3339.clone()),
            ],
        ),
        form(
            "anthropic input tokens",
            vec![
                ("anthropic-ratelimit-input-tokens-remaining", "0".into()),
                ("anthropic-ratelimit-input-tokens-reset", rfc3339.clone()),
            ],
        ),
        form(
            "anthropic output tokens",
            vec![
                ("anthropic-ratelimit-output-tokens-remaining", "0".into()),
                ("anthropic-ratelimit-output-tokens-reset", rfc3339.clone()),
            ],
        ),
        form(
            "ietf RateLimit",
            vec![
                ("ratelimit-policy", "\"default\";q=100;w=60".into()),
                ("ratelimit", "\"default\";r=0;t=3".into()),
            ],
        ),
        form(
            "RateLimit-Remaining/-Reset",
            vec![
                ("ratelimit-limit", "100".into()),
                ("ratelimit-remaining", "0".into()),
                ("ratelimit-reset", "3".into()),
            ],
        ),
        form(
            "X-RateLimit delta",
            vec![
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", "3".into()),
            ],
        ),
        form(
            "X-RateLimit epoch seconds (GitHub)",
            vec![
                ("x-ratelimit-limit", "5000".into()),
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", epoch.to_string()),
            ],
        ),
        form(
            "X-RateLimit epoch milliseconds",
            vec![
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", (epoch * 1000).to_string()),
            ],
        ),
    ];
    let sluice = Sluice::start("", "");
    for (name, up) in &forms {
        let (first, head) = get(&sluice, up.port(), "5s");
        assert_eq!(first, 200, "{name}: {head}");
        let (second, head) = get(&sluice, up.port(), "1s");
        assert_eq!(second, 429, "{name} did not hold the next request: {head}");
        assert_eq!(
            header_of(&head, "sluice-error").as_deref(),
            Some("rate_limited"),
            "{name}"
        );
        assert_eq!(
            up.count(),
            1,
            "{name}: the held request reached the upstream"
        );
    }
    assert_eq!(sluice.metric("sluice_hint_errors_total"), 0.0);
}

/// A 429 that says the token budget ran out pauses the host until the token reset, not for
/// the 1 s a bare 429 gets.
#[test]
fn a_429_for_tokens_pauses_until_the_token_reset() {
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(429, "tokens")
                .header("x-ratelimit-remaining-tokens", "0")
                .header("x-ratelimit-reset-tokens", "4s"),
        )
        .start();
    let sluice = Sluice::start("", "");
    let (first, _) = get(&sluice, up.port(), "1s");
    assert_eq!(first, 429);
    let started = std::time::Instant::now();
    let (second, head) = get(&sluice, up.port(), "2s");
    assert_eq!(second, 429, "{head}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once: the pause outlasts the 2 s allowed"
    );
    let ra: u64 = header_of(&head, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((3..=4).contains(&ra), "Retry-After {ra}");
    assert_eq!(up.count(), 1);
}

#[test]
fn check_lists_every_header_read() {
    let dir = tempfile::tempdir().expect("dir");
    let out = check_config(dir.path(), "sluice.toml", "");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "retry-after-ms",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-reset",
        "ratelimit",
    ] {
        assert!(text.contains(name), "{name} missing from: {text}");
    }
}
