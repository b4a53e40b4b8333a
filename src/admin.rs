//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text), `GET /status` (JSON)
//! and `POST /reload`; with `server.admin_token`, all but `/healthz` (and `/metrics` unless
//! `server.metrics_auth`) need `Authorization: Bearer <token>`.

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

    /// May this request see `path`? Always for `/healthz`; otherwise when no token is set,
    /// or the request carries it (compared as SHA-256 digests, in constant time).
    fn authorized(&self, req: &pingora_http::RequestHeader, path: &str) -> bool {
        let generation = self.shared.generation();
        let server = &generation.config.server;
        let Some(token) = &server.admin_token else {
            return true;
        };
        if path == "/healthz" || (path == "/metrics" && !server.metrics_auth) {
            return true;
        }
        req.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|sent| crate::policy::auth::same_secret(sent, token.as_bytes()))
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
        let admission = &self.shared.admission;
        let now = admission.now();
        let limits: Vec<_> = configured_cells(&self.shared)
            .into_iter()
            .map(|(key, cell)| {
                let l = generation.limits(cell.profile());
                serde_json::json!({
                    "host": key,
                    "pace_rps": cell.rps(),
                    "burst": cell.burst(),
                    "max_concurrent": cell.max_concurrent(),
                    "max_queue_wait_ms": l.max_queue_wait.get().as_millis() as u64,
                    "queued": cell.queued(now),
                    "in_flight": cell.in_flight(),
                    "paused_for_ms": cell.paused_until().saturating_sub(now) / 1_000_000,
                })
            })
            .collect();
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
            "defaults": {
                "rps": config.defaults.rps,
                "burst": config.defaults.burst,
                "max_concurrent": config.defaults.max_concurrent,
                "max_queue_wait_ms": config.defaults.max_queue_wait.get().as_millis() as u64,
            },
            "hosts_tracked": admission.len(),
            "shared": admission.fleet().map_or_else(
                || serde_json::json!({"backend": "memory"}),
                |f| f.status(),
            ),
            "hosts": limits,
            "regions": crate::regions::status_json(&self.shared.regions),
            "instance": self.shared.instance,
        })
    }
}

/// Cells of the hosts named exactly in `[hosts]` (bounded by the config, so safe as labels):
/// `name:port` entries directly, bare names on their HTTPS and HTTP ports.
pub fn configured_cells(
    shared: &Shared,
) -> Vec<(String, std::sync::Arc<crate::admission::HostCell>)> {
    let generation = shared.generation();
    let mut out = Vec::new();
    for name in generation.config.hosts.keys() {
        if name.starts_with("*.") {
            continue;
        }
        let name = name.to_ascii_lowercase();
        let keys = if name.contains(':') {
            vec![name]
        } else {
            vec![format!("{name}:443"), format!("{name}:80")]
        };
        for key in keys {
            if let Some(cell) = shared.admission.get(&key) {
                out.push((key, cell));
            }
        }
    }
    out
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
        if !self.authorized(req, &path) {
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({
                    "error": "admin_auth_required",
                    "message": "send Authorization: Bearer <server.admin_token>",
                }),
            );
            let headers = r.headers_mut();
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"sluice-admin\""),
            );
            headers.insert(
                "sluice-error",
                http::HeaderValue::from_static("admin_auth_required"),
            );
            return r;
        }
        if method == http::Method::POST && path == "/reload" {
            let shared = self.shared.clone();
            let outcome = tokio::task::spawn_blocking(move || crate::reload::reload(&shared)).await;
            return match outcome {
                Ok(Ok(generation)) => json(
                    StatusCode::OK,
                    &serde_json::json!({"result": "ok", "generation": generation}),
                ),
                Ok(Err(why)) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({"result": "error", "error": "reload_refused", "message": why}),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"result": "error", "error": "internal", "message": e.to_string()}),
                ),
            };
        }
        if method != http::Method::GET && method != http::Method::HEAD {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "method_not_allowed", "message": "use GET (or POST /reload)"}),
            );
        }
        match path.as_str() {
            "/healthz" => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/metrics" => {
                let m = &self.shared.metrics;
                m.hosts_tracked.set(self.shared.admission.len() as i64);
                m.refresh_regions(&self.shared.regions);
                for (key, cell) in configured_cells(&self.shared) {
                    m.host_pace.with_label_values(&[&key]).set(cell.rps());
                }
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.encode(),
                )
            }
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
