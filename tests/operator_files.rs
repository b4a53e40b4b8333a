//! The operator files in `conf/`: the Prometheus alert rules pass `promtool check rules` and
//! their own unit tests (`promtool test rules`), every PromQL query of the Grafana dashboard
//! parses, and every `sluice_*` metric they name is one a running sluice exports.
//!
//! `promtool` comes from Debian's `prometheus` package (`cargo xtask test` installs it); where
//! it is missing the promtool checks say so and pass, unless `SLUICE_REQUIRE_TOOLS=1`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::redis::Redis;
use support::*;

fn conf(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `sluice_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("sluice_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every `expr` of the dashboard (panels, rows' panels, annotations), as Grafana keeps them.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = read(&conf("grafana/sluice.json"));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    assert!(out.len() >= 30, "the dashboard has {} queries", out.len());
    out
}

#[test]
fn promtool_passes_the_alert_rules_and_their_tests() {
    let Some(promtool) = tool(&["promtool"], "prometheus") else {
        return;
    };
    let dir = conf("prometheus");
    for args in [
        ["check", "rules", "sluice-alerts.yml"],
        ["test", "rules", "sluice-alerts.test.yml"],
    ] {
        let out = run_bounded(
            Command::new(&promtool).args(args).current_dir(&dir),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_dashboard_query_parses() {
    let Some(promtool) = tool(&["promtool"], "prometheus") else {
        return;
    };
    // promtool parses PromQL in rule files: each query becomes a recording rule, with
    // Grafana's variables given values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries().iter().enumerate() {
        let q = q
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        let quoted = serde_json::to_string(&q).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).expect("write");
    let out = run_bounded(
        Command::new(&promtool).arg("check").arg("rules").arg(&path),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "a dashboard query does not parse: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let redis = Redis::start();
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "ok"))
        .start();
    let shared = match &redis {
        Some(r) => format!(
            "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
            r.url()
        ),
        None => String::new(),
    };
    let sluice = Sluice::start(
        "",
        &format!(
            "{shared}[hosts.\"api.dash.test\"]\nrps = 0.0\nregions = [\n  \
             {{ name = \"a\", address = \"127.0.0.1:{}\" }},\n]\n",
            up.port()
        ),
    );
    // Enough answers for the region's latency percentiles.
    for _ in 0..25 {
        let raw = raw_exchange(
            sluice.proxy,
            b"GET /x HTTP/1.1\r\nHost: x\r\nSluice-Target: http://api.dash.test\r\n\
              Connection: close\r\n\r\n",
        )
        .expect("request");
        assert_eq!(split_response(&raw).0, 200);
    }
    let (status, text) = sluice.admin_get("/metrics");
    assert_eq!(status, 200);
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        exported.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    let mut used = BTreeSet::new();
    for q in dashboard_queries() {
        used.extend(metric_names(&q));
    }
    used.extend(metric_names(&read(&conf("prometheus/sluice-alerts.yml"))));
    let unknown: Vec<_> = used
        .iter()
        .filter(|n| !exported.contains(*n))
        .filter(|n| redis.is_some() || !n.starts_with("sluice_shared_"))
        .collect();
    assert!(
        unknown.is_empty(),
        "used but not exported: {unknown:?}\nexported: {exported:?}"
    );
    if redis.is_none() {
        eprintln!("sluice_shared_* names not checked: no redis-server to run the fleet");
    }
    // The dashboard covers what the issue asks for.
    for family in [
        "sluice_requests_total",
        "sluice_queue_wait_seconds_bucket",
        "sluice_pauses_total",
        "sluice_retries_total",
        "sluice_hedges_total",
        "sluice_region_healthy",
        "sluice_region_latency_seconds",
        "sluice_shared_breaker_state",
        "sluice_shared_redis_calls_total",
    ] {
        assert!(
            used.contains(family),
            "the dashboard has no panel on {family}"
        );
    }
}
