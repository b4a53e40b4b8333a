//! Connections to upstream endpoints, HTTP/1.1 and h2, pooled. An h2 connection carries many
//! requests at once, so an endpoint that speaks h2 is reached through as few connections as
//! its server's `SETTINGS_MAX_CONCURRENT_STREAMS` allows: the callers that find no stream free
//! wait while one of them opens the next connection, instead of each opening its own.
//!
//! Every h2 stream taken from here goes back when its [`Session`] ends, whether it was read
//! to its end, cut by an error, or dropped as the loser of a hedge or race (its stream reset,
//! its connection kept for the others).

use pingora_core::connectors::http::{v1, v2};
use pingora_core::connectors::ConnectorOptions;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::{HttpPeer, Peer, ALPN};
use pingora_error::Result;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Idle time of a pooled upstream connection.
pub const IDLE: Duration = Duration::from_secs(60);
/// Most streams sluice opens at once on one h2 connection; the server's own
/// `SETTINGS_MAX_CONCURRENT_STREAMS` applies below it.
pub const MAX_H2_STREAMS: usize = 100;
/// Longest wait for an endpoint's gate when the peer names no connect timeout.
const GATE_WAIT: Duration = Duration::from_secs(5);
/// Endpoints remembered (their connect gate and whether they answered h2); past it, the
/// ones nobody is using are forgotten.
const MAX_ENDPOINTS: usize = 4096;

/// The version an exchange spoke on one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    H1,
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H1 => "http/1.1",
            Protocol::H2 => "h2",
        }
    }

    pub fn of(session: &HttpSession) -> Protocol {
        match session {
            HttpSession::H2(_) => Protocol::H2,
            _ => Protocol::H1,
        }
    }
}

/// One endpoint's gate: held while an h2 stream is taken or a connection opened for it.
#[derive(Default)]
struct Endpoint {
    gate: tokio::sync::Mutex<()>,
    /// Its server chose HTTP/1.1 when offered both: later connections skip the gate.
    speaks_h1: AtomicBool,
}

/// Exchanges open now with upstreams (an h2 stream, or an HTTP/1.1 request on its
/// connection), by HTTP version; and connections opened so far.
#[derive(Debug, Default)]
pub struct Open {
    h1: AtomicI64,
    h2: AtomicI64,
    opened_h1: AtomicI64,
    opened_h2: AtomicI64,
}

