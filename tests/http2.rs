//! HTTP/2 both ways: h2 to upstreams (multiplexed, by ALPN over TLS, h2c for gRPC), h2c with
//! prior knowledge from clients on the listener, h2 by ALPN inside intercepted tunnels, gRPC
//! with its status trailers, and an upstream's GOAWAY in the middle of a load.

mod support;

use bytes::Bytes;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use support::*;

const HOST: &str = "api.example.test";
const NEVER: &str = "never.example.test";

/// A gRPC message frame: not compressed, its length, the bytes.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

/// An h2 connection with prior knowledge (h2c) to `addr`.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        conn.await.ok();
    });
    send
}

/// What an h2 request got back.
struct H2Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
    /// The stream ended with the response head (`END_STREAM` on `HEADERS`).
    ended_with_head: bool,
}

impl H2Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.as_ref()?.get(name)?.to_str().ok()
    }
}

async fn h2_call(
    send: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<Vec<u8>>,
) -> H2Answer {
    let mut send = send.clone().ready().await.expect("stream");
    let (resp, mut out) = send.send_request(req, body.is_none()).expect("send");
    if let Some(b) = body {
        out.send_data(Bytes::from(b), true).expect("body");
    }
    let resp = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("answer within 20 s")
        .expect("answer");
    let (parts, mut incoming) = resp.into_parts();
    let ended_with_head = incoming.is_end_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = incoming.data().await {
        let chunk = chunk.expect("body chunk");
        incoming.flow_control().release_capacity(chunk.len()).ok();
        bytes.extend_from_slice(&chunk);
    }
    let trailers = incoming.trailers().await.expect("trailers");
    H2Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: bytes,
        trailers,
        ended_with_head,
    }
}

fn grpc_request(uri: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// 50 requests at once for `host`, each answered.
async fn fifty_at_once(client: &reqwest::Client, sluice: &Sluice, host: &str) {
    let url = format!("{}/item", sluice.proxy_url());
    let calls = (0..50).map(|i| {
        client
            .get(format!("{url}/{i}"))
            .header("Sluice-Target", format!("https://{host}"))
            .send()
    });
    for r in futures_util::future::join_all(calls).await {
        let r = r.unwrap_or_else(|e| panic!("{e}: {}", sluice.log()));
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.expect("body"), "multiplexed");
    }
}

#[test]
fn fifty_concurrent_requests_share_one_h2_connection_and_never_stays_on_http1() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "multiplexed").latency(Duration::from_millis(200)),
        )
        .tls(&ca)
        .h2()
        .start();
    let sluice = Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", ca.ca_path().display()),
        &format!(
            "[resolve]\n\"{HOST}:443\" = [\"127.0.0.1:{port}\"]\n\"{NEVER}:443\" = [\"127.0.0.1:{port}\"]\n\
             [hosts.\"{HOST}\"]\nrps = 0\n[hosts.\"{NEVER}\"]\nrps = 0\nhttp2 = \"never\"\n",
            port = up.port()
        ),
    );
    let client = direct_client();
    support::rt().block_on(fifty_at_once(&client, &sluice, HOST));
    let seen = up.requests();
    assert_eq!(seen.len(), 50);
    assert!(
        seen.iter().all(|r| r.version == "HTTP/2.0"),
        "{:?}",
        seen[0]
    );
    assert!(seen
        .iter()
        .all(|r| r.header("host").is_none_or(|h| h == HOST)));
    assert!(
        up.connections() <= 2,
        "50 concurrent requests over {} connections",
        up.connections()
    );
    let series = "sluice_requests_by_protocol_total{client=\"http/1.1\",upstream=\"h2\"}";
    assert_eventually!(
        sluice.metric(series) == 50.0,
        "{}: {}",
        series,
        sluice.metric(series)
    );
    // /status: no exchange open now, and the h2 connections opened, for sluice and per host.
    let (_, status) = sluice.admin_get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let open = &status["upstream_streams"];
    assert_eq!(open["h2"], 0, "{open}");
    assert_eq!(
        open["connections_opened"]["h2"].as_u64(),
        Some(up.connections() as u64),
        "{open}"
    );
    let host = status["upstream_hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["host"] == format!("{HOST}:443")))
        .unwrap_or_else(|| panic!("{HOST} in /status: {}", status["upstream_hosts"]));
    assert_eq!(
        host["connections_opened"]["h2"].as_u64(),
        Some(up.connections() as u64),
        "{host}"
    );
    let before = up.connections();
    support::rt().block_on(fifty_at_once(&client, &sluice, NEVER));
    let seen = up.requests();
    assert_eq!(seen.len(), 100);
    assert!(seen[50..].iter().all(|r| r.version == "HTTP/1.1"));
    assert!(
        up.connections() - before > 2,
        "HTTP/1.1 carries one request at a time per connection"
    );
    assert!(
        sluice.log().contains("upstream_protocol=\"h2\"")
            || sluice.log().contains("upstream_protocol=h2"),
        "{}",
        sluice.log()
    );
}

