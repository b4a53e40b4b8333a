//! The middleware against the real sluice binary (`SLUICE_BIN`, as `cargo xtask test` sets)
//! and a fake upstream on 127.0.0.1.

use reqwest_middleware::ClientBuilder;
use sluice_client::{Mode, SluiceMiddleware};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Sluice {
    child: Child,
    url: String,
    _dir: std::path::PathBuf,
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("stopping sluice: {e}");
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// sluice on free ports, or `None` (and why) when no binary is given.
fn sluice() -> Option<Sluice> {
    let Some(bin) = std::env::var_os("SLUICE_BIN") else {
        println!("skipped: SLUICE_BIN is not set (cargo xtask test sets it)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!(
        "sluice-client-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         threads = 2\nstate_dir = \"{d}/state\"\npid_file = \"{d}/pid\"\n\
         upgrade_sock = \"{d}/sock\"\ndns_servers = [\"127.0.0.1:{dns}\"]\n\
         [security]\nallow_cidrs = [\"127.0.0.0/8\"]\n",
        d = dir.display(),
        dns = free_port()
    );
    std::fs::write(dir.join("sluice.toml"), config).expect("config");
    let child = Command::new(bin)
        .arg("--config")
        .arg(dir.join("sluice.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        assert!(Instant::now() < deadline, "sluice did not start");
        std::thread::sleep(Duration::from_millis(25));
    }
    Some(Sluice {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    })
}

/// A recorded request: method, path, `Via`.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// An upstream: `/ok` 200, `/busy` 503, `/limited` 429 for a second after its first request.
async fn upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let window: Arc<Mutex<Option<Instant>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let (log, window) = (log.clone(), window.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + len);
                    let mut first = head.lines().next().unwrap_or("").split(' ');
                    let method = first.next().unwrap_or("").to_string();
                    let path = first.next().unwrap_or("").to_string();
                    let via = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("via:")
                                .map(|v| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    log.lock().expect("log").push((method, path.clone(), via));
                    let status = if path.starts_with("/busy") {
                        "503 Service Unavailable"
                    } else if path.starts_with("/limited") {
                        let mut w = window.lock().expect("window");
                        let now = Instant::now();
                        match *w {
                            None => {
                                *w = Some(now + Duration::from_secs(1));
                                "429 Too Many Requests"
                            }
                            Some(until) if now < until => "429 Too Many Requests",
                            Some(_) => "200 OK",
                        }
                    } else {
                        "200 OK"
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\nok"
                    );
                    if tcp.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn performance_goes_through_sluice_and_direct_when_it_is_away() {
    let Some(mut sluice) = sluice() else { return };
    let (up, seen) = upstream().await;
    let middleware = SluiceMiddleware::new(&sluice.url, Mode::Performance)
        .expect("url")
        .sluice_timeout("5s");
    let stats = middleware.stats();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build();
    let r = client
        .get(format!("http://{up}/ok?x=1"))
        .send()
        .await
        .expect("via sluice");
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("sluice-attempts"));
    sluice.child.kill().expect("stop sluice");
    let _ = sluice.child.wait();
    let r = client
        .get(format!("http://{up}/ok"))
        .send()
        .await
        .expect("direct");
    assert_eq!(r.status(), 200);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen[0].1, "/ok?x=1");
    assert!(seen[0].2.contains("sluice"), "{seen:?}");
    assert!(seen[1].2.is_empty(), "straight to the API: {seen:?}");
    assert_eq!(stats.sluice_unavailable.load(Ordering::Relaxed), 1);
    assert_eq!(stats.via_sluice.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn frugal_waits_out_a_429_through_sluice_and_never_resends_a_bare_post_after_a_503() {
    let Some(sluice) = sluice() else { return };
    let (up, seen) = upstream().await;
    let middleware = SluiceMiddleware::new(&sluice.url, Mode::Frugal).expect("url");
    let stats = middleware.stats();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build();
    let started = Instant::now();
    let r = client
        .post(format!("http://{up}/limited"))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200, "through sluice after the pause");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(stats.fell_back_to_sluice.load(Ordering::Relaxed), 1);
    let r = client
        .post(format!("http://{up}/busy"))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 503);
    let busy = seen
        .lock()
        .expect("seen")
        .iter()
        .filter(|s| s.1 == "/busy")
        .count();
    assert_eq!(busy, 1, "a POST without Idempotency-Key is sent once");
    let r = client
        .get(format!("http://{up}/busy"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 503);
    let busy = seen
        .lock()
        .expect("seen")
        .iter()
        .filter(|s| s.1 == "/busy")
        .count();
    assert!(busy >= 3, "a GET goes again through sluice: {busy}");
}