impl Open {
    /// Add `other`'s counts to these (a host's, from its endpoints').
    pub fn add(&self, other: &Open) {
        for (a, b) in [
            (&self.h1, &other.h1),
            (&self.h2, &other.h2),
            (&self.opened_h1, &other.opened_h1),
            (&self.opened_h2, &other.opened_h2),
        ] {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn count(&self, protocol: Protocol, by: i64, opened: bool) {
        let (now, total) = match protocol {
            Protocol::H1 => (&self.h1, &self.opened_h1),
            Protocol::H2 => (&self.h2, &self.opened_h2),
        };
        now.fetch_add(by, Ordering::Relaxed);
        if opened {
            total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `{"http/1.1": n, "h2": n, "connections_opened": {"http/1.1": n, "h2": n}}`.
    pub fn json(&self) -> serde_json::Value {
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0);
        serde_json::json!({
            "http/1.1": get(&self.h1),
            "h2": get(&self.h2),
            "connections_opened": {
                "http/1.1": get(&self.opened_h1),
                "h2": get(&self.opened_h2),
            },
        })
    }
}

pub struct Upstreams {
    h1: v1::Connector,
    h2: v2::Connector,
    /// Read on every h2-capable request: a concurrent map, no lock.
    endpoints: papaya::HashMap<u64, Arc<Endpoint>, foldhash::fast::RandomState>,
    /// Exchanges open now with every upstream.
    pub open: Open,
}

impl Upstreams {
    pub fn new(options: Option<ConnectorOptions>) -> Arc<Upstreams> {
        Arc::new(Upstreams {
            h1: v1::Connector::new(options.clone()),
            h2: v2::Connector::new(options),
            endpoints: papaya::HashMap::default(),
            open: Open::default(),
        })
    }

    fn endpoint(&self, key: u64) -> Arc<Endpoint> {
        let map = self.endpoints.pin();
        if let Some(e) = map.get(&key) {
            return e.clone();
        }
        if map.len() >= MAX_ENDPOINTS {
            map.retain(|_, e| Arc::strong_count(e) > 1);
        }
        map.get_or_insert_with(key, Default::default).clone()
    }

    /// A session to `peer`: a free stream of a pooled h2 connection, a pooled HTTP/1.1
    /// connection, or a new connection of whichever version the peer's ALPN allows and the
    /// server picks; counted open in `here` (its endpoint's count) until it ends. The second
    /// value: it came from the pool.
    pub async fn session(
        self: &Arc<Self>,
        peer: &HttpPeer,
        here: &Arc<Open>,
    ) -> Result<(Session, bool)> {
        let (session, reused) = self.connect(peer).await?;
        let protocol = Protocol::of(&session);
        self.open.count(protocol, 1, !reused);
        here.count(protocol, 1, !reused);
        let session = Session(Box::new(Held {
            inner: Some(session),
            peer: peer.clone(),
            pool: self.clone(),
            here: here.clone(),
            protocol,
        }));
        Ok((session, reused))
    }

    async fn connect(&self, peer: &HttpPeer) -> Result<(HttpSession, bool)> {
        // A new connection's future (TCP, TLS, the h2 handshake) is large and rare with
        // keep-alive: it is boxed, so that every request's future stays small.
        let alpn = &peer.options.alpn;
        if alpn.get_max_http_version() == 1 {
            if let Some(h1) = self.h1.reused_http_session(peer).await {
                return Ok((HttpSession::H1(h1), true));
            }
            let (h1, reused) = Box::pin(self.h1.get_http_session(peer)).await?;
            return Ok((HttpSession::H1(h1), reused));
        }
        let h2_only = alpn.get_min_http_version() == 2;
        let endpoint = self.endpoint(peer.reuse_hash());
        // A server that chose HTTP/1.1 (or, offered only h2, no protocol at all) is reached
        // over pooled HTTP/1.1 connections, without the gate.
        if endpoint.speaks_h1.load(Ordering::Relaxed) {
            if let Some(h1) = self.h1.reused_http_session(peer).await {
                return Ok((HttpSession::H1(h1), true));
            }
            let session = Box::pin(self.h2.new_http_session(peer)).await?;
            if matches!(session, HttpSession::H2(_)) {
                endpoint.speaks_h1.store(false, Ordering::Relaxed);
            }
            return Ok((session, false));
        }
        // One caller at a time looks for a free stream and, finding none, opens the next
        // connection, which the others then share. A caller waits for its turn at most a
        // connect's time (an endpoint whose connects hang does not make each caller wait for
        // all the others' connects), then opens its own.
        let wait = peer.options.connection_timeout.unwrap_or(GATE_WAIT);
        let _turn = tokio::time::timeout(wait, endpoint.gate.lock()).await.ok();
        if let Some(h2) = self.h2.reused_http_session(peer).await? {
            return Ok((HttpSession::H2(h2), true));
        }
        if !h2_only {
            if let Some(h1) = self.h1.reused_http_session(peer).await {
                return Ok((HttpSession::H1(h1), true));
            }
        }
        let session = Box::pin(self.h2.new_http_session(peer)).await?;
        if matches!(session, HttpSession::H1(_)) {
            endpoint.speaks_h1.store(true, Ordering::Relaxed);
        }
        Ok((session, false))
    }
}

/// The ALPN for a peer: which versions sluice offers the endpoint. `grpc`: the request only
/// works over h2 (trailers).
pub fn alpn(http2: crate::config::Http2, tls: bool, grpc: bool) -> ALPN {
    use crate::config::Http2;
    match http2 {
        Http2::Never => ALPN::H1,
        Http2::Always => ALPN::H2,
        Http2::Auto if grpc => ALPN::H2,
        Http2::Auto if tls => ALPN::H2H1,
        Http2::Auto => ALPN::H1,
    }
}

/// A session to an upstream, given back to its pool when it ends: by [`Session::release`]
/// once its answer was read to the end, or when dropped (an HTTP/1.1 connection is then
/// closed; an h2 stream is reset and its connection kept). Boxed: Pingora's sessions are
/// large, and every future that holds one (an attempt, the answer's streaming) stays small.
pub struct Session(Box<Held>);

struct Held {
    inner: Option<HttpSession>,
    peer: HttpPeer,
    pool: Arc<Upstreams>,
    here: Arc<Open>,
    protocol: Protocol,
}

impl Held {
    /// No longer open (released or dropped).
    fn closed(&self) {
        self.pool.open.count(self.protocol, -1, false);
        self.here.count(self.protocol, -1, false);
    }
}

impl Session {
    pub fn protocol(&self) -> Protocol {
        self.0.protocol
    }

    pub fn peer(&self) -> &HttpPeer {
        &self.0.peer
    }

    /// Give the session back for reuse (its answer was read to its end).
    pub async fn release(mut self) {
        let held = &mut *self.0;
        let Some(session) = held.inner.take() else {
            return;
        };
        held.closed();
        match session {
            // Pingora's HTTP/1.1 release is a large future (it may drain the body): boxed,
            // so that the futures of every request that holds a session stay small.
            HttpSession::H1(h1) => {
                let release = held
                    .pool
                    .h1
                    .release_http_session(h1, &held.peer, Some(IDLE));
                Box::pin(release).await
            }
            HttpSession::H2(h2) => held
                .pool
                .h2
                .release_http_session(h2, &held.peer, Some(IDLE)),
            _ => {}
        }
    }
}

impl std::ops::Deref for Session {
    type Target = HttpSession;
    fn deref(&self) -> &HttpSession {
        // Only `release` and `drop` take it, and both consume the session.
        self.0.inner.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut HttpSession {
        self.0.inner.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let held = &mut *self.0;
        let Some(session) = held.inner.take() else {
            return;
        };
        held.closed();
        if let HttpSession::H2(h2) = session {
            // The stream is reset (dropped unfinished); its connection serves the others.
            held.pool
                .h2
                .release_http_session(h2, &held.peer, Some(IDLE));
        }
    }
}
