//! Test support: a programmable fake upstream, a test CA, a helper that runs the real `sluice`
//! binary on free ports, raw-socket helpers, and `assert_eventually!`.
#![allow(dead_code)]

pub mod dns;
pub mod llm;
pub mod redis;
pub mod strict;
pub mod upstream;

#[allow(unused_imports)]
pub use upstream::{EchoServer, FakeUpstream, Reply};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Retry an assertion until it holds or `$secs` seconds pass (default 10).
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if $cond { break; }
            if std::time::Instant::now() > deadline { panic!($($msg)+); }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }};
}

/// A CA made by `sluice ca init` in `dir`.
pub fn sluice_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ca", "init"])
        .arg(dir.join("ca"))
        .output()
        .expect("sluice ca init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SSL_CERT_FILE") && text.contains("NODE_EXTRA_CA_CERTS"),
        "{text}"
    );
    (dir.join("ca/ca.pem"), dir.join("ca/ca.key"))
}

/// A tokio runtime for a test's client side: current-thread.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A multi-thread tokio runtime with `workers` threads (for many concurrent clients).
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A CA and a server certificate it signed, for localhost, 127.0.0.1 and *.example.test.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sluice test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "api.example.test".to_string(),
            "*.example.test".to_string(),
        ])
        .expect("leaf params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("leaf cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_pem = ca.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca");
        TestCa {
            dir,
            ca_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn reqwest_cert(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("ca for reqwest")
    }
}

/// A running `sluice` process on free ports; stopped (by its PID) when dropped.
pub struct Sluice {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: std::sync::Arc<tempfile::TempDir>,
    log_name: String,
}

impl Sluice {
    /// Start sluice with `extra` TOML appended to a `[server]` section that sets the
    /// listeners (tests may add more `server` keys through `server_extra`). Unless `extra` has
    /// its own `[security]`, loopback destinations and any CONNECT port are allowed, since the
    /// fake upstreams live on 127.0.0.1.
    pub fn start(server_extra: &str, extra: &str) -> Sluice {
        let mut last_err = String::new();
        for _ in 0..5 {
            match Self::try_start(server_extra, extra) {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("sluice did not start: {last_err}");
    }

    fn try_start(server_extra: &str, extra: &str) -> Result<Sluice, String> {
        let security = if extra.contains("[security]") {
            ""
        } else {
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\nconnect_any_port = true\n"
        };
        let extra = format!("{security}{extra}");
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .map_err(|_| "addr")?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .map_err(|_| "addr")?;
        // Two worker threads unless the test names its own number.
        let threads = if server_extra.contains("threads") {
            ""
        } else {
            "threads = 2\n"
        };
        // Never the machine's nameserver: a test DNS server of this process, which knows no
        // name (`localhost` comes from /etc/hosts), unless the test names its own.
        let dns = if server_extra.contains("dns_servers") {
            String::new()
        } else {
            format!("dns_servers = [\"{}\"]\n", no_names_dns().addr())
        };
        let config = format!(
            "[server]\nlisten = \"{proxy}\"\nadmin_listen = \"{admin}\"\n{threads}{dns}\
             pid_file = \"{pid}\"\nupgrade_sock = \"{sock}\"\nstate_dir = \"{state}\"\n\
             {server_extra}\n{extra}\n",
            pid = dir.path().join("sluice.pid").display(),
            sock = dir.path().join("upgrade.sock").display(),
            state = dir.path().join("state").display(),
        );
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let mut child = spawn(&config_path, &dir.path().join("sluice.log"))?;
        match ready(&mut child, proxy, admin) {
            Ok(()) => Ok(Sluice {
                child,
                proxy,
                admin,
                dir: std::sync::Arc::new(dir),
                log_name: "sluice.log".into(),
            }),
            Err(e) => {
                let log =
                    std::fs::read_to_string(dir.path().join("sluice.log")).unwrap_or_default();
                Err(format!("{e}: {log}"))
            }
        }
    }

    /// Kill the process (SIGKILL: nothing of a shutdown runs).
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    /// Kill the process (SIGKILL: nothing of a shutdown runs), then start a new one on the
    /// same configuration, ports and state directory (its log: `sluice-N.log`).
    pub fn crash_and_restart(&mut self) {
        stop(&mut self.child);
        let n = self.dir.path().read_dir().map_or(0, |d| d.count());
        self.log_name = format!("sluice-{n}.log");
        let log = self.dir.path().join(&self.log_name);
        self.child = spawn(&self.config_path(), &log).expect("restart sluice");
        if let Err(e) = ready(&mut self.child, self.proxy, self.admin) {
            panic!("restarted sluice: {e}: {}", self.log());
        }
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(&self.log_name)).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (e.g. "HUP", "TERM", "QUIT") to this process, by its PID.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -s {sig} {}", self.pid());
    }

    /// Wait up to `within` for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start a second process on the same configuration with `--upgrade`: it waits to
    /// receive the listening sockets from this one (send this one SIGQUIT).
    pub fn start_upgrade(&self) -> Sluice {
        let log_name = "sluice-upgrade.log".to_string();
        let log = std::fs::File::create(self.dir.path().join(&log_name)).expect("log");
        let log2 = log.try_clone().expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--config")
            .arg(self.config_path())
            .arg("--upgrade")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn upgraded sluice");
        Sluice {
            child,
            proxy: self.proxy,
            admin: self.admin,
            dir: self.dir.clone(),
            log_name,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sluice.toml")
    }

    /// GET a path on the admin listener.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = http_get(self.admin, path).expect("admin request");
        (status, body)
    }

    /// The sum of every series of a metric whose labels include the given ones, e.g.
    /// `sluice_requests_total{outcome="ok",way="forward"}` (any host) or `sluice_tunnels_active`.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics");
        let (name, want) = match series.split_once('{') {
            Some((n, rest)) => (n, labels_of(rest.trim_end_matches('}'))),
            None => (series, Vec::new()),
        };
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (head, value) = l.rsplit_once(' ')?;
                let (n, labels) = match head.split_once('{') {
                    Some((n, rest)) => (n, labels_of(rest.trim_end_matches('}'))),
                    None => (head, Vec::new()),
                };
                (n == name && want.iter().all(|w| labels.contains(w)))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}

fn labels_of(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.trim().to_string())
        .collect()
}

impl Drop for Sluice {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Start sluice on a configuration file, its output to `log`.
fn spawn(config: &std::path::Path, log: &std::path::Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn sluice: {e}"))
}

/// Wait (up to 20 s) until both listeners answer; stop the process if they never do.
fn ready(child: &mut Child, proxy: SocketAddr, admin: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("sluice exited with {status}"));
        }
        // Both ports must be this process's own listening sockets: a port chosen free may
        // have been taken meanwhile by another test's sluice or upstream, whose answers
        // would otherwise pass for this one's (and the test would talk to the wrong process).
        if let Ok((200, _, _)) = http_get(admin, "/healthz") {
            if TcpStream::connect(proxy).is_ok()
                && listens_on(child.id(), proxy.port())
                && listens_on(child.id(), admin.port())
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            stop(child);
            return Err("sluice did not become healthy in 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Does process `pid` hold a socket listening on 127.0.0.1:`port`? The listening sockets of
/// `/proc/net/tcp` on that port, matched by inode against the process's open files.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let wanted = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            (f.len() > 9 && f[1].ends_with(&wanted) && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]"))
        })
    })
}