#[test]
fn h2c_with_prior_knowledge_to_a_route_is_answered_over_h2() {
    let up = FakeUpstream::builder()
        .route("/v1/hello", Reply::text(200, "hello over h2"))
        .start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[[routes]]\nprefix = \"/up\"\ntarget = \"http://127.0.0.1:{}\"\n\
             [hosts.\"127.0.0.1\"]\nrps = 0\n",
            up.port()
        ),
    );
    support::rt().block_on(async {
        let send = h2c(sluice.proxy).await;
        let req = http::Request::builder()
            .uri(format!("http://{}/up/v1/hello", sluice.proxy))
            .body(())
            .expect("request");
        let a = h2_call(&send, req, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"hello over h2");
        assert_eq!(a.header("sluice-attempts"), "1");
        // Several streams at once on the one connection.
        let calls = (0..8).map(|_| {
            let req = http::Request::builder()
                .uri(format!("http://{}/up/v1/hello", sluice.proxy))
                .body(())
                .expect("request");
            h2_call(&send, req, None)
        });
        for a in futures_util::future::join_all(calls).await {
            assert_eq!(a.status, 200);
        }
        // A body of no stated length (as h2 allows) reaches an HTTP/1.1 upstream whole.
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/up/echo", sluice.proxy))
            .body(())
            .expect("request");
        let a = h2_call(&send, req, Some(b"a body with no length".to_vec())).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"a body with no length");
        // A request with no destination is refused on its own stream, with its code.
        let req = http::Request::builder()
            .uri(format!("http://{}/nowhere", sluice.proxy))
            .body(())
            .expect("request");
        let a = h2_call(&send, req, None).await;
        assert_eq!(a.status, 400);
        assert_eq!(a.header("sluice-error"), "no_target");
    });
    assert_eq!(up.count(), 10);
    assert!(up.requests().iter().all(|r| r.version == "HTTP/1.1"));
    let series = "sluice_requests_by_protocol_total{client=\"h2\",upstream=\"http/1.1\"}";
    assert_eventually!(
        sluice.metric(series) == 10.0,
        "{}: {}",
        series,
        sluice.metric(series)
    );
}

