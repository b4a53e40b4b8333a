//! Shared by the `demo` and `tail` examples: fake regions on loopback whose latency and status
//! follow a seeded random sequence, sluice started in this process, and a small HTTP client
//! loop with latency percentiles.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a fake region answers its `i`th request, from a random number in [0, 1).
pub type Behaviour = Arc<dyn Fn(f64) -> (u16, Duration) + Send + Sync>;

/// A fake region: HTTP/1.1 keep-alive on 127.0.0.1:0, counting the requests it receives.
pub struct FakeRegion {
    pub addr: SocketAddr,
    pub received: Arc<AtomicUsize>,
}

/// SplitMix64: a fixed seed gives the same sequence on every run.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn unit(x: u64) -> f64 {
    (splitmix(x) >> 11) as f64 / (1u64 << 53) as f64
}

impl FakeRegion {
    pub async fn start(seed: u64, behaviour: Behaviour) -> FakeRegion {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake region");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let rec = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (rec, counter, behaviour) = (rec.clone(), counter.clone(), behaviour.clone());
                tokio::spawn(async move {
                    s.set_nodelay(true).ok();
                    let mut buf = Vec::with_capacity(4096);
                    let mut chunk = [0u8; 4096];
                    loop {
                        let end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..end);
                        rec.fetch_add(1, Ordering::Relaxed);
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        let (status, delay) = behaviour(unit(seed ^ (i << 20)));
                        tokio::time::sleep(delay).await;
                        let body = if status == 200 { "ok\n" } else { "failing\n" };
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeRegion { addr, received }
    }

    pub fn count(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

/// Start sluice in this process on free ports with `extra` config; returns the proxy address.
pub fn start_sluice(extra: &str) -> SocketAddr {
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
    };
    let (proxy, admin) = (port(0), port(1));
    let text = format!(
        "[server]\nlisten = \"{proxy}\"\nadmin_listen = \"{admin}\"\nthreads = 1\naccess_log = false\n\
         [security]\nallow_cidrs = [\"127.0.0.0/8\"]\n{extra}"
    );
    let config = sluice::config::Config::parse(&text).expect("demo config parses");
    config.validate().expect("demo config is valid");
    std::thread::spawn(move || {
        let options = sluice::app::RunOptions {
            daemon: false,
            upgrade: false,
        };
        let server = sluice::app::build_server(config, None, options).expect("sluice builds");
        server.run_forever();
    });
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(proxy).is_err() {
        assert!(Instant::now() < until, "sluice did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}

/// Latencies and failures of a batch of calls.
#[derive(Default)]
pub struct Results {
    pub latencies: Vec<Duration>,
    pub failures: usize,
    pub total: Duration,
}

impl Results {
    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Run `n` calls of `call` with `concurrency` workers; a call returns whether it succeeded.
pub async fn run_calls<F, Fut>(n: usize, concurrency: usize, call: F) -> Results
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (call, next) = (call.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Results::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                let t = Instant::now();
                if call(i).await {
                    out.latencies.push(t.elapsed());
                } else {
                    out.failures += 1;
                }
            }
        }));
    }
    let mut all = Results::default();
    for w in workers {
        let r = w.await.expect("worker");
        all.latencies.extend(r.latencies);
        all.failures += r.failures;
    }
    all.total = started.elapsed();
    all
}

/// A client for calls through sluice (`Sluice-Target`) or straight to a region.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}
