//! What TLS interception costs sluice, in CPU time of the sluice process (utime + stime from
//! /proc, over many operations), every variant in the same run, interleaved over rounds:
//!
//! - per request: requests on one kept-alive intercepted tunnel, against the same requests
//!   sent as explicit-target requests (`Sluice-Target: https://...`) on one kept-alive
//!   connection. Both reach the same TLS upstream over sluice's pooled upstream connection;
//!   interception adds the client side's TLS.
//! - per new tunnel: CONNECT + TLS handshake + one request, intercepted with the leaf cache
//!   warm (one host) and cold (a new host name each time, so a leaf is made each time),
//!   against a plain tunnel (sluice relays the client's TLS to the upstream untouched).
//!
//! Run: `cargo bench --bench intercept` (builds sluice in release; loopback only).

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types::ServerName};

const REQUESTS: usize = 3000;
const TUNNELS: usize = 400;
const ROUNDS: usize = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS upstream answering every request on a connection with a 2-byte body.
async fn upstream(listener: TcpListener, config: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            loop {
                while let Some(end) = find(&buf, b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if tls.write_all(answer).await.is_err() {
                        return;
                    }
                }
                match tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Send one request and read its answer (a head and a Content-Length body).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &[u8]) {
    s.write_all(request).await.expect("send");
    let mut got = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&got, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return;
            }
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed early");
        got.extend_from_slice(&chunk[..n]);
    }
}

async fn tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.set_nodelay(true).ok();
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.expect("read"), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    s
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.expect("cert")).expect("root");
    }
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // New tunnels must pay for full handshakes.
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

/// CPU seconds the process has used (all threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