#[test]
fn grpc_through_a_route_keeps_its_trailers_and_resource_exhausted_pauses_the_host() {
    let stream_frames: Vec<Vec<u8>> = (0..3)
        .map(|i| grpc_frame(format!("part {i}").as_bytes()))
        .collect();
    let parts: Vec<&str> = stream_frames
        .iter()
        .map(|f| std::str::from_utf8(f).expect("ascii frames"))
        .collect();
    let unary = String::from_utf8(grpc_frame(b"pong")).expect("ascii");
    let up = FakeUpstream::builder()
        .route(
            "/pkg.Echo/Unary",
            Reply::text(200, &unary)
                .header("content-type", "application/grpc")
                .trailer("grpc-status", "0")
                .trailer("grpc-message", "fine")
                .trailer("sluice-error", "forged"),
        )
        .route(
            "/pkg.Echo/Stream",
            Reply::chunked(200, &parts)
                .header("content-type", "application/grpc")
                .trailer("grpc-status", "0"),
        )
        .route(
            "/pkg.Echo/Gone",
            Reply::text(200, "")
                .header("content-type", "application/grpc")
                .header("grpc-status", "5")
                .header("grpc-message", "no such thing"),
        )
        .route(
            "/pkg.Echo/Busy",
            Reply::text(200, "")
                .header("content-type", "application/grpc")
                .trailer("grpc-status", "8")
                .trailer("grpc-message", "quota")
                .trailer("grpc-retry-pushback-ms", "5000"),
        )
        .h2()
        .start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[[routes]]\nprefix = \"/pkg.Echo\"\ntarget = \"http://127.0.0.1:{}/pkg.Echo\"\n\
             [hosts.\"127.0.0.1\"]\nrps = 0\n",
            up.port()
        ),
    );
    support::rt().block_on(async {
        let send = h2c(sluice.proxy).await;
        let base = format!("http://{}", sluice.proxy);
        let a = h2_call(
            &send,
            grpc_request(&format!("{base}/pkg.Echo/Unary")),
            Some(grpc_frame(b"ping")),
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, grpc_frame(b"pong"));
        assert_eq!(a.trailer("grpc-status"), Some("0"));
        assert_eq!(a.trailer("grpc-message"), Some("fine"));
        assert_eq!(
            a.trailer("sluice-error"),
            None,
            "only sluice speaks Sluice-*"
        );

        let a = h2_call(
            &send,
            grpc_request(&format!("{base}/pkg.Echo/Stream")),
            Some(grpc_frame(b"go")),
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, stream_frames.concat());
        assert_eq!(a.trailer("grpc-status"), Some("0"));

        // A trailers-only answer (its status in the head) ends with its head here too.
        let a = h2_call(
            &send,
            grpc_request(&format!("{base}/pkg.Echo/Gone")),
            Some(grpc_frame(b"where")),
        )
        .await;
        assert_eq!(a.header("grpc-status"), "5");
        assert_eq!(a.header("grpc-message"), "no such thing");
        assert!(a.ended_with_head && a.body.is_empty() && a.trailers.is_none());

        let a = h2_call(
            &send,
            grpc_request(&format!("{base}/pkg.Echo/Busy")),
            Some(grpc_frame(b"more")),
        )
        .await;
        assert_eq!(a.trailer("grpc-status"), Some("8"));
        // The host is paused for everyone: a call that may wait 1 s is refused at once.
        let mut req = grpc_request(&format!("{base}/pkg.Echo/Unary"));
        req.headers_mut()
            .insert("sluice-timeout", http::HeaderValue::from_static("1s"));
        let a = h2_call(&send, req, Some(grpc_frame(b"ping"))).await;
        assert_eq!(a.status, 429);
        assert_eq!(a.header("sluice-error"), "rate_limited");
    });
    let seen = up.requests();
    assert_eq!(seen.len(), 4, "the refused call never reached the upstream");
    assert!(seen.iter().all(|r| r.version == "HTTP/2.0"));
    assert_eq!(seen[0].header("te"), Some("trailers"));
    assert_eq!(seen[0].body, grpc_frame(b"ping"));
    assert!(sluice.metric("sluice_pauses_total{source=\"retry_after\"}") >= 1.0);
}

/// A CONNECT tunnel to `HOST:443` through sluice, TLS inside it offering only h2 by ALPN.
async fn h2_in_tunnel(sluice: &Sluice, ca_pem: &str) -> h2::client::SendRequest<Bytes> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(sluice.proxy)
        .await
        .expect("connect");
    tcp.write_all(format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes())
        .await
        .expect("connect head");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.expect("tunnel answer");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.expect("ca cert")).expect("root");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(HOST).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("tls inside the tunnel");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        conn.await.ok();
    });
    send
}

