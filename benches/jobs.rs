//! Jobs on the embedded store, over loopback against a release sluice:
//!
//! - accepted per second: `POST /_sluice/v1/jobs` from 32 concurrent clients, against the same
//!   clients sending the same call as a synchronous explicit-target request (the alternative
//!   a caller has), to an upstream that answers at once; the ratio is what taking the call
//!   durably costs next to making it;
//! - delivered per second: jobs with one webhook, from the first submission until every one
//!   is `delivered` (call made, result signed and acknowledged);
//! - memory and disk with 100,000 jobs queued (their host never answers, one worker): the
//!   sluice process's resident memory before and after, and the store file's size.
//!
//! Run: `cargo bench --bench jobs` (builds sluice in release; loopback only).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ACCEPT: usize = 5_000;
const DELIVER: usize = 2_000;
const QUEUED: usize = 100_000;
const CLIENTS: usize = 32;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An HTTP/1.1 server answering every request `204` at once (`answer`), or never.
async fn server(listener: TcpListener, answer: bool) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(8192);
            let mut chunk = [0u8; 8192];
            loop {
                while let Some(end) = head_end(&buf) {
                    let len = content_length(&buf[..end]);
                    if buf.len() < end + len {
                        break;
                    }
                    buf.drain(..end + len);
                    if !answer {
                        continue;
                    }
                    if tcp
                        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &[u8]) -> usize {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    text.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct Sluice {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &str) -> Sluice {
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let state = dir.path().join("state");
    let config = format!(
        "[server]\nlisten = \"{proxy}\"\nadmin_listen = \"{admin}\"\nthreads = 2\n\
         access_log = false\nstate_dir = \"{}\"\npid_file = \"{}\"\nupgrade_sock = \"{}\"\n\
         [security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
         [webhooks.secrets]\nmain = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n{extra}",
        state.display(),
        dir.path().join("pid").display(),
        dir.path().join("sock").display(),
    );
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(proxy).is_err() {
        assert!(Instant::now() < deadline, "sluice did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Sluice {
        child,
        proxy,
        admin,
        state,
        _dir: dir,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `n` requests from `CLIENTS` concurrent clients; the time they took.
async fn load(
    n: usize,
    send: impl Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Duration {
    let send = Arc::new(send);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (send, next) = (send.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let r = send(i).send().await.expect("request");
                assert!(r.status().is_success(), "status {}", r.status());
                let _ = r.bytes().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    start.elapsed()
}

async fn delivered(client: &reqwest::Client, admin: SocketAddr) -> u64 {
    let status: serde_json::Value = client
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status json");
    status["jobs"]["by_state"]["delivered"]
        .as_u64()
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fast = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let fast_addr = fast.local_addr().expect("addr");
        tokio::spawn(server(fast, true));
        let stalled = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stalled_addr = stalled.local_addr().expect("addr");
        tokio::spawn(server(stalled, false));
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(CLIENTS)
            .build()
            .expect("client");
        let unpaced = format!("[hosts.\"{fast_addr}\"]\nrps = 0.0\n");

        // Accepted per second, against the same call made synchronously.
        let sluice = start(&format!("{unpaced}[jobs]\nworkers = 8\n"));
        let (c, p) = (client.clone(), sluice.proxy);
        let sync = load(ACCEPT, move |i| {
            c.post(format!("http://{p}/call?n={i}"))
                .header("Sluice-Target", format!("http://{fast_addr}"))
                .body("{}")
        })
        .await;
        let (c, p) = (client.clone(), sluice.proxy);
        let accepted = load(ACCEPT, move |i| {
            c.post(format!("http://{p}/_sluice/v1/jobs"))
                .body(format!(
                    "{{\"url\": \"http://{fast_addr}/job?n={i}\", \"method\": \"POST\", \"body\": \"{{}}\"}}"
                ))
        })
        .await;
        let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "accept: {:.0} jobs/s; the same call made synchronously: {:.0} requests/s \
             (jobs accepted at {:.2}x the synchronous rate)",
            per_s(ACCEPT, accepted),
            per_s(ACCEPT, sync),
            sync.as_secs_f64() / accepted.as_secs_f64()
        );
        drop(sluice);

        // Delivered per second: call, result signed and acknowledged by a receiver.
        let sluice = start(&format!("{unpaced}[jobs]\nworkers = 32\n"));
        let (c, p) = (client.clone(), sluice.proxy);
        let start_at = Instant::now();
        load(DELIVER, move |i| {
            c.post(format!("http://{p}/_sluice/v1/jobs")).body(format!(
                "{{\"url\": \"http://{fast_addr}/job?n={i}\", \"webhooks\": \
                 [{{\"url\": \"http://{fast_addr}/hook\", \"secret\": \"main\"}}]}}"
            ))
        })
        .await;
        while delivered(&client, sluice.admin).await < DELIVER as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(start_at.elapsed() < Duration::from_secs(600), "deliveries stalled");
        }
        println!(
            "deliver: {:.0} jobs/s from submission to an acknowledged webhook ({DELIVER} jobs)",
            per_s(DELIVER, start_at.elapsed())
        );
        drop(sluice);

        // Memory and disk with 100,000 jobs queued.
        let sluice = start(&format!(
            "[hosts.\"{stalled_addr}\"]\nrps = 0.0\n[jobs]\nworkers = 1\n"
        ));
        let pid = sluice.child.id();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);
        let (c, p) = (client.clone(), sluice.proxy);
        let took = load(QUEUED, move |i| {
            c.post(format!("http://{p}/_sluice/v1/jobs")).body(format!(
                "{{\"url\": \"http://{stalled_addr}/job?n={i}\", \"method\": \"POST\", \
                 \"body\": \"{{\\\"n\\\": {i}}}\", \"webhooks\": \
                 [{{\"url\": \"http://{fast_addr}/hook\", \"secret\": \"main\"}}]}}"
            ))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid);
        let disk = dir_bytes(&sluice.state);
        println!(
            "queued: {QUEUED} jobs accepted in {:.1} s ({:.0}/s); resident memory {} MiB before, \
             {} MiB after ({:.0} bytes a job); store {:.1} MiB on disk ({:.0} bytes a job)",
            took.as_secs_f64(),
            per_s(QUEUED, took),
            before / 1024,
            after / 1024,
            (after.saturating_sub(before) * 1024) as f64 / QUEUED as f64,
            disk as f64 / (1024.0 * 1024.0),
            disk as f64 / QUEUED as f64
        );
    });
}