fn stop(child: &mut Child) {
    if let Err(e) = child.kill() {
        eprintln!("stopping sluice: {e}");
    }
    if let Err(e) = child.wait() {
        eprintln!("waiting for sluice: {e}");
    }
}

/// The test DNS server that answers NXDOMAIN to every name, shared by the process.
pub fn no_names_dns() -> &'static dns::DnsServer {
    static DNS: std::sync::OnceLock<dns::DnsServer> = std::sync::OnceLock::new();
    DNS.get_or_init(|| dns::DnsServer::start(&[]))
}

/// A blocking one-shot HTTP/1.1 GET with `Connection: close`: (status, head, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let raw = raw_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let (status, head, body) = split_response(&raw);
    Ok((status, head, body))
}

/// Send bytes, read until the server closes (bounded by a 10 s read timeout).
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Split a raw response into status, head text and body text.
pub fn split_response(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// Header value from a raw head (case-insensitive name).
pub fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// A reqwest client that uses sluice as its HTTP and HTTPS proxy.
pub fn proxied_client(sluice: &Sluice, ca: Option<&TestCa>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sluice.proxy_url()).expect("proxy url"))
        .timeout(Duration::from_secs(20));
    if let Some(ca) = ca {
        b = b.add_root_certificate(ca.reqwest_cert());
    }
    b.build().expect("client")
}

/// A reqwest client talking to sluice directly (explicit target, routes).
pub fn direct_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Write a config file into `dir` and run `sluice --check --config` on it.
pub fn check_config(dir: &Path, name: &str, text: &str) -> std::process::Output {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    check_file(&path)
}

pub fn check_file(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check")
        .arg("--config")
        .arg(path)
        .env_remove("SLUICE_CONFIG")
        .output()
        .expect("run sluice --check")
}

/// A program a test needs, found on `PATH` under one of `names`; `None`, with the reason
/// printed, when it is missing, unless `SLUICE_REQUIRE_TOOLS=1` (set by `cargo xtask test`
/// and so by CI), under which a missing program fails the test.
pub fn tool(names: &[&str], package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var("SLUICE_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{} is not installed and SLUICE_REQUIRE_TOOLS=1 (apt-get install {package})",
            names[0]
        );
        eprintln!(
            "skipped: {} is not installed (apt-get install {package})",
            names[0]
        );
    }
    found
}

/// Run `cmd` until it exits, or kill it (by its PID) after `within`; its output.
pub fn run_bounded(cmd: &mut Command, within: Duration) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} did not finish in {within:?}");
        }
    }
}
