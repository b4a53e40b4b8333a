//! The regions demo: an API with two regions on loopback, `us-east-1` slow and flaky (a
//! quarter of its answers are 503, another quarter take 2 s) and `us-west-2` steady. The same
//! calls are made by a client-side retry loop against us-east-1, then through sluice in
//! `single`, `hedge` (after 200 ms) and `race` modes, each starting from fresh region state;
//! the comparison is printed side by side.
//!
//! `cargo run --release --example demo [-- CALLS CONCURRENCY]`

#[path = "common/mod.rs"]
mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const HOST: &str = "api.demo.test";

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let concurrency: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4);
    let east = FakeRegion::start(
        7,
        Arc::new(|u: f64| match u {
            u if u < 0.25 => (503, Duration::from_millis(20)),
            u if u < 0.50 => (200, Duration::from_secs(2)),
            _ => (200, Duration::from_millis(30)),
        }),
    )
    .await;
    let west = FakeRegion::start(11, Arc::new(|_| (200, Duration::from_millis(45)))).await;
    // One host per mode, each with the same two regions, so that every mode starts from
    // fresh region state (no latency learned, nothing ejected).
    let mut config = String::from("[defaults]\nrps = 0.0\n");
    for mode in ["single", "hedge", "race"] {
        config.push_str(&format!(
            "[hosts.\"{mode}.{HOST}\"]\nmode = \"{mode}\"\nhedge_after = \"200ms\"\nregions = [\n  \
             {{ name = \"us-east-1\", address = \"{}\" }},\n  \
             {{ name = \"us-west-2\", address = \"{}\" }},\n]\n",
            east.addr, west.addr
        ));
    }
    let proxy = start_sluice(&config);
    println!("{n} calls, {concurrency} at a time. us-east-1: 25% 503, 25% 2 s, else 30 ms; us-west-2: 45 ms.\n");
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "", "total s", "p50 ms", "p99 ms", "failed", "upstream", "retries"
    );

    // The usual client: retry 503s and timeouts against the one region it knows, with backoff.
    let before = east.count() + west.count();
    let retries = Arc::new(AtomicUsize::new(0));
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = format!("http://{}/v1/charge-status", east.addr);
    let r = retries.clone();
    let res = run_calls(n, concurrency, move |_| {
        let (c, url, r) = (c.clone(), url.clone(), r.clone());
        async move {
            for attempt in 0..3u32 {
                if attempt > 0 {
                    r.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                if let Ok(resp) = c.get(&url).send().await {
                    if resp.status().is_success() {
                        return resp.bytes().await.is_ok();
                    }
                }
            }
            false
        }
    })
    .await;
    row(
        "client retry loop (us-east-1)",
        &res,
        east.count() + west.count() - before,
        retries.load(Ordering::Relaxed),
    );

    for mode in ["single", "hedge", "race"] {
        let before = east.count() + west.count();
        let c = client();
        let url = format!("http://{proxy}/v1/charge-status");
        let extra = Arc::new(AtomicUsize::new(0));
        let e = extra.clone();
        let res = run_calls(n, concurrency, move |_| {
            let req = c
                .get(url.clone())
                .header("Sluice-Target", format!("http://{mode}.{HOST}"));
            let e = e.clone();
            async move {
                match req.send().await {
                    Ok(r) => {
                        let attempts: usize = r
                            .headers()
                            .get("sluice-attempts")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(1);
                        e.fetch_add(attempts.saturating_sub(1), Ordering::Relaxed);
                        r.status().is_success() && r.bytes().await.is_ok()
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        row(
            &format!("sluice {mode}"),
            &res,
            east.count() + west.count() - before,
            extra.load(Ordering::Relaxed),
        );
    }
    println!("\nupstream: requests the regions received; retries: extra attempts (sluice: Sluice-Attempts - 1).");
    std::process::exit(0);
}

fn row(name: &str, r: &Results, upstream: usize, retries: usize) {
    println!(
        "{:<28} {:>8.1} {:>8} {:>8} {:>8} {:>10} {:>9}",
        name,
        r.total.as_secs_f64(),
        ms(r.percentile(50.0)),
        ms(r.percentile(99.0)),
        r.failures,
        upstream,
        retries
    );
}
