//! TLS interception of CONNECT tunnels (`[intercept]`), with real HTTPS clients through
//! `https_proxy`: requests inside one kept-alive tunnel are paced one by one, a 429 inside
//! pauses the host for every way in, the pipeline's headers come back, a bad upstream
//! certificate is a 502 inside the client's TLS, a fronted SNI is refused, hosts not listed
//! stay byte-for-byte tunnels, and plain HTTP in a tunnel to port 80 is paced per request.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "api.example.test";

/// An HTTPS client through sluice that trusts only `ca` (sluice's CA, or an upstream's).
fn https_client(sluice: &Sluice, ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(sluice.proxy_url()).expect("proxy"))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

struct Setup {
    sluice: Sluice,
    up: FakeUpstream,
    ca_pem: String,
    _dir: tempfile::TempDir,
    _upstream_ca: TestCa,
}

/// sluice intercepting `HOST` (2 rps, burst 1), whose upstream is a TLS fake upstream signed
/// by a test CA that sluice trusts; `extra` is more TOML.
fn setup(extra: &str) -> Setup {
    let upstream_ca = TestCa::new();
    let up = FakeUpstream::builder()
        .route("/limited", Reply::text(429, "slow down").retry_after("2"))
        .route("/", Reply::text(200, "inside"))
        .tls(&upstream_ca)
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
             [intercept]\nhosts = [\"{HOST}\", \"*.bad.test\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n\
             [hosts.\"{HOST}\"]\nrps = 2.0\nburst = 1\n{extra}",
            up.port(),
            cert.display(),
            key.display()
        ),
    );
    let ca_pem = std::fs::read_to_string(&cert).expect("ca");
    Setup {
        sluice,
        up,
        ca_pem,
        _dir: dir,
        _upstream_ca: upstream_ca,
    }
}

#[test]
fn requests_in_one_tunnel_are_paced_one_by_one_and_learn_for_everyone() {
    let s = setup("");
    let client = https_client(&s.sluice, &s.ca_pem);
    support::rt().block_on(async {
        let started = Instant::now();
        for i in 0..10 {
            let r = client
                .get(format!("https://{HOST}/v1/item/{i}"))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["sluice-region"], "default");
            assert_eq!(r.headers()["sluice-attempts"], "1");
            assert_eq!(r.text().await.expect("body"), "inside");
        }
        // 2 rps, burst 1: the first at once, nine more half a second apart.
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(4), "10 requests in {took:?}");
        // The upstream saw each request as the client sent it, with its own Host.
        let seen = s.up.requests();
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[3].target, "/v1/item/3");
        assert_eq!(seen[3].header("host"), Some(HOST));
    });
    // One tunnel carried them all, and one leaf was made.
    assert_eq!(
        s.sluice
            .metric("sluice_intercept_tunnels_total{result=\"tls\"}"),
        1.0
    );
    assert_eq!(
        s.sluice
            .metric("sluice_intercept_leaf_certificates_total{result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        s.sluice
            .metric("sluice_requests_total{way=\"intercept\",outcome=\"ok\"}"),
        10.0
    );

    // A 429 with Retry-After: 2 inside the tunnel pauses the host for explicit-target
    // callers too: one that may wait 1 s is refused at once.
    support::rt().block_on(async {
        let r = client
            .get(format!("https://{HOST}/limited"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 429);
        let direct = direct_client()
            .get(format!("{}/v1/x", s.sluice.proxy_url()))
            .header("Sluice-Target", format!("https://{HOST}"))
            .header("Sluice-Timeout", "1s")
            .send()
            .await
            .expect("explicit target");
        assert_eq!(direct.status(), 429);
        assert_eq!(direct.headers()["sluice-error"], "rate_limited");
    });
    assert!(
        s.sluice.log().contains("way=\"intercept\"") || s.sluice.log().contains("way=intercept"),
        "access log lines for requests inside: {}",
        s.sluice.log()
    );
}

#[test]
fn a_bad_upstream_certificate_is_a_502_inside_the_clients_tls() {
    // *.bad.test is intercepted; its upstream's certificate is signed by a CA nobody trusts.
    let stranger = TestCa::new();
    let bad = FakeUpstream::builder()
        .route("/", Reply::text(200, "never"))
        .tls(&stranger)
        .start();
    let upstream_ca = TestCa::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = sluice_ca(dir.path());
    let sluice = Sluice::start(
        &format!(
            "upstream_ca_file = \"{}\"\n",
            upstream_ca.ca_path().display()
        ),
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [resolve]\n\"api.bad.test:443\" = [\"127.0.0.1:{}\"]\n\
             [intercept]\nhosts = [\"*.bad.test\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
            bad.port(),
            cert.display(),
            key.display()
        ),
    );
    let ca_pem = std::fs::read_to_string(&cert).expect("ca");
    let client = https_client(&sluice, &ca_pem);
    support::rt().block_on(async {
        let r = client
            .get("https://api.bad.test/x")
            .send()
            .await
            .expect("an answer inside TLS");
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["sluice-error"], "upstream_tls");
        let body = r.text().await.expect("body");
        assert!(body.contains("certificate"), "{body}");
    });
    assert_eq!(bad.count(), 0, "nothing reached the unverified upstream");
}

