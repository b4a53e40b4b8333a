//! Operations: SIGHUP and POST /reload under load, a refused reload, a graceful upgrade that
//! loses no request, and SIGTERM draining a slow request.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// Requests in a loop until stopped: (succeeded, failed with their first errors).
struct ClientLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    handle: Option<thread::JoinHandle<Vec<String>>>,
}

impl ClientLoop {
    /// One request per new connection (`Connection: close`), so every request also exercises
    /// the listener.
    fn start(proxy: std::net::SocketAddr, upstream_port: u16) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let handle = thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                let req = format!(
                    "GET http://127.0.0.1:{upstream_port}/loop/{i} HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\nConnection: close\r\n\r\n"
                );
                match raw_exchange(proxy, req.as_bytes()) {
                    Ok(raw) if split_response(&raw).0 == 200 => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(raw) => failures.push(format!("request {i}: {}", split_response(&raw).1)),
                    Err(e) => failures.push(format!("request {i}: {e}")),
                }
            }
            failures
        });
        ClientLoop {
            stop,
            ok,
            handle: Some(handle),
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stop the loop and assert that no request failed.
    fn finish_without_failures(self) {
        let (ok, failures) = self.finish();
        assert!(
            failures.is_empty(),
            "{} failed of {}: {:?}",
            failures.len(),
            ok,
            &failures[..failures.len().min(5)]
        );
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self
            .handle
            .take()
            .map(|h| h.join().expect("client loop"))
            .unwrap_or_default();
        (self.ok(), failures)
    }
}

fn status_pace(sluice: &Sluice, host: &str) -> f64 {
    let (_, body) = sluice.admin_get("/status");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    json["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["host"] == host))
        .and_then(|h| h["pace_rps"].as_f64())
        .unwrap_or(-1.0)
}

fn post_reload(sluice: &Sluice) -> (u16, String) {
    let raw = raw_exchange(
        sluice.admin,
        b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .expect("POST /reload");
    let (status, _, body) = split_response(&raw);
    (status, body)
}

#[test]
fn reloads_under_load_drop_nothing_and_apply_the_new_pace() {
    let up = FakeUpstream::builder().start();
    let host = format!("127.0.0.1:{}", up.port());
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"{host}\"]\nrps = 500.0\nburst = 50\n"),
    );
    let base = std::fs::read_to_string(sluice.config_path()).expect("config");
    let client = ClientLoop::start(sluice.proxy, up.port());
    assert_eventually!(client.ok() > 20, "loop running");
    for (i, rps) in [400.0, 300.0, 600.0, 350.0, 450.0].into_iter().enumerate() {
        let text = base.replace("rps = 500.0", &format!("rps = {rps:.1}"));
        std::fs::write(sluice.config_path(), text).expect("write config");
        let before = client.ok();
        if i % 2 == 0 {
            sluice.signal("HUP");
        } else {
            let (status, body) = post_reload(&sluice);
            assert_eq!(status, 200, "{body}");
            assert!(
                body.contains(&format!("\"generation\": {}", i + 2)),
                "{body}"
            );
        }
        assert_eventually!(
            (status_pace(&sluice, &host) - rps).abs() < 0.01,
            "pace {rps} after reload {i}"
        );
        assert_eventually!(client.ok() > before + 10, "traffic flows after reload {i}");
    }
    client.finish_without_failures();
    assert_eq!(
        sluice.metric("sluice_config_reloads_total{result=\"ok\"}"),
        5.0
    );
    assert_eq!(sluice.metric("sluice_config_generation"), 6.0);
}

#[test]
fn a_broken_file_is_refused_and_the_old_configuration_keeps_serving() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", "");
    let good = std::fs::read_to_string(sluice.config_path()).expect("config");
    std::fs::write(
        sluice.config_path(),
        format!("{good}\n[defaults]\nrps = \"fast\"\n"),
    )
    .expect("write");
    sluice.signal("HUP");
    assert_eventually!(
        sluice.metric("sluice_config_reloads_total{result=\"error\"}") == 1.0,
        "refused reload counted"
    );
    assert_eventually!(
        sluice.log().contains("reload refused") && sluice.log().contains("defaults.rps"),
        "reason logged: {}",
        sluice.log()
    );
    let (status, _, _) = http_get(sluice.proxy, "/").expect("still serving");
    assert_eq!(
        status, 400,
        "no_target from the old, still valid configuration"
    );
    let raw = raw_exchange(
        sluice.proxy,
        format!("GET http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n", p = up.port()).as_bytes(),
    )
    .expect("request");
    assert_eq!(split_response(&raw).0, 200);
    // A listener change is refused too, with the reason.
    std::fs::write(
        sluice.config_path(),
        good.replace(
            &sluice.proxy.to_string(),
            &format!("127.0.0.1:{}", free_port()),
        ),
    )
    .expect("write");
    let (status, body) = post_reload(&sluice);
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("server.listen") && body.contains("restart"),
        "{body}"
    );
    assert_eq!(sluice.metric("sluice_config_generation"), 1.0);
}

