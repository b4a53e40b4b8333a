//! The admin listener: /healthz, /metrics after known traffic, /status.

mod support;

use support::*;

#[test]
fn healthz_metrics_and_status() {
    let up = FakeUpstream::builder().start();
    let sluice = Sluice::start(
        "",
        &format!(
            "[[routes]]\nprefix = \"/svc\"\ntarget = \"http://127.0.0.1:{}\"\n",
            up.port()
        ),
    );
    let (status, body) = sluice.admin_get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // With the memory backend there is no fleet service to start (and none to log as exited).
    assert!(
        !sluice.log().contains("sluice fleet' exited"),
        "{}",
        sluice.log()
    );

    for _ in 0..3 {
        let (s, _, _) = http_get(sluice.proxy, "/svc/a").expect("route request");
        assert_eq!(s, 200);
    }
    let (s, _, _) = http_get(sluice.proxy, "/nowhere").expect("request");
    assert_eq!(s, 400);
    let closed = free_port();
    let raw = raw_exchange(
        sluice.proxy,
        format!("CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .expect("connect");
    assert_eq!(split_response(&raw).0, 502);

    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"ok\",way=\"route\"}") == 3.0,
        "three routed requests counted: {}",
        sluice.admin_get("/metrics").1
    );
    // Each request is counted when its log line is written, just after its response.
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"no_target\",way=\"unknown\"}") == 1.0,
        "refusal counted"
    );
    assert_eventually!(
        sluice.metric("sluice_requests_total{outcome=\"connect_refused\",way=\"connect\"}") == 1.0,
        "tunnel refusal counted"
    );
    assert_eq!(
        sluice.metric("sluice_upstream_responses_total{class=\"2xx\",way=\"route\"}"),
        3.0
    );
    assert_eq!(
        sluice.metric("sluice_request_duration_seconds_count{way=\"route\"}"),
        3.0
    );
    assert_eq!(sluice.metric("sluice_tunnels_active"), 0.0);
    assert_eq!(sluice.metric("sluice_config_generation"), 1.0);
    let (_, text) = sluice.admin_get("/metrics");
    assert!(text.contains("sluice_build_info{version="));
    assert!(text.contains("sluice_tunnel_bytes_total{direction=\"up\"}"));

    let (status, body) = sluice.admin_get("/status");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["config"]["generation"], 1);
    assert_eq!(
        json["config"]["file"],
        sluice.config_path().display().to_string()
    );
    assert_eq!(json["listeners"]["proxy"], sluice.proxy.to_string());
    assert_eq!(json["routes"][0]["prefix"], "/svc");
    assert_eq!(json["known_hosts"][0], format!("127.0.0.1:{}", up.port()));

    let (status, _) = sluice.admin_get("/nope");
    assert_eq!(status, 404);
}

/// `GET path` on the admin listener with an optional bearer token: (status, head, body).
fn admin_raw(sluice: &Sluice, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let raw = raw_exchange(
        sluice.admin,
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .expect("admin exchange");
    let (status, head, _) = split_response(&raw);
    (status, head)
}

#[test]
fn an_admin_token_guards_status_reload_and_optionally_metrics() {
    const TOKEN: &str = "s3cret-admin-token-0123";
    let sluice = Sluice::start(&format!("admin_token = \"{TOKEN}\""), "");
    assert_eq!(admin_raw(&sluice, "GET", "/healthz", None).0, 200);
    assert_eq!(
        admin_raw(&sluice, "GET", "/metrics", None).0,
        200,
        "open by default"
    );
    for (method, path) in [("GET", "/status"), ("POST", "/reload")] {
        let (status, head) = admin_raw(&sluice, method, path, None);
        assert_eq!(status, 401, "{method} {path}: {head}");
        assert_eq!(
            header_of(&head, "sluice-error").as_deref(),
            Some("admin_auth_required")
        );
        assert!(header_of(&head, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
        let (status, _) = admin_raw(&sluice, method, path, Some("wrong-token-wrong-token"));
        assert_eq!(status, 401, "{method} {path} with a wrong token");
        let (status, _) = admin_raw(&sluice, method, path, Some(TOKEN));
        assert_eq!(status, 200, "{method} {path} with the token");
    }
    let sluice = Sluice::start(
        &format!("admin_token = \"{TOKEN}\"\nmetrics_auth = true"),
        "",
    );
    assert_eq!(admin_raw(&sluice, "GET", "/metrics", None).0, 401);
    assert_eq!(admin_raw(&sluice, "GET", "/metrics", Some(TOKEN)).0, 200);
    assert_eq!(admin_raw(&sluice, "GET", "/healthz", None).0, 200);
}