struct Sluice(Child);

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("stopping sluice: {e}");
        }
        let _ = self.0.wait();
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");

    // The upstream's CA and leaf (bench.test, *.bench.test, plain.test).
    let up_ca_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let up_ca = p.self_signed(&up_ca_key).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec![
        "bench.test".into(),
        "*.bench.test".into(),
        "plain.test".into(),
    ])
    .expect("params")
    .signed_by(&leaf_key, &up_ca, &up_ca_key)
    .expect("leaf");
    std::fs::write(dir.path().join("upstream-ca.pem"), up_ca.pem()).expect("write");
    let server_config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("cert"),
    );
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let up_port = listener.local_addr().expect("addr").port();
    rt.spawn(upstream(listener, server_config));

    // sluice's CA, made by the command users run.
    let made = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ca", "init"])
        .arg(dir.path().join("ca"))
        .output()
        .expect("ca init");
    assert!(made.status.success());
    let sluice_ca = std::fs::read_to_string(dir.path().join("ca/ca.pem")).expect("ca");

    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin = free_port();
    let mut config = format!(
        "[server]\nlisten = \"{proxy}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nthreads = 1\n\
         access_log = false\nupstream_ca_file = \"{}\"\npid_file = \"{}\"\nupgrade_sock = \"{}\"\n\
         [defaults]\nrps = 0.0\n[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
         [intercept]\nhosts = [\"bench.test\", \"*.bench.test\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n\
         leaf_cache = 16\n[resolve]\n\"bench.test:443\" = [\"127.0.0.1:{up_port}\"]\n\
         \"plain.test:443\" = [\"127.0.0.1:{up_port}\"]\n",
        dir.path().join("upstream-ca.pem").display(),
        dir.path().join("sluice.pid").display(),
        dir.path().join("upgrade.sock").display(),
        dir.path().join("ca/ca.pem").display(),
        dir.path().join("ca/ca.key").display(),
    );
    for i in 0..ROUNDS * TUNNELS {
        config.push_str(&format!(
            "\"c{i}.bench.test:443\" = [\"127.0.0.1:{up_port}\"]\n"
        ));
    }
    let path = dir.path().join("sluice.toml");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(config.as_bytes()))
        .expect("config");
    let sluice = Sluice(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sluice"),
    );
    let pid = sluice.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(proxy).is_err() {
        assert!(Instant::now() < deadline, "sluice did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let intercepted = client_config(&sluice_ca);
    let direct = client_config(&up_ca.pem());
    let measure = |f: &dyn Fn() -> usize| -> f64 {
        let before = cpu_seconds(pid);
        let n = f();
        (cpu_seconds(pid) - before) / n as f64 * 1e6
    };
    let names = [
        "explicit target, per request",
        "intercepted tunnel, per request",
        "plain tunnel, per new tunnel",
        "intercepted, leaf warm, per new tunnel",
        "intercepted, leaf cold, per new tunnel",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Warm-up: connections, pools, the warm leaf.
    rt.block_on(async {
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        for _ in 0..100 {
            exchange(
                &mut s,
                b"GET /w HTTP/1.1\r\nHost: s\r\nSluice-Target: https://bench.test\r\n\r\n",
            )
            .await;
        }
        let tcp = tunnel(proxy, "bench.test:443").await;
        let name = ServerName::try_from("bench.test").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(intercepted.clone())
            .connect(name, tcp)
            .await
            .expect("tls");
        exchange(&mut tls, b"GET /w HTTP/1.1\r\nHost: bench.test\r\n\r\n").await;
    });
    for round in 0..ROUNDS {
        results[0].push(measure(&|| {
            rt.block_on(async {
                let mut s = TcpStream::connect(proxy).await.expect("connect");
                s.set_nodelay(true).ok();
                for _ in 0..REQUESTS {
                    exchange(
                        &mut s,
                        b"GET /x HTTP/1.1\r\nHost: s\r\nSluice-Target: https://bench.test\r\n\r\n",
                    )
                    .await;
                }
            });
            REQUESTS
        }));
        results[1].push(measure(&|| {
            rt.block_on(async {
                let tcp = tunnel(proxy, "bench.test:443").await;
                let name = ServerName::try_from("bench.test").expect("name");
                let mut tls = tokio_rustls::TlsConnector::from(intercepted.clone())
                    .connect(name, tcp)
                    .await
                    .expect("tls");
                for _ in 0..REQUESTS {
                    exchange(&mut tls, b"GET /x HTTP/1.1\r\nHost: bench.test\r\n\r\n").await;
                }
            });
            REQUESTS
        }));
        let new_tunnels = |host: &dyn Fn(usize) -> String, config: &Arc<rustls::ClientConfig>| {
            rt.block_on(async {
                for i in 0..TUNNELS {
                    let host = host(i);
                    let tcp = tunnel(proxy, &format!("{host}:443")).await;
                    let name = ServerName::try_from(host.clone()).expect("name");
                    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .expect("tls");
                    let req =
                        format!("GET /t HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                    exchange(&mut tls, req.as_bytes()).await;
                }
            });
            TUNNELS
        };
        results[2].push(measure(&|| new_tunnels(&|_| "plain.test".into(), &direct)));
        results[3].push(measure(&|| {
            new_tunnels(&|_| "bench.test".into(), &intercepted)
        }));
        results[4].push(measure(&|| {
            new_tunnels(
                &|i| format!("c{}.bench.test", round * TUNNELS + i),
                &intercepted,
            )
        }));
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "sluice CPU time (µs, median of {ROUNDS} rounds; {REQUESTS} requests or {TUNNELS} tunnels per round)"
    );
    let m: Vec<f64> = results.iter().map(|r| median(r)).collect();
    for (name, v) in names.iter().zip(&m) {
        println!("  {name:<42} {v:>8.1}");
    }
    println!(
        "  intercepted / explicit target, per request  {:>6.2}x",
        m[1] / m[0]
    );
    println!(
        "  intercepted warm / plain, per tunnel        {:>6.2}x",
        m[3] / m[2]
    );
    println!(
        "  intercepted cold / plain, per tunnel        {:>6.2}x",
        m[4] / m[2]
    );
    println!(
        "  leaf made (cold - warm), per tunnel         {:>8.1} µs",
        m[4] - m[3]
    );
    drop(sluice);
}
