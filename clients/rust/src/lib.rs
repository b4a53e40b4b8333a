//! A [`reqwest_middleware`] middleware that sends calls through sluice, and straight to the
//! API when sluice is away, so sluice never becomes the outage:
//!
//! - [`Mode::Performance`]: every call through sluice, as an explicit-target request
//!   (`Sluice-Target`), so HTTPS APIs get every feature; sluice unreachable or answering its
//!   own `503`: the call goes direct.
//! - [`Mode::Frugal`]: direct first; after a status in `fallback_on` (429 and 5xx by default)
//!   or a connect error, through sluice, which waits out the API's pause. After a 429 any
//!   method goes again (the API refused it); after a 5xx or a failure once sent, only an
//!   idempotent method or one with `Idempotency-Key`.
//!
//! ```no_run
//! use sluice_client::{Mode, SluiceMiddleware};
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(SluiceMiddleware::new("http://127.0.0.1:8080", Mode::Frugal).unwrap())
//!     .build();
//! ```
//!
//! A request whose body cannot be cloned (a stream) is sent one way only: through sluice in
//! PERFORMANCE, direct in FRUGAL.

use http::Extensions;
use reqwest::{Request, Response, Url};
use reqwest_middleware::{Middleware, Next, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How calls are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Performance,
    Frugal,
}

/// What the middleware did, for the caller to read.
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls answered through sluice.
    pub via_sluice: AtomicU64,
    /// Calls answered by the API directly.
    pub direct: AtomicU64,
    /// Calls that went direct because sluice was unreachable or answered its own 503.
    pub sluice_unavailable: AtomicU64,
    /// FRUGAL calls sent through sluice after a direct 429, 5xx or connect error.
    pub fell_back_to_sluice: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The middleware; see the crate's documentation.
pub struct SluiceMiddleware {
    sluice: Url,
    mode: Mode,
    fallback_on: Vec<u16>,
    headers: Vec<(&'static str, String)>,
    stats: Arc<Stats>,
}

/// The `sluice_url` given is not an `http(s)://host:port` URL.
#[derive(Debug)]
pub struct BadUrl(pub String);

impl std::fmt::Display for BadUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sluice_url must be http(s)://host:port: {}", self.0)
    }
}

impl std::error::Error for BadUrl {}

impl SluiceMiddleware {
    pub fn new(sluice_url: &str, mode: Mode) -> std::result::Result<SluiceMiddleware, BadUrl> {
        let sluice = Url::parse(sluice_url).map_err(|e| BadUrl(e.to_string()))?;
        if !matches!(sluice.scheme(), "http" | "https") || sluice.host_str().is_none() {
            return Err(BadUrl(sluice_url.to_string()));
        }
        Ok(SluiceMiddleware {
            sluice,
            mode,
            fallback_on: vec![429, 500, 502, 503, 504],
            headers: Vec::new(),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Statuses after which FRUGAL goes through sluice.
    pub fn fallback_on(mut self, statuses: &[u16]) -> Self {
        self.fallback_on = statuses.to_vec();
        self
    }

    /// `Sluice-Key`, when sluice has clients configured.
    pub fn sluice_key(self, key: &str) -> Self {
        self.header("Sluice-Key", key)
    }

    /// `Sluice-Mode`: `single`, `hedge` or `race`.
    pub fn sluice_mode(self, mode: &str) -> Self {
        self.header("Sluice-Mode", mode)
    }

    /// `Sluice-Regions`, in the order to try them.
    pub fn regions(self, regions: &[&str]) -> Self {
        self.header("Sluice-Regions", &regions.join(","))
    }

    /// `Sluice-Timeout`, e.g. `"30s"`.
    pub fn sluice_timeout(self, timeout: &str) -> Self {
        self.header("Sluice-Timeout", timeout)
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    /// The counters, shared with the middleware.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The call as an explicit-target request to sluice (`None` if its URL has no host).
    fn to_sluice(&self, req: Request) -> Option<Request> {
        let url = req.url().clone();
        let host = url.host_str()?;
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let target = format!("{}://{authority}", url.scheme());
        let mut via = req;
        let mut to = self.sluice.clone();
        to.set_path(url.path());
        to.set_query(url.query());
        *via.url_mut() = to;
        let h = via.headers_mut();
        h.remove(http::header::HOST);
        h.insert("sluice-target", target.parse().ok()?);
        for (k, v) in &self.headers {
            h.insert(*k, v.parse().ok()?);
        }
        Some(via)
    }

    /// Through sluice: the answer, or the request back when sluice is away (nothing sent).
    async fn through_sluice(
        &self,
        req: Request,
        ext: &mut Extensions,
        next: Next<'_>,
    ) -> std::result::Result<Result<Response>, ()> {
        let again = replayable(&req);
        let Some(via) = self.to_sluice(req) else {
            return Err(());
        };
        match next.run(via, ext).await {
            // Never connected; or a kept-alive connection to sluice found closed (sluice went
            // away), where a call that is safe to send twice may still go direct.
            Err(reqwest_middleware::Error::Reqwest(e))
                if e.is_connect() || (again && e.is_request() && !e.is_timeout()) =>
            {
                tracing::warn!(sluice = %self.sluice, error = %e, "sluice unreachable: calling directly");
                bump(&self.stats.sluice_unavailable);
                Err(())
            }
            Ok(r) if r.status().as_u16() == 503 && r.headers().contains_key("sluice-error") => {
                tracing::warn!(sluice = %self.sluice, "sluice answered its own 503: calling directly");
                bump(&self.stats.sluice_unavailable);
                Err(())
            }
            other => {
                if other.is_ok() {
                    bump(&self.stats.via_sluice);
                }
                Ok(other)
            }
        }
    }
}

fn replayable(req: &Request) -> bool {
    matches!(
        req.method().as_str(),
        "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
    ) || req.headers().contains_key("idempotency-key")
}

#[async_trait::async_trait]
impl Middleware for SluiceMiddleware {
    async fn handle(&self, req: Request, ext: &mut Extensions, next: Next<'_>) -> Result<Response> {
        let Some(copy) = req.try_clone() else {
            // A streamed body goes one way only.
            return match self.mode {
                Mode::Performance => match self.through_sluice(req, ext, next).await {
                    Ok(r) => r,
                    Err(()) => Err(reqwest_middleware::Error::middleware(BadUrl(
                        "sluice is away and a streamed body cannot be sent again".into(),
                    ))),
                },
                Mode::Frugal => {
                    bump(&self.stats.direct);
                    next.run(req, ext).await
                }
            };
        };
        match self.mode {
            Mode::Performance => match self.through_sluice(req, ext, next.clone()).await {
                Ok(r) => r,
                Err(()) => {
                    bump(&self.stats.direct);
                    next.run(copy, ext).await
                }
            },
            Mode::Frugal => {
                let again = replayable(&copy);
                let direct = next.clone().run(req, ext).await;
                let fall_back = match &direct {
                    Err(reqwest_middleware::Error::Reqwest(e)) if e.is_connect() => true,
                    Err(_) => again,
                    Ok(r) => {
                        let s = r.status().as_u16();
                        self.fallback_on.contains(&s) && (s == 429 || again)
                    }
                };
                if !fall_back {
                    bump(&self.stats.direct);
                    return direct;
                }
                bump(&self.stats.fell_back_to_sluice);
                match self.through_sluice(copy, ext, next).await {
                    Ok(r) => r,
                    Err(()) => {
                        bump(&self.stats.direct);
                        direct
                    }
                }
            }
        }
    }
}
