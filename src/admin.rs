//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text), `GET /status` (JSON).

use crate::state::Shared;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use std::sync::Arc;

pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Admin {
        Admin { shared }
    }

    fn status_json(&self) -> serde_json::Value {
        let generation = self.shared.generation();
        let config = &generation.config;
        let routes: Vec<_> = generation
            .routes
            .iter()
            .map(|r| {
                serde_json::json!({
                    "prefix": r.prefix,
                    "target": format!(
                        "{}://{}{}",
                        if r.origin.scheme.is_tls() { "https" } else { "http" },
                        r.origin.host_header(),
                        r.origin.base_path
                    ),
                })
            })
            .collect();
        let mut hosts: Vec<String> = generation
            .routes
            .iter()
            .map(|r| r.origin.host_port())
            .chain(generation.resolve.keys().cloned())
            .collect();
        hosts.sort();
        hosts.dedup();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.shared.started.elapsed().as_secs(),
            "config": {
                "file": self.shared.config_path.as_ref().map(|p| p.display().to_string()),
                "embedded_default": self.shared.config_path.is_none(),
                "generation": generation.number,
            },
            "listeners": {
                "proxy": config.server.listen,
                "admin": config.server.admin_listen,
            },
            "routes": routes,
            "known_hosts": hosts,
            "tunnels_active": self.shared.metrics.tunnels_active.get(),
        })
    }
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let built = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body);
    match built {
        Ok(r) => r,
        Err(_) => Response::new(Vec::new()),
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        if method != http::Method::GET && method != http::Method::HEAD {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "method_not_allowed", "message": "use GET"}),
            );
        }
        match path.as_str() {
            "/healthz" => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.shared.metrics.encode(),
            ),
            "/status" => json(StatusCode::OK, &self.status_json()),
            _ => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({
                    "error": "not_found",
                    "message": "admin paths: /healthz /metrics /status",
                }),
            ),
        }
    }
}
