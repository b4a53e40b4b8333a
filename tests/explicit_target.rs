//! Way in 3: `Sluice-Target: https://host` on an origin-form request; sluice originates TLS.

mod support;

use support::*;

fn tls_sluice(ca: &TestCa, up: &FakeUpstream) -> Sluice {
    Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", ca.ca_path().display()),
        &format!(
            "[resolve]\n\"api.example.test\" = [\"127.0.0.1:{}\"]\n",
            up.port()
        ),
    )
}

#[test]
fn explicit_target_over_tls_with_sni_and_pinned_resolution() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder()
        .tls(&ca)
        .route("/v1/models", Reply::text(200, "models"))
        .start();
    let sluice = tls_sluice(&ca, &up);
    let client = direct_client();
    rt().block_on(async {
        let r = client
            .get(format!("{}/v1/models?limit=2", sluice.proxy_url()))
            .header("Sluice-Target", "https://api.example.test")
            .header("Sluice-Mode", "single")
            .header("Authorization", "Bearer client-key")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{}", sluice.log());
        assert_eq!(r.text().await.expect("body"), "models");

        // Also by DNS (localhost), with the port in the target.
        let r = client
            .post(format!("{}/echo", sluice.proxy_url()))
            .header("Sluice-Target", format!("https://localhost:{}", up.port()))
            .body("payload")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-echo-host"],
            format!("localhost:{}", up.port())
        );
        assert_eq!(r.text().await.expect("body"), "payload");
    });
    let got = &up.requests()[0];
    assert_eq!(got.target, "/v1/models?limit=2");
    assert_eq!(got.header("host"), Some("api.example.test"));
    assert_eq!(got.header("authorization"), Some("Bearer client-key"));
    assert_eq!(got.header("sluice-target"), None);
    assert_eq!(got.header("sluice-mode"), None);
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"ok\",way=\"target\"}") >= 2.0,
        "counted once logged"
    );
}

#[test]
fn plain_http_target_and_base_path() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start("", "");
    let client = direct_client();
    rt().block_on(async {
        let r = client
            .get(format!("{}/chat?x=1", sluice.proxy_url()))
            .header(
                "Sluice-Target",
                format!("http://127.0.0.1:{}/api/v2/", up.port()),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-echo-target"], "/api/v2/chat?x=1");
    });
}

#[test]
fn untrusted_certificates_and_bad_targets_are_refused_with_reasons() {
    let ca = TestCa::new();
    let up = FakeUpstream::builder().tls(&ca).start();
    // No upstream_ca_file: the test CA is not trusted.
    let sluice = Sluice::start(
        "",
        &format!(
            "[resolve]\n\"api.example.test\" = [\"127.0.0.1:{}\"]\n",
            up.port()
        ),
    );
    let client = direct_client();
    rt().block_on(async {
        let cases = [
            ("https://api.example.test", 502, "upstream_tls"),
            ("ftp://api.example.test", 400, "bad_target"),
            ("api.example.test", 400, "bad_target"),
            ("https://api.example.test:notaport", 400, "bad_target"),
            ("https://no-such-host.invalid", 502, "dns"),
        ];
        for (target, status, code) in cases {
            let r = client
                .get(format!("{}/x", sluice.proxy_url()))
                .header("Sluice-Target", target)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), status, "{target}");
            assert_eq!(r.headers()["sluice-error"], code, "{target}");
            let json: serde_json::Value =
                serde_json::from_str(&r.text().await.expect("body")).expect("json");
            assert_eq!(json["error"], code);
        }
    });
    assert_eq!(
        up.count(),
        0,
        "nothing reached the upstream over an untrusted TLS session"
    );
}

#[test]
fn a_self_signed_ca_certificate_as_the_upstreams_own_is_explained() {
    // What `openssl req -x509` makes by default: a self-signed certificate marked as a CA
    // (basicConstraints CA:TRUE), served by the upstream as its own.
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["api.example.test".to_string()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write");
    let pem = TestCa {
        dir,
        ca_pem: cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    let up = FakeUpstream::builder().tls(&pem).start();
    let sluice = Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", pem.ca_path().display()),
        &format!(
            "[resolve]\n\"api.example.test\" = [\"127.0.0.1:{}\"]\n",
            up.port()
        ),
    );
    let raw = raw_exchange(
        sluice.proxy,
        b"GET /x HTTP/1.1\r\nHost: x\r\nSluice-Target: https://api.example.test\r\n\
          Connection: close\r\n\r\n",
    )
    .expect("answer");
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 502, "{head}");
    assert_eq!(
        header_of(&head, "sluice-error").as_deref(),
        Some("upstream_tls")
    );
    assert!(
        body.contains("is a CA certificate")
            && body.contains("sign a leaf")
            && body.contains("CaUsedAsEndEntity"),
        "{body}"
    );
}
