//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text), `GET /status` (JSON),
//! `GET /ui` (a live page drawn from `/status`) and `POST /reload`; with `server.admin_token`,
//! `/status` and `/reload` (and `/metrics` with `server.metrics_auth`) need
//! `Authorization: Bearer <token>`.
//!
//! `/ui` itself is served without the token: it is the same page for every sluice, holds no
//! data, and a browser cannot send a bearer token when it opens a page. The page asks for the
//! token and sends it on its own `/status` calls.

mod status;

pub use status::configured_cells;

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
        if path == "/healthz" || path == "/ui" || (path == "/metrics" && !server.metrics_auth) {
            return true;
        }
        req.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|sent| crate::policy::auth::same_secret(sent, token.as_bytes()))
    }
}

/// The live page: one self-contained HTML file (no external assets), built into the binary.
const UI_PAGE: &str = include_str!("ui.html");

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
                let now = self.shared.admission.now();
                m.dns_in_flight.set(self.shared.dns.in_flight() as i64);
                m.hosts_paused
                    .set(self.shared.admission.paused_count(now) as i64);
                m.callers
                    .refresh(&self.shared.admission, &self.shared.generation());
                let cells = configured_cells(&self.shared);
                m.tokens
                    .refresh(cells.iter().map(|(k, c)| (k.as_str(), &**c)), now);
                for (key, cell) in cells {
                    let labels = [key.as_str()];
                    m.host_pace.with_label_values(&labels).set(cell.rps());
                    m.host_queued
                        .with_label_values(&labels)
                        .set(cell.queued(now).min(i64::MAX as u64) as i64);
                    m.host_in_flight
                        .with_label_values(&labels)
                        .set(i64::from(cell.in_flight()));
                    let left = cell.paused_until().saturating_sub(now);
                    m.host_paused
                        .with_label_values(&labels)
                        .set(left as f64 / 1e9);
                }
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.encode(),
                )
            }
            "/status" => json(StatusCode::OK, &status::status_json(&self.shared)),
            "/ui" => {
                let mut r = respond(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    UI_PAGE.as_bytes().to_vec(),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_SECURITY_POLICY,
                    http::HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; \
                         style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                    ),
                );
                r
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({
                    "error": "not_found",
                    "message": "admin paths: /healthz /metrics /status /ui /reload",
                }),
            ),
        }
    }
}
