//! CONNECT load generator for `benches/load.sh`: `connect_load PROXY TARGET CONCURRENCY SECS`
//! opens tunnels through PROXY to TARGET as fast as CONCURRENCY workers can for SECS seconds
//! (each: connect, CONNECT, read the 200, close) and prints `tunnels=N rate=R p50_us=.. p99_us=..`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: connect_load PROXY TARGET CONCURRENCY SECS");
        std::process::exit(2);
    }
    let proxy: SocketAddr = args[1].parse().expect("PROXY is ip:port");
    let target = args[2].clone();
    let workers: usize = args[3].parse().expect("CONCURRENCY");
    let secs: u64 = args[4].parse().expect("SECS");
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failures = 0u64;
            let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
            while Instant::now() < until {
                let t = Instant::now();
                let ok = async {
                    let mut s = tokio::net::TcpStream::connect(proxy).await.ok()?;
                    s.set_nodelay(true).ok()?;
                    s.write_all(head.as_bytes()).await.ok()?;
                    let mut buf = [0u8; 256];
                    let mut got = 0;
                    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf[got..]).await.ok()?;
                        if n == 0 || got + n >= buf.len() {
                            return None;
                        }
                        got += n;
                    }
                    // "HTTP/1.0 200" (tinyproxy) or "HTTP/1.1 200".
                    (buf.starts_with(b"HTTP/1.") && buf[8..].starts_with(b" 200")).then_some(())
                }
                .await;
                match ok {
                    Some(()) => lat.push(t.elapsed().as_micros() as u64),
                    None => failures += 1,
                }
            }
            (lat, failures)
        }));
    }
    let mut all = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (lat, f) = t.await.expect("worker");
        all.extend(lat);
        failures += f;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)]
        }
    };
    println!(
        "tunnels={} failures={} rate={:.0} p50_us={} p99_us={}",
        all.len(),
        failures,
        all.len() as f64 / secs as f64,
        pct(0.50),
        pct(0.99)
    );
}
