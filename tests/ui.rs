//! The live page at `/ui`, loaded in a real headless Chromium against a running sluice during
//! a 429 storm: what it shows must be what sluice knows (a paused host with its countdown and
//! source, an ejected region, refusals by code, the fleet breaker), and without the admin
//! token it shows nothing but the token form.
//!
//! Chromium comes from Debian's `chromium` package (`cargo xtask test` installs it); where it
//! is missing the test says so and passes, unless `SLUICE_REQUIRE_TOOLS=1`.
//! `SLUICE_UI_SCREENSHOT=path.png` also saves a screenshot (that is how `docs/ui.png` is made).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::redis::Redis;
use support::*;

const HOST: &str = "api.storm.test";
const TOKEN: &str = "ui-test-token-0123456789";

/// The page's DOM after its script ran for `virtual_ms` of virtual time (and, with `shot`, a
/// screenshot of it).
fn render(chromium: &Path, url: &str, shot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1100,1250",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match shot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    cmd.arg(url);
    let out = run_bounded(&mut cmd, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element whose opening tag contains `attr`, tags stripped.
fn element_text(dom: &str, attr: &str) -> Option<String> {
    let start = dom.find(attr)?;
    let open = dom[..start].rfind('<')?;
    let tag: String = dom[open + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    // Elements of the same tag nest, so count them to find the matching close.
    let mut depth = 0usize;
    let mut i = open;
    loop {
        let next_open = dom[i + 1..].find(&format!("<{tag}")).map(|p| p + i + 1);
        let next_close = dom[i + 1..].find(&format!("</{tag}>")).map(|p| p + i + 1)?;
        match next_open {
            Some(o) if o < next_close => {
                depth += 1;
                i = o;
            }
            _ => {
                if depth == 0 {
                    let inner = &dom[open..next_close];
                    let mut text = String::new();
                    let mut in_tag = false;
                    for c in inner.chars() {
                        match c {
                            '<' => in_tag = true,
                            '>' => {
                                in_tag = false;
                                text.push(' ');
                            }
                            _ if !in_tag => text.push(c),
                            _ => {}
                        }
                    }
                    return Some(text.split_whitespace().collect::<Vec<_>>().join(" "));
                }
                depth -= 1;
                i = next_close;
            }
        }
    }
}

#[test]
fn the_live_page_shows_a_429_storm() {
    let Some(chromium) = tool(&["chromium", "chromium-browser"], "chromium") else {
        return;
    };
    let redis = Redis::start();
    let storm = FakeUpstream::builder()
        .route("/", Reply::text(429, "slow down").retry_after("30"))
        .start();
    // Region a, tried first: a port nothing listens on, so its attempt fails and it is
    // ejected; region b answers.
    let dead = free_port();
    let shared = match &redis {
        Some(r) => format!(
            "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
            r.url()
        ),
        None => String::new(),
    };
    let sluice = Sluice::start(
        &format!("admin_token = \"{TOKEN}\"\n"),
        &format!(
            "{shared}[hosts.\"{HOST}\"]\nrps = 5.0\nburst = 5\nmax_queue_wait = \"1s\"\nmax_attempts = 2\n\
             outlier = {{ consecutive_failures = 1, base_ejection = \"60s\", max_ejection = \"5m\" }}\n\
             retry_on = [\"connect\"]\nregions = [\n  \
             {{ name = \"a\", address = \"127.0.0.1:{dead}\" }},\n  \
             {{ name = \"b\", address = \"127.0.0.1:{}\" }},\n]\n",
            storm.port()
        ),
    );
    // The storm: the first answer is the upstream's 429 (Retry-After: 30); the rest are
    // sluice's own refusals while the host is paused.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let raw = raw_exchange(
            sluice.proxy,
            format!(
                "GET /v1/chat HTTP/1.1\r\nHost: x\r\nSluice-Target: http://{HOST}\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("request");
        statuses.push(split_response(&raw).0);
    }
    assert!(statuses.iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(
        storm.count(),
        1,
        "only the first request reached the upstream"
    );

    let url = format!("http://{}/ui#token={TOKEN}", sluice.admin);
    let dom = render(&chromium, &url, None);
    let host = element_text(&dom, &format!("data-host=\"{HOST}:80\""))
        .unwrap_or_else(|| panic!("no card for the host in:\n{dom}"));
    assert!(host.contains("paused"), "{host}");
    // The countdown: 30 s less the time since the 429 (a few seconds at most).
    let pause = element_text(&dom, "data-field=\"pause\"")
        .unwrap_or_else(|| panic!("no pause line: {host}"));
    let left: u64 = pause
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("countdown in {pause:?}"));
    assert!((20..=30).contains(&left), "{pause}");
    assert!(pause.contains("(retry_after)"), "{pause}");
    assert!(host.contains("5/s"), "the pace: {host}");
    // The pause is not a queue: the refused requests wait for nothing.
    assert!(host.contains("queue 0 waiting"), "{host}");
    // Region a refused connections: ejected; its address is marked down.
    let region = element_text(&dom, &format!("data-region=\"{HOST}/a\"")).expect("region a");
    assert!(
        region.contains("ejected") || region.contains("unhealthy"),
        "{region}"
    );
    assert!(region.contains(&format!("127.0.0.1:{dead}")), "{region}");
    let region_b = element_text(&dom, &format!("data-region=\"{HOST}/b\"")).expect("region b");
    assert!(region_b.contains("b healthy"), "{region_b}");
    // Five refusals by sluice itself, by code.
    let refused = element_text(&dom, "data-code=\"rate_limited\"").expect("refusals row");
    assert!(refused.starts_with("rate_limited 5"), "{refused}");
    let fleet = match &redis {
        Some(_) => element_text(&dom, "data-breaker=").expect("breaker"),
        None => element_text(&dom, "id=\"fleet\"").expect("fleet"),
    };
    assert!(
        fleet.contains(if redis.is_some() {
            "breaker closed"
        } else {
            "memory"
        }),
        "{fleet}"
    );
    assert!(dom.contains(">live<"), "the page says it is live");

    if let Some(path) = std::env::var_os("SLUICE_UI_SCREENSHOT") {
        render(&chromium, &url, Some(Path::new(&path)));
    }

    // Without the token: the form, and no data.
    let dom = render(&chromium, &format!("http://{}/ui", sluice.admin), None);
    assert!(dom.contains("admin token needed"), "{dom}");
    assert!(!dom.contains(&format!("data-host=\"{HOST}")), "{dom}");
}

#[test]
fn the_live_page_shows_a_hosts_queue_by_caller() {
    let Some(chromium) = tool(&["chromium", "chromium-browser"], "chromium") else {
        return;
    };
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        &format!("admin_token = \"{TOKEN}\"\n"),
        &format!(
            "[hosts.\"127.0.0.1:{}\"]\nrps = 0.1\nburst = 1\nmax_queue_wait = \"60s\"\n",
            up.port()
        ),
    );
    // Callers a (4 requests) and b (2) at a host that takes one every 10 s: all but the first
    // wait (for as long as the page takes to load and render). Answered or cut when the test ends; nobody waits for them.
    for caller in ["a", "a", "a", "a", "b", "b"] {
        let (proxy, port) = (sluice.proxy, up.port());
        std::thread::spawn(move || {
            let _ = raw_exchange(
                proxy,
                format!(
                    "GET http://127.0.0.1:{port}/q HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                     Sluice-Caller: {caller}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            );
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("http://{}/ui#token={TOKEN}", sluice.admin);
    let dom = render(&chromium, &url, None);
    let callers = element_text(&dom, "data-field=\"callers\"")
        .unwrap_or_else(|| panic!("no queue by caller in:\n{dom}"));
    // The first request (a's) went at once; the other five wait.
    assert!(callers.contains("a: 3 waiting"), "{callers}");
    assert!(callers.contains("b: 2 waiting"), "{callers}");
}