#[test]
fn an_upgrade_under_load_loses_no_request() {
    let up = FakeUpstream::builder().start();
    let host = format!("127.0.0.1:{}", up.port());
    let mut old = Sluice::start(
        "grace_period = \"1s\"\ngraceful_shutdown_timeout = \"1s\"\n",
        &format!("[hosts.\"{host}\"]\nrps = 0.0\n"),
    );
    let client = ClientLoop::start(old.proxy, up.port());
    assert_eventually!(client.ok() > 20, "loop running");
    let new = old.start_upgrade();
    // The new process waits for the sockets; give it a moment to open the upgrade socket.
    assert_eventually!(
        new.log().contains("Bootstrap"),
        "new process starting: {}",
        new.log()
    );
    thread::sleep(Duration::from_millis(300));
    old.signal("QUIT");
    let exited = old.wait_exit(Duration::from_secs(15));
    assert!(
        exited.is_some(),
        "old process exits after handing over: {}",
        old.log()
    );
    let after = client.ok();
    assert_eventually!(
        client.ok() > after + 50,
        "new process serves: {}",
        new.log()
    );
    client.finish_without_failures();
    let (status, _, _) = http_get(new.admin, "/healthz").expect("admin handed over");
    assert_eq!(status, 200);
}

#[test]
fn sigterm_lets_a_slow_request_finish_then_exits_within_grace() {
    let up = FakeUpstream::builder()
        .route(
            "/slow",
            Reply::text(200, "finished").latency(Duration::from_millis(1500)),
        )
        .start();
    let mut sluice = Sluice::start(
        "grace_period = \"3s\"\ngraceful_shutdown_timeout = \"1s\"\n",
        "",
    );
    let proxy = sluice.proxy;
    let port = up.port();
    let slow = thread::spawn(move || {
        raw_exchange(
            proxy,
            format!("GET http://127.0.0.1:{port}/slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    });
    assert_eventually!(up.count() == 1, "slow request reached the upstream");
    let sent = Instant::now();
    sluice.signal("TERM");
    let raw = slow.join().expect("thread").expect("slow request answered");
    let (status, _, body) = split_response(&raw);
    assert_eq!((status, body.as_str()), (200, "finished"));
    // New connections are refused while draining.
    assert_eventually!(
        std::net::TcpStream::connect(proxy).is_err(),
        "listener closed after SIGTERM"
    );
    let exited = sluice.wait_exit(Duration::from_secs(10));
    assert!(exited.is_some(), "exited: {}", sluice.log());
    assert!(
        sent.elapsed() < Duration::from_secs(3 + 1 + 2),
        "took {:?}",
        sent.elapsed()
    );
}

#[test]
fn sigterm_on_an_idle_proxy_exits_without_waiting_out_the_grace_period() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let mut sluice = Sluice::start(
        "grace_period = \"60s\"\ngraceful_shutdown_timeout = \"1s\"\n",
        "",
    );
    // One kept-alive connection, idle after its request: shutdown closes it at once.
    let mut kept = std::net::TcpStream::connect(sluice.proxy).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let port = up.port();
    std::io::Write::write_all(
        &mut kept,
        format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
            .as_bytes(),
    )
    .expect("send");
    let mut buf = [0u8; 4096];
    let n = std::io::Read::read(&mut kept, &mut buf).expect("answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    sluice.signal("TERM");
    // The grace period is a minute: exiting within 10 s means it was not waited out.
    let exited = sluice.wait_exit(Duration::from_secs(10));
    assert!(exited.is_some(), "still running: {}", sluice.log());
    assert!(
        sluice.log().contains("nothing left in flight"),
        "{}",
        sluice.log()
    );
    // The kept-alive connection was closed, not left hanging.
    assert_eq!(std::io::Read::read(&mut kept, &mut buf).unwrap_or(0), 0);
}

#[test]
fn systemd_unit_verifies() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        println!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/sluice.service")).expect("unit");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // Point the unit at this build and the reference config, then let systemd check it.
    let unit = unit
        .replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice"))
        .replace(
            "/etc/sluice/sluice.toml",
            &root.join("conf/sluice.toml").display().to_string(),
        );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sluice.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