#[test]
fn an_intercepted_client_offering_h2_gets_h2_and_grpc_passes_with_its_trailers() {
    let upstream_ca = TestCa::new();
    let up = FakeUpstream::builder()
        .route(
            "/pkg.Echo/Unary",
            Reply::text(200, &String::from_utf8(grpc_frame(b"pong")).expect("ascii"))
                .header("content-type", "application/grpc")
                .trailer("grpc-status", "0"),
        )
        .route("/", Reply::text(200, "inside"))
        .tls(&upstream_ca)
        .h2()
        .start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = sluice_ca(dir.path());
    let sluice = Sluice::start(
        &format!(
            "upstream_ca_file = \"{}\"\n",
            upstream_ca.ca_path().display()
        ),
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [resolve]\n\"{HOST}:443\" = [\"127.0.0.1:{}\"]\n\
             [intercept]\nhosts = [\"{HOST}\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n\
             [hosts.\"{HOST}\"]\nrps = 0\n",
            up.port(),
            cert.display(),
            key.display()
        ),
    );
    let ca_pem = std::fs::read_to_string(&cert).expect("ca");
    support::rt().block_on(async {
        let send = h2_in_tunnel(&sluice, &ca_pem).await;
        let req = http::Request::builder()
            .uri(format!("https://{HOST}/v1/inside"))
            .body(())
            .expect("request");
        let a = h2_call(&send, req, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"inside");
        assert_eq!(a.header("sluice-region"), "default");
        let a = h2_call(
            &send,
            grpc_request(&format!("https://{HOST}/pkg.Echo/Unary")),
            Some(grpc_frame(b"ping")),
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, grpc_frame(b"pong"));
        assert_eq!(a.trailer("grpc-status"), Some("0"));
        // Another authority inside this tunnel is refused on its stream.
        let req = http::Request::builder()
            .uri("https://elsewhere.example.test/x")
            .body(())
            .expect("request");
        let a = h2_call(&send, req, None).await;
        assert_eq!(a.status, 400);
        assert_eq!(a.header("sluice-error"), "bad_target");
    });
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.version == "HTTP/2.0"));
    assert_eq!(seen[0].target, "/v1/inside");
    let series = "sluice_requests_total{way=\"intercept\",outcome=\"ok\"}";
    assert_eventually!(
        sluice.metric(series) == 2.0,
        "{}: {}",
        series,
        sluice.metric(series)
    );
}

