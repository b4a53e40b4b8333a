//! Way in 4: `[[routes]]` — a path prefix on sluice maps to a destination.

mod support;

use support::*;

#[test]
fn routes_strip_the_prefix_and_forward_the_rest() {
    let ca = TestCa::new();
    let tls_up = FakeUpstream::builder()
        .tls(&ca)
        .route("/v1/chat", Reply::text(200, "chat ok"))
        .start();
    let plain_up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        &format!("upstream_ca_file = \"{}\"\n", ca.ca_path().display()),
        &format!(
            r#"
[resolve]
"api.example.test" = ["127.0.0.1:{tls}"]

[[routes]]
prefix = "/openai"
target = "https://api.example.test"

[[routes]]
prefix = "/plain"
target = "http://127.0.0.1:{plain}/base"

[[routes]]
prefix = "/plain/deeper"
target = "http://127.0.0.1:{plain}/other"
"#,
            tls = tls_up.port(),
            plain = plain_up.port()
        ),
    );
    let client = direct_client();
    rt().block_on(async {
        let r = client
            .post(format!("{}/openai/v1/chat", sluice.proxy_url()))
            .header("Authorization", "Bearer sk-test")
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{}", sluice.log());
        assert_eq!(r.text().await.expect("body"), "chat ok");

        for (path, want) in [
            ("/plain/x?y=1", "/base/x?y=1"),
            ("/plain", "/base"),
            ("/plain?z", "/base?z"),
            ("/plain/deeper/q", "/other/q"),
        ] {
            let r = client
                .get(format!("{}{path}", sluice.proxy_url()))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-echo-target"], want, "{path}");
            assert_eq!(
                r.headers()["x-echo-host"],
                format!("127.0.0.1:{}", plain_up.port())
            );
        }

        let r = client
            .get(format!("{}/plainx", sluice.proxy_url()))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["sluice-error"], "no_target");
    });
    let got = &tls_up.requests()[0];
    assert_eq!(got.target, "/v1/chat");
    assert_eq!(got.header("host"), Some("api.example.test"));
    assert_eq!(got.header("authorization"), Some("Bearer sk-test"));
    let (_, status) = sluice.admin_get("/status");
    assert!(status.contains("/openai"), "{status}");
}
