//! Tail benchmark: two regions, each answering 5% of requests after 1 s and the rest after
//! about 10 ms (independently, from a fixed seed). 2,000 requests through sluice in `single`,
//! `hedge` at p95 and `race`; prints p50, p99, p99.9 and the extra upstream requests.
//!
//! `cargo run --release --example tail [-- REQUESTS CONCURRENCY SEED]`

#[path = "common/mod.rs"]
mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;

const HOST: &str = "api.tail.test";

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let concurrency: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(16);
    let seed: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(42);
    let tail: Behaviour = Arc::new(|u: f64| {
        if u < 0.05 {
            (200, Duration::from_secs(1))
        } else {
            // 8 to 12 ms.
            (
                200,
                Duration::from_micros(8_000 + (u * 80_000.0) as u64 % 4_000),
            )
        }
    });
    let r1 = FakeRegion::start(seed, tail.clone()).await;
    let r2 = FakeRegion::start(seed.wrapping_mul(31).wrapping_add(7), tail).await;
    let proxy = start_sluice(&format!(
        "[defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\nmax_attempts = 2\nregions = [\n  \
         {{ name = \"r1\", address = \"{}\" }},\n  {{ name = \"r2\", address = \"{}\" }},\n]\n",
        r1.addr, r2.addr
    ));
    println!(
        "{n} requests, {concurrency} at a time, seed {seed}; each region: 5% at 1 s, else ~10 ms\n"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>10} {:>9} {:>16}",
        "mode", "p50 ms", "p99 ms", "p99.9 ms", "failed", "extra upstream"
    );
    let mut p99_single = Duration::ZERO;
    for (mode, hedge_after) in [("single", None), ("hedge", Some("p95")), ("race", None)] {
        let before = r1.count() + r2.count();
        let c = client();
        let url = format!("http://{proxy}/v1/item");
        let res = run_calls(n, concurrency, move |_| {
            let mut req = c
                .get(url.clone())
                .header("Sluice-Target", format!("http://{HOST}"))
                .header("Sluice-Mode", mode);
            if let Some(h) = hedge_after {
                req = req.header("Sluice-Hedge-After", h);
            }
            async move {
                match req.send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        let extra = (r1.count() + r2.count()) as i64 - before as i64 - n as i64;
        let p99 = res.percentile(99.0);
        if mode == "single" {
            p99_single = p99;
        }
        println!(
            "{:<12} {:>9} {:>9} {:>10} {:>9} {:>9} ({:>4.1}%)",
            if mode == "hedge" { "hedge p95" } else { mode },
            ms(res.percentile(50.0)),
            ms(p99),
            ms(res.percentile(99.9)),
            res.failures,
            extra,
            extra as f64 * 100.0 / n as f64
        );
        if mode == "hedge" && !p99.is_zero() {
            println!(
                "{:<12} p99 single / hedge = {:.1}x",
                "",
                p99_single.as_secs_f64() / p99.as_secs_f64()
            );
        }
    }
    std::process::exit(0);
}