/// nginx as an h2 TLS upstream (Debian's nginx 1.22), on a free port, answering every
/// request `200 done` and logging each as `METHOD URI PROTOCOL`; it ends each connection with
/// a GOAWAY after `keepalive_requests` requests, as nginx does. Stopped by its PID when dropped.
struct Nginx {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(ca: &TestCa, keepalive_requests: u32) -> Option<Nginx> {
        let bin = tool(&["nginx"], "nginx").or_else(|| {
            let sbin = PathBuf::from("/usr/sbin/nginx");
            sbin.is_file().then_some(sbin)
        })?;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("cert.pem"), &ca.cert_pem).expect("cert");
        std::fs::write(d.join("key.pem"), &ca.key_pem).expect("key");
        let port = free_port();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;\n\
             error_log {d}/error.log; pid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               log_format req '$request_method $request_uri $server_protocol';\n\
               access_log {d}/access.log req;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               keepalive_requests {keepalive_requests};\n\
               server {{\n\
                 listen 127.0.0.1:{port} ssl http2;\n\
                 ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
                 location / {{ return 200 \"done\"; }}\n\
               }}\n\
             }}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("conf");
        let child = std::process::Command::new(bin)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx { child, port, dir };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(nginx);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let err = std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
        panic!("nginx did not listen on {port}: {err}");
    }

    /// The requests nginx logged: method, URI, protocol.
    fn requests(&self) -> Vec<(String, String, String)> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split(' ');
                Some((
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[test]
fn an_upstream_goaway_in_a_load_loses_no_request_and_sends_none_twice() {
    let ca = TestCa::new();
    // nginx ends each h2 connection with a GOAWAY after 150 requests.
    let Some(nginx) = Nginx::start(&ca, 150) else {
        return;
    };
    let sluice = Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", ca.ca_path().display()),
        &format!(
            "[resolve]\n\"{HOST}:443\" = [\"127.0.0.1:{}\"]\n[hosts.\"{HOST}\"]\nrps = 0\n",
            nginx.port
        ),
    );
    let client = direct_client();
    let url = format!("{}/jobs", sluice.proxy_url());
    support::rt().block_on(async {
        use futures_util::StreamExt;
        // POSTs: none may be sent twice; 1,000 of them, 50 at a time.
        let answers: Vec<(u16, String)> = futures_util::stream::iter(0..1000)
            .map(|i| {
                let client = client.clone();
                let url = format!("{url}/{i}");
                async move {
                    let r = client
                        .post(url)
                        .header("Sluice-Target", format!("https://{HOST}"))
                        .body(format!("job {i}"))
                        .send()
                        .await;
                    let Ok(r) = r else {
                        return (0, format!("{r:?}"));
                    };
                    let status = r.status().as_u16();
                    (status, r.text().await.unwrap_or_default())
                }
            })
            .buffer_unordered(50)
            .collect()
            .await;
        let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}; sluice's log: {}",
            failed.len(),
            &failed[..failed.len().min(3)],
            sluice
                .log()
                .lines()
                .filter(|l| !l.contains("sluice::access"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
    let seen = nginx.requests();
    assert!(seen.iter().all(|(m, _, p)| m == "POST" && p == "HTTP/2.0"));
    let mut ids: Vec<usize> = seen
        .iter()
        .map(|(_, uri, _)| {
            uri.rsplit('/')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("id")
        })
        .collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(before, ids.len(), "a POST reached the upstream twice");
    assert_eq!(ids.len(), 1000, "every POST reached the upstream once");
    // The upstream went away 6 times in the load: the streams past its last one were sent
    // again (counted), none was refused by the retry budget, and the endpoint stayed in.
    let retried = sluice.metric("sluice_retries_total{reason=\"refused\"}");
    eprintln!("requests sent again after a GOAWAY or a refused stream: {retried}");
    assert_eq!(sluice.metric("sluice_retry_budget_exhausted_total"), 0.0);
    assert_eq!(sluice.metric("sluice_region_ejections_total"), 0.0);
}

#[test]
fn an_h2_client_that_stops_after_the_preface_is_closed_by_the_head_timeout() {
    use std::io::{Read, Write};
    let sluice = Sluice::start("header_read_timeout = \"1s\"\n", "");
    let mut tcp = std::net::TcpStream::connect(sluice.proxy).expect("connect");
    // The preface's first part only: no SETTINGS ever follows.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\n").expect("preface");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut buf = [0u8; 1024];
    let mut read = Vec::new();
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read.extend_from_slice(&buf[..n]),
            Err(e) => panic!("still open after 20 s ({e}); read {read:?}"),
        }
    }
    assert!(read.is_empty() || read.len() < 100, "{read:?}");
}

#[test]
fn raced_requests_are_streams_of_one_connection_and_the_losers_are_reset_without_closing_it() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "raced").latency(Duration::from_millis(20)),
        )
        .tls(&ca)
        .h2()
        .start();
    // Two regions at the same address: a race sends each request twice, as two streams of
    // the one connection to it.
    let region = |name: &str| {
        format!(
            "{{ name = \"{name}\", address = \"127.0.0.1:{}\", tls = true, sni = \"{HOST}\" }}",
            up.port()
        )
    };
    let sluice = Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", ca.ca_path().display()),
        &format!(
            "[hosts.\"{HOST}\"]\nrps = 0\nmode = \"race\"\nregions = [{}, {}]\n",
            region("a"),
            region("b")
        ),
    );
    let client = direct_client();
    support::rt().block_on(async {
        for i in 0..20 {
            let r = client
                .get(format!("{}/race/{i}", sluice.proxy_url()))
                .header("Sluice-Target", format!("https://{HOST}"))
                .send()
                .await
                .expect("answer");
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["sluice-attempts"], "2");
            assert_eq!(r.text().await.expect("body"), "raced");
        }
    });
    let races = format!("sluice_races_total{{host=\"{HOST}\"}}");
    assert_eventually!(
        sluice.metric(&races) == 20.0,
        "{}: {}",
        &races,
        sluice.metric(&races)
    );
    assert_eq!(
        up.connections(),
        1,
        "each race's loser was reset on the connection, which went on serving"
    );
    assert!(up.requests().iter().all(|r| r.version == "HTTP/2.0"));
}

#[test]
fn curl_with_http2_prior_knowledge_gets_its_answer_over_h2() {
    let Some(curl) = tool(&["curl"], "curl") else {
        return;
    };
    let up = FakeUpstream::builder()
        .route("/v1/models", Reply::text(200, "models"))
        .start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[[routes]]\nprefix = \"/openai\"\ntarget = \"http://127.0.0.1:{}\"\n",
            up.port()
        ),
    );
    let out = run_bounded(
        std::process::Command::new(curl)
            .arg("--http2-prior-knowledge")
            .args(["-s", "-w", "\n%{http_version} %{http_code}"])
            .arg(format!("http://{}/openai/v1/models", sluice.proxy)),
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "models\n2 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
