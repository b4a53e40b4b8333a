//! Shared pacing against a real `redis-server` (started here on a free loopback port): one
//! node's admission decisions per second with the Redis backend, and Redis calls per admitted
//! request at 1x and 10x the host's limit, with and without token leases and the retry-after
//! cache. Run: `cargo bench --bench fleet` (prints a table; needs `redis-server` on PATH).

use sluice::admission::{Admission, Ask, Clock};
use sluice::config::Config;
use sluice::fleet::{redis::RedisStore, Fleet, Options};
use sluice::generation::Generation;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Redis(std::process::Child);

impl Drop for Redis {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("stopping redis-server: {e}");
        }
        if let Err(e) = self.0.wait() {
            eprintln!("waiting for redis-server: {e}");
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Run {
    decisions: u64,
    admitted: u64,
    calls: u64,
    seconds: f64,
}

const VARIANTS: [(&str, Options); 3] = [
    (
        "per request (no lease, no cache)",
        Options {
            leases: false,
            retry_after_cache: false,
        },
    ),
    (
        "retry-after cache, no lease",
        Options {
            leases: false,
            retry_after_cache: true,
        },
    ),
    (
        "leases + retry-after cache",
        Options {
            leases: true,
            retry_after_cache: true,
        },
    ),
];

/// One node (one `Admission` with its `Fleet`) pacing one host at `rps`/`burst`; requests
/// arrive every `every` (open loop) or, with `every = None`, from `closed` tasks back to back.
fn run(
    url: &str,
    prefix: &str,
    options: Options,
    (rps, burst): (f64, u32),
    every: Option<Duration>,
    closed: usize,
    length: Duration,
) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let text = format!(
            "[defaults]\nrps = {rps:?}\nburst = {burst}\n[shared]\nbackend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\ntimeout = \"200ms\"\n"
        );
        let config = Config::parse(&text).expect("config");
        config.validate().expect("valid");
        let clock = Arc::new(Clock::quanta());
        let fleet = Fleet::new(&config.shared, clock.clone(), options).expect("fleet");
        let store = Arc::new(RedisStore::new(&[url], prefix, Duration::from_millis(200), None).expect("store"));
        fleet.set_store(store.clone());
        let generation = Generation::build(1, config);
        let admission = Arc::new(Admission::with_fleet(clock, Some(fleet)));
        let cell = Arc::new(sluice::admission::Host::Cell(admission.cell("api.bench:443", "api.bench", &generation)));
        let decisions = Arc::new(AtomicU64::new(0));
        let admitted = Arc::new(AtomicU64::new(0));
        let calls_before = store.calls();
        let started = Instant::now();
        let stop = started + length;
        let max_wait = Duration::from_millis(500);
        let mut tasks = Vec::new();
        let one = move |admission: Arc<Admission>, cell: Arc<_>, d: Arc<AtomicU64>, a: Arc<AtomicU64>| async move {
            let ok = admission.acquire(&cell, &Ask::plain(max_wait)).await.is_ok();
            d.fetch_add(1, Ordering::Relaxed);
            if ok {
                a.fetch_add(1, Ordering::Relaxed);
            }
        };
        match every {
            Some(every) => {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while Instant::now() < stop {
                    tick.tick().await;
                    tasks.push(tokio::spawn(one(
                        admission.clone(),
                        cell.clone(),
                        decisions.clone(),
                        admitted.clone(),
                    )));
                }
            }
            None => {
                for _ in 0..closed {
                    let (adm, cell, d, a) = (admission.clone(), cell.clone(), decisions.clone(), admitted.clone());
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < stop {
                            one(adm.clone(), cell.clone(), d.clone(), a.clone()).await;
                        }
                    }));
                }
            }
        }
        for t in tasks {
            t.await.expect("task");
        }
        Run {
            decisions: decisions.load(Ordering::Relaxed),
            admitted: admitted.load(Ordering::Relaxed),
            calls: store.calls() - calls_before,
            seconds: started.elapsed().as_secs_f64(),
        }
    })
}

fn main() {
    let port = free_port();
    let child = match Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => Redis(c),
        Err(e) => {
            eprintln!("skipped: cannot start redis-server: {e}");
            return;
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("redis://127.0.0.1:{port}");
    let secs: u64 = std::env::var("SECONDS_PER_RUN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let length = Duration::from_secs(secs);

    println!("# decisions/s, one node, 64 requests back to back, pace 1,000,000/s burst 1000");
    println!("| variant | decisions/s | Redis calls per decision |");
    println!("|---|---|---|");
    for (i, (name, options)) in VARIANTS.iter().enumerate() {
        let r = run(
            &url,
            &format!("t{i}"),
            *options,
            (1e6, 1000),
            None,
            64,
            length,
        );
        println!(
            "| {name} | {:.0} | {:.3} |",
            r.decisions as f64 / r.seconds,
            r.calls as f64 / r.decisions.max(1) as f64
        );
    }
    let limit = 200.0;
    println!();
    println!("# offered load against a limit of {limit}/s (burst 10), open loop, max wait 500 ms");
    println!("| variant | offered | admitted/s | Redis calls/s | calls per admitted |");
    println!("|---|---|---|---|---|");
    for (factor, every) in [
        (1, Duration::from_micros(5_000)),
        (10, Duration::from_micros(500)),
    ] {
        for (i, (name, options)) in VARIANTS.iter().enumerate() {
            let r = run(
                &url,
                &format!("l{factor}-{i}"),
                *options,
                (limit, 10),
                Some(every),
                0,
                length,
            );
            println!(
                "| {name} | {factor}x | {:.0} | {:.0} | {:.2} |",
                r.admitted as f64 / r.seconds,
                r.calls as f64 / r.seconds,
                r.calls as f64 / r.admitted.max(1) as f64
            );
        }
    }
    drop(child);
}