/// Open a CONNECT tunnel to `authority` by hand; the stream after the `200`.
async fn connect(proxy: std::net::SocketAddr, authority: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.expect("read"), 1, "tunnel refused");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[test]
fn a_server_name_other_than_the_connect_host_is_refused() {
    use tokio_rustls::rustls;
    let s = setup("");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut s.ca_pem.as_bytes()) {
        roots.add(c.expect("cert")).expect("root");
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(config);
    support::rt().block_on(async {
        // The tunnel says api.example.test; the ClientHello asks for another name.
        let tcp = connect(s.sluice.proxy, &format!("{HOST}:443")).await;
        let name = rustls::pki_types::ServerName::try_from("other.example.test").expect("name");
        let fronted = connector.connect(name, tcp).await;
        assert!(fronted.is_err(), "a fronted handshake must fail");
        // The same tunnel with the right name works.
        let tcp = connect(s.sluice.proxy, &format!("{HOST}:443")).await;
        let name = rustls::pki_types::ServerName::try_from(HOST).expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("handshake");
        tls.write_all(
            format!("GET /ok HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.ok();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    });
    assert_eq!(
        s.sluice
            .metric("sluice_intercept_tunnels_total{result=\"sni_mismatch\"}"),
        1.0
    );
    assert_eq!(
        s.up.count(),
        1,
        "only the second tunnel's request went upstream"
    );
}

#[test]
fn a_host_not_listed_is_still_a_byte_for_byte_tunnel() {
    // Another host, served by a TLS upstream with its own certificate: the client must see
    // that certificate (it trusts only the upstream's CA), so sluice did not touch the bytes.
    let own = TestCa::new();
    let other = FakeUpstream::builder()
        .route("/", Reply::text(200, "untouched"))
        .tls(&own)
        .start();
    // (Sluice::start allows any CONNECT port here.)
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = sluice_ca(dir.path());
    let sluice = Sluice::start(
        "",
        &format!(
            "[intercept]\nhosts = [\"{HOST}\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(sluice.proxy_url()).expect("proxy"))
        .tls_built_in_root_certs(false)
        .add_root_certificate(own.reqwest_cert())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    support::rt().block_on(async {
        let r = client
            .get(format!("https://127.0.0.1:{}/x", other.port()))
            .send()
            .await
            .expect("through a plain tunnel");
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("sluice-attempts").is_none(),
            "no pipeline header"
        );
        assert_eq!(r.text().await.expect("body"), "untouched");
    });
    assert_eq!(sluice.metric("sluice_tunnels_opened_total"), 1.0);
    assert_eq!(
        sluice.metric("sluice_intercept_tunnels_total{result=\"tls\"}"),
        0.0
    );
}

#[test]
fn plain_http_in_a_tunnel_to_port_80_is_paced_per_request() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "plain"))
        .start();
    // connect_ports stays [443]: port 80 is allowed for HTTP inside, and nothing else.
    let sluice = Sluice::start(
        "",
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [resolve]\n\"plain.test:80\" = [\"127.0.0.1:{}\"]\n\
             [hosts.\"plain.test\"]\nrps = 2.0\nburst = 1\n",
            up.port()
        ),
    );
    support::rt().block_on(async {
        // What undici's ProxyAgent does for http:// URLs: a tunnel to port 80, then HTTP.
        let mut tcp = connect(sluice.proxy, "plain.test:80").await;
        let started = Instant::now();
        for i in 0..4 {
            tcp.write_all(format!("GET /n/{i} HTTP/1.1\r\nHost: plain.test\r\n\r\n").as_bytes())
                .await
                .expect("send");
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("plain") {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(
                text.to_ascii_lowercase().contains("sluice-attempts: 1"),
                "{text}"
            );
        }
        // 2 rps, burst 1: four requests take at least 1.5 s.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500),
            "4 requests in {took:?}"
        );
        // Bytes that are not HTTP in a port-80 tunnel close it.
        let mut tcp = connect(sluice.proxy, "plain.test:80").await;
        tcp.write_all(b"\x00\x01binary").await.expect("send");
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    });
    assert_eq!(up.count(), 4);
    assert_eq!(
        sluice.metric("sluice_intercept_tunnels_total{result=\"http\"}"),
        1.0
    );
    assert_eq!(
        sluice.metric("sluice_intercept_tunnels_total{result=\"not_http\"}"),
        1.0
    );
    // Port 80 with something else than HTTP, or another port, is still refused.
    let raw = raw_exchange(
        sluice.proxy,
        b"CONNECT plain.test:8080 HTTP/1.1\r\nHost: plain.test:8080\r\n\r\n",
    )
    .expect("answer");
    assert_eq!(split_response(&raw).0, 403);
}

/// Before: the access line said only `error="handshake_failed" reason="... UnknownCA"`.
#[test]
fn a_client_that_does_not_trust_the_ca_is_told_apart_with_the_fix() {
    let s = setup("");
    let stranger = TestCa::new();
    let client = https_client(&s.sluice, &stranger.ca_pem);
    support::rt().block_on(async {
        let r = client.get(format!("https://{HOST}/x")).send().await;
        assert!(r.is_err(), "the client does not trust sluice's leaf");
    });
    assert_eventually!(
        s.sluice
            .metric("sluice_intercept_tunnels_total{result=\"untrusted_ca\"}")
            >= 1.0,
        "counted as untrusted_ca"
    );
    let log = s.sluice.log();
    assert!(
        log.contains("untrusted_ca") && log.contains("sluice ca init"),
        "the access line says what happened and what to do: {log}"
    );
    let (status, body) = s.sluice.admin_get("/status");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["intercept"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("sluice ca init")),
        "{}",
        v["intercept"]
    );
    assert_eq!(s.up.count(), 0);
}

/// Before: a refusal of a head inside a tunnel was counted and logged with `way="unknown"`.
#[test]
fn a_refusal_inside_a_tunnel_is_counted_under_the_tunnels_way() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [resolve]\n\"plain.test:80\" = [\"127.0.0.1:{}\"]\n",
            up.port()
        ),
    );
    support::rt().block_on(async {
        let mut tcp = connect(sluice.proxy, "plain.test:80").await;
        // An absolute target naming another authority than the tunnel's: 400 bad_target.
        tcp.write_all(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
            .await
            .expect("send");
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.ok();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    });
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"bad_target\",way=\"intercept\"}") == 1.0,
        "counted under the tunnel's way"
    );
    assert_eq!(
        sluice.metric("sluice_requests_total{outcome=\"bad_target\",way=\"unknown\"}"),
        0.0
    );
    assert_eq!(up.count(), 0);
}
