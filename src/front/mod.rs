//! The one proxy listener. sluice reads each request head itself, with a deadline and size
//! caps (slowloris, oversized heads), checks its framing (request smuggling), and then sends
//! `CONNECT` to the tunnel and everything else, head bytes included, to the Pingora proxy.
//! Keep-alive connections come back here before each request, so a CONNECT may follow plain
//! requests on one connection.

mod head;
mod listen;

pub use head::{inspect, HeadAction};
pub use listen::ProxyListener;

use crate::error::Code;
use crate::framing::OneAtATime;
use crate::generation::OTHER_HOST;
use crate::proxy::SluiceProxy;
use crate::state::Shared;
use crate::target::WayIn;
use crate::tunnel;
use bytes::BytesMut;
use head::{absolute_authority, head_end, head_error, head_length, MAX_HEADERS};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Idle time allowed between requests on a kept-alive client connection.
const KEEPALIVE_SECS: u64 = 60;
/// First allocation for a request head (it grows up to the configured maximum).
const HEAD_BUFFER: usize = 4096;
/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

pub struct Front {
    shared: Arc<Shared>,
    http: Arc<HttpProxy<SluiceProxy>>,
}

impl Front {
    pub fn new(shared: Arc<Shared>, http: HttpProxy<SluiceProxy>) -> Front {
        Front {
            shared,
            http: Arc::new(http),
        }
    }

    /// Serve requests on a client connection until it closes: each head read and checked
    /// here, then given to Pingora's HTTP session (and back here before the next). `tunnel`:
    /// the connection is the inside of a CONNECT tunnel, whose requests all go to its
    /// authority (a CONNECT inside it is refused).
    async fn serve_http(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        tunnel: Option<(crate::intercept::TunnelInfo, Option<Vec<u8>>)>,
    ) {
        let generation = self.shared.generation();
        let server = &generation.config.server;
        let security = &generation.config.security;
        let head_timeout = server.header_read_timeout.get();
        let (max_head, max_uri) = (security.max_header_bytes, security.max_uri_bytes);
        let max_connections = security.max_connections;
        drop(generation);
        // Read one request at a time: bytes a client sends ahead wait for their own head.
        let mut stream = Box::new(OneAtATime::new(stream));
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut idle = head_timeout;
        let mut served = false;
        // A refusal inside a tunnel is the tunnel's way in; on the listener no way is known
        // before the head parses.
        let way = if tunnel.is_some() {
            WayIn::Intercept
        } else {
            WayIn::Unknown
        };
        loop {
            stream.head();
            let open = (&self.shared.connections, max_connections);
            // Awaited where it is made: a future held in a local would be kept in this one's
            // state twice (the local and the await), for the connection's whole life.
            let head = read_head(
                &mut stream,
                idle,
                head_timeout,
                max_head,
                shutdown,
                served,
                open,
            )
            .await;
            let mut buf = match head {
                Head::Complete(buf) => buf,
                Head::Gone => return,
                Head::Tls => {
                    tls_on_plain_listener(&self.shared, way);
                    return;
                }
                Head::Refuse(code, why) => {
                    refuse(stream, &self.shared, way, code, &why).await;
                    return;
                }
            };
            // What came after the head: this request's body, or requests sent ahead.
            let rest = buf.split_off(head_length(&buf).unwrap_or(buf.len()));
            if !served && &buf[..] == H2_PREFACE_HEAD {
                // h2 with prior knowledge (or by ALPN inside a tunnel): the preface, then
                // frames. Every byte read so far goes back for the h2 handshake.
                buf.unsplit(rest);
                stream.serve(buf, crate::framing::Body::Open);
                let tunnel = tunnel.map(Arc::new);
                Box::pin(self.serve_h2(stream, shutdown, tunnel)).await;
                return;
            }
            if let Some((info, authorization)) = &tunnel {
                match in_tunnel(&buf, info, authorization.as_deref()) {
                    Ok(rewritten) => buf = BytesMut::from(&rewritten[..]),
                    Err((code, why)) => {
                        refuse(stream, &self.shared, way, code, &why).await;
                        return;
                    }
                }
            }
            match inspect(&buf, max_head, max_uri) {
                Err((code, why)) => {
                    refuse(stream, &self.shared, way, code, &why).await;
                    return;
                }
                Ok(HeadAction::Connect) if tunnel.is_some() => {
                    let why = "CONNECT inside a tunnel";
                    refuse(stream, &self.shared, way, Code::BadRequest, why).await;
                    return;
                }
                Ok(HeadAction::Connect) => {
                    buf.unsplit(rest);
                    // Boxed, like the HTTP session below, so that the state of an idle
                    // connection's task is only what waiting for its next head needs.
                    let Some(inside) = Box::pin(tunnel::serve(&self.shared, stream, buf)).await
                    else {
                        return;
                    };
                    let tunnel = Some((inside.info, inside.authorization));
                    return Box::pin(self.serve_http(inside.stream, shutdown, tunnel)).await;
                }
                Ok(HeadAction::Http(None, body)) => stream.serve(rest, body),
                Ok(HeadAction::Http(Some(rewritten), body)) => {
                    buf = BytesMut::from(&rewritten[..]);
                    stream.serve(rest, body);
                }
            }
            // The session is made in a block of its own: a local moved into the boxed
            // request would otherwise keep its room in this future's state.
            let request = {
                let mut session = ServerSession::new_http1(stream);
                match settings.take() {
                    Some(s) => s.apply_to_session(&mut session),
                    None => session.set_keepalive(Some(KEEPALIVE_SECS)),
                }
                session.set_pipelined_prefix(buf);
                if *shutdown.borrow() {
                    session.set_keepalive(None);
                }
                // Boxed already (an `async_trait` method).
                self.http.process_new_http(session, shutdown)
            };
            let Some(reused) = request.await else { return };
            let (next, next_settings) = reused.consume();
            let Some(next) = OneAtATime::take_back(next) else {
                return;
            };
            stream = next;
            settings = next_settings;
            idle = Duration::from_secs(KEEPALIVE_SECS);
            served = true;
        }
    }
}

impl Front {
    /// Serve an h2 connection: each stream a request through the same pipeline, on its own
    /// task. Bounded: the handshake within the head read timeout, 100 streams at once (and
    /// 100 requests running: a stream the client resets keeps its place until its request
    /// ends, so resets cannot pile up work), a header list of `security.max_header_bytes`,
    /// the h2 crate's flow-control windows. It closes like an idle HTTP/1.1 connection when
    /// no stream has been open for the keep-alive time (shorter as the listener fills), and
    /// gracefully (GOAWAY) on shutdown; a client that then leaves its last streams silent
    /// for `DRAIN` is dropped.
    async fn serve_h2(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        tunnel: Option<Arc<(crate::intercept::TunnelInfo, Option<Vec<u8>>)>>,
    ) {
        use pingora_core::protocols::http::v2::server;
        let digest = Arc::new(pingora_core::protocols::Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let generation = self.shared.generation();
        let security = &generation.config.security;
        let (max_head, max_connections) = (security.max_header_bytes, security.max_connections);
        let head_timeout = generation.config.server.header_read_timeout.get();
        drop(generation);
        let mut options = server::default_h2_options();
        options.max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
        options.max_concurrent_streams(H2_MAX_STREAMS as u32);
        let handshake = server::handshake(stream, Some(options));
        let mut conn = match tokio::time::timeout(head_timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "h2 handshake with a client failed");
                return;
            }
            Err(_) => {
                tracing::debug!("h2 handshake with a client not done within {head_timeout:?}");
                return;
            }
        };
        let streams = Arc::new(Streams::default());
        let mut watch = shutdown.clone();
        let mut closing = false;
        loop {
            let open = self.shared.connections.load(Ordering::Relaxed);
            let idle = keepalive_for(open, max_connections);
            let next = tokio::select! {
                s = server::HttpSession::from_h2_conn(&mut conn, digest.clone()) => s,
                _ = watch.wait_for(|down| *down), if !closing => {
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
                _ = streams.idle_for(idle), if !closing => {
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
                // Closing: the client had its time to finish (or answer the GOAWAY's ping).
                _ = streams.idle_for(H2_DRAIN), if closing => break,
            };
            let h2 = match next {
                Ok(Some(server::H2Accept::Session(h2))) => h2,
                // Malformed (a forbidden byte, conflicting lengths): answered or reset.
                Ok(Some(server::H2Accept::Rejected)) => continue,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "h2 connection from a client ended");
                    break;
                }
            };
            if streams.count.load(Ordering::Acquire) >= H2_MAX_STREAMS {
                // As many requests running as streams allowed (the client reset some and
                // opened more): this one is refused before any work.
                let mut session = ServerSession::new_http2(h2);
                session.shutdown_with_reason(h2::Reason::REFUSED_STREAM);
                continue;
            }
            let open = Streams::open(&streams);
            let front = self.clone();
            let shutdown = shutdown.clone();
            let tunnel = tunnel.clone();
            tokio::spawn(async move {
                let _open = open;
                let mut session = ServerSession::new_http2(h2);
                let head = session.req_header_mut();
                let made = match &tunnel {
                    Some(t) => h2_in_tunnel(head, &t.0, t.1.as_deref()),
                    None => h2_on_listener(head),
                };
                if let Err((code, why)) = made {
                    refuse_h2(session, &front.shared, code, &why).await;
                    return;
                }
                front.http.process_new_http(session, &shutdown).await;
            });
        }
    }
}

/// Streams (and requests running) at once on one h2 connection from a client.
const H2_MAX_STREAMS: usize = 100;
/// How long a closing h2 connection waits, with no stream open, for its client to finish.
const H2_DRAIN: Duration = Duration::from_secs(5);

/// The h2 client preface's first part, which reads like a request head (RFC 9113 3.4).
const H2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Streams open on one h2 connection, and a wake-up when the count changes.
#[derive(Default)]
struct Streams {
    count: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// One open stream, until dropped.
struct OpenStream(Arc<Streams>);

impl Streams {
    fn open(this: &Arc<Streams>) -> OpenStream {
        this.count.fetch_add(1, Ordering::AcqRel);
        this.changed.notify_waiters();
        OpenStream(this.clone())
    }

    /// Returns once no stream has been open for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                if tokio::time::timeout(idle, changed).await.is_err() {
                    return;
                }
            } else {
                changed.await;
            }
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// An h2 request on the listener, made the shape the pipeline reads: its target in origin
/// form (the destination comes from a route or `Sluice-Target`, never from `:authority`,
/// which names sluice), and `:authority` as its `Host`.
fn h2_on_listener(head: &mut pingora_http::RequestHeader) -> Result<(), (Code, String)> {
    let authority = head.uri.authority().map(|a| a.as_str().to_string());
    let path = head
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    head.set_raw_path(path.as_bytes())
        .map_err(|e| (Code::BadRequest, format!("h2 request path: {e}")))?;
    if let (Some(a), false) = (authority, head.headers.contains_key(http::header::HOST)) {
        head.insert_header(http::header::HOST, a)
            .map_err(|e| (Code::BadRequest, format!("h2 :authority: {e}")))?;
    }
    Ok(())
}

/// An h2 request inside an intercepted tunnel, made to go where the tunnel goes, as
/// [`in_tunnel`] does for HTTP/1.1: its `:authority` must be the tunnel's.
fn h2_in_tunnel(
    head: &mut pingora_http::RequestHeader,
    info: &crate::intercept::TunnelInfo,
    authorization: Option<&[u8]>,
) -> Result<(), (Code, String)> {
    if let Some(a) = head.uri.authority() {
        let default_port = format!("{}:443", a.as_str());
        let same = a.as_str().eq_ignore_ascii_case(&info.authority)
            || default_port.eq_ignore_ascii_case(&info.authority);
        if !same {
            return Err((
                Code::BadTarget,
                format!(
                    "a request for {:?} inside a tunnel to {}",
                    a.as_str(),
                    info.authority
                ),
            ));
        }
    }
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let absolute = format!("{}://{}{path}", info.scheme, info.authority);
    head.set_raw_path(absolute.as_bytes())
        .map_err(|e| (Code::BadRequest, format!("h2 request path: {e}")))?;
    let bad = |e: pingora_error::BError| (Code::BadRequest, format!("h2 request head: {e}"));
    head.insert_header(http::header::HOST, info.authority.as_str())
        .map_err(bad)?;
    head.remove_header(&crate::target::SLUICE_TARGET);
    head.remove_header(&http::header::PROXY_AUTHORIZATION);
    if let Some(a) = authorization {
        head.insert_header(http::header::PROXY_AUTHORIZATION, a)
            .map_err(bad)?;
    }
    Ok(())
}

/// Refuse one h2 stream with `code` (the connection's other streams go on).
async fn refuse_h2(mut session: ServerSession, shared: &Shared, code: Code, message: &str) {
    crate::access::Line {
        way: WayIn::Unknown,
        status: code.status(),
        error: Some(code),
        reason: Some(message),
        protocol: Some(("h2", None)),
        ..Default::default()
    }
    .finish(shared, &shared.generation(), OTHER_HOST);
    let body = crate::error::json_body(code, message);
    let written = async {
        let mut resp = pingora_http::ResponseHeader::build(code.status(), Some(3))?;
        resp.insert_header("Sluice-Error", code.as_str())?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        session.write_response_header(Box::new(resp)).await?;
        session
            .write_response_body(bytes::Bytes::from(body), true)
            .await
    }
    .await;
    if let Err(e) = written {
        tracing::debug!(error = %e, "h2 client gone before the refusal");
    }
}

/// A request head read inside a tunnel, rebuilt to go where the tunnel goes: its target in
/// absolute form with the tunnel's scheme and authority, `Host` that authority, and the
/// CONNECT's `Proxy-Authorization` as its own. An absolute target must name the tunnel's
/// authority; `Sluice-Target` has no say inside a tunnel.
fn in_tunnel(
    buf: &[u8],
    info: &crate::intercept::TunnelInfo,
    authorization: Option<&[u8]>,
) -> Result<Vec<u8>, (Code, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(head_error(None)),
        Err(e) => return Err(head_error(Some(e))),
    };
    let (method, target) = (req.method.unwrap_or("GET"), req.path.unwrap_or("/"));
    let wanted = format!("{}://{}", info.scheme, info.authority);
    let absolute = if target.starts_with('/') {
        format!("{wanted}{target}")
    } else if let Some(authority) = absolute_authority(target) {
        let same = authority.eq_ignore_ascii_case(&info.authority)
            || target.len() >= wanted.len() && target[..wanted.len()].eq_ignore_ascii_case(&wanted);
        if !same {
            return Err((
                Code::BadTarget,
                format!(
                    "a request for {target:?} inside a tunnel to {}",
                    info.authority
                ),
            ));
        }
        target.to_string()
    } else if method == "CONNECT" {
        target.to_string()
    } else {
        return Err((
            Code::BadTarget,
            format!("request target {target:?} inside a tunnel: origin form expected"),
        ));
    };
    let version = if req.version == Some(0) { "1.0" } else { "1.1" };
    let mut out = Vec::with_capacity(buf.len() + 64);
    out.extend_from_slice(format!("{method} {absolute} HTTP/{version}\r\n").as_bytes());
    out.extend_from_slice(format!("Host: {}\r\n", info.authority).as_bytes());
    let target = crate::target::SLUICE_TARGET;
    let skip = ["host", "proxy-authorization", target.as_str()];
    for h in req.headers.iter() {
        if skip.iter().any(|s| h.name.eq_ignore_ascii_case(s)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(a) = authorization {
        out.extend_from_slice(b"Proxy-Authorization: ");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[head_len..]);
    Ok(out)
}

/// Counts an open client connection until dropped.
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a client address's open connection until dropped.
struct FromClient<'a> {
    shared: &'a Shared,
    ip: std::net::IpAddr,
}

impl FromClient<'_> {
    /// Count one more connection from `ip`; the count with it.
    fn open(shared: &Shared, ip: std::net::IpAddr) -> (FromClient<'_>, usize) {
        let mut map = shared.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        *n += 1;
        let count = *n;
        (FromClient { shared, ip }, count)
    }
}

impl Drop for FromClient<'_> {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// How long a kept-alive connection may sit idle with `open` of `max` connections open:
/// `KEEPALIVE_SECS` up to half full, then less and less (quadratically), down to 1 s when
/// full, so idle connections make room for new clients under pressure.
fn keepalive_for(open: usize, max: usize) -> Duration {
    let full = Duration::from_secs(KEEPALIVE_SECS);
    let load = open as f64 / max.max(1) as f64;
    if load <= 0.5 {
        return full;
    }
    let left = ((1.0 - load) / 0.5).clamp(0.0, 1.0);
    full.mul_f64(left * left).max(Duration::from_secs(1))
}

/// The outcome of reading one request head.
enum Head {
    /// A complete head (and whatever followed it in the same reads).
    Complete(BytesMut),
    /// The client closed or went quiet before sending anything: close silently.
    Gone,
    /// Refuse with this code and reason, then close.
    Refuse(Code, String),
    /// A TLS handshake where a head was due: close at once.
    Tls,
}

/// Read one request head. `reused`: the connection already carried a request, so while it
/// sits idle a shutdown closes it. A new connection is always served: its client is already
/// sending, and closing it would lose the request (as during a graceful upgrade).
#[allow(clippy::too_many_arguments)]
async fn read_head(
    stream: &mut OneAtATime,
    idle: Duration,
    head_timeout: Duration,
    max: usize,
    shutdown: &ShutdownWatch,
    reused: bool,
    open: (&AtomicUsize, usize),
) -> Head {
    // Wait for the first bytes without a head buffer: an idle kept-alive connection holds
    // none (see `first_bytes`).
    let got = if reused {
        // Idle between requests: a shutdown closes the connection, and so does the idle
        // time allowed, which shrinks while the listener fills up (looked at every second).
        let since = tokio::time::Instant::now();
        let mut shutdown = shutdown.clone();
        let read = first_bytes(stream);
        tokio::pin!(read);
        loop {
            let allowed = keepalive_for(open.0.load(Ordering::Relaxed), open.1).min(idle);
            let left = allowed.saturating_sub(since.elapsed());
            if left.is_zero() {
                return Head::Gone;
            }
            tokio::select! {
                r = &mut read => break r,
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                _ = shutdown.wait_for(|down| *down) => return Head::Gone,
            }
        }
    } else {
        match tokio::time::timeout(idle, first_bytes(stream)).await {
            Ok(r) => r,
            Err(_) => return Head::Gone,
        }
    };
    let mut buf = match got {
        Ok(buf) if !buf.is_empty() => buf,
        _ => return Head::Gone,
    };
    if buf[0] == TLS_HANDSHAKE {
        // No request line starts with this byte: a TLS ClientHello, from a client told to
        // reach sluice with `https://`. Nothing it could read is sent: closed at once.
        return Head::Tls;
    }
    let deadline = tokio::time::Instant::now() + head_timeout;
    let mut scanned = 0;
    loop {
        if head_end(&buf, scanned) {
            return Head::Complete(buf);
        }
        scanned = buf.len();
        if buf.len() > max {
            return Head::Refuse(Code::HeadTooLarge, format!("request head over {max} bytes"));
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => {
                return Head::Refuse(
                    Code::RequestTimeout,
                    format!("request head not complete within {head_timeout:?}"),
                )
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Gone,
            Ok(Ok(_)) => {}
        }
    }
}

/// Wait for a client's next bytes, then read what it sent (up to `HEAD_BUFFER`) into a new
/// head buffer: the buffer exists only once bytes have come, so a connection waiting for its
/// next request holds none, and the first read is the only system call. Empty: the client
/// closed.
async fn first_bytes(stream: &mut OneAtATime) -> std::io::Result<BytesMut> {
    std::future::poll_fn(|cx| {
        // On the stack of this poll, not in the future: nothing is kept while waiting.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_BUFFER];
        let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
        std::task::ready!(tokio::io::AsyncRead::poll_read(
            std::pin::Pin::new(&mut *stream),
            cx,
            &mut read
        ))?;
        let mut buf = BytesMut::with_capacity(HEAD_BUFFER);
        buf.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(buf))
    })
    .await
}

/// Close gracefully after a refusal: send FIN, then read and drop what the client still sends
/// for a moment, so that unread request bytes do not turn the close into a reset that would
/// destroy the response before the client reads it.
async fn linger(stream: &mut Stream) {
    if let Err(e) = AsyncWriteExt::shutdown(stream).await {
        tracing::trace!(error = %e, "shutdown after a refusal");
        return;
    }
    // On the heap: a buffer in the future would be part of every connection's task.
    let mut sink = vec![0u8; 4096];
    let mut budget: usize = 256 * 1024;
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while budget > 0 {
        match tokio::time::timeout_at(until, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
            _ => break,
        }
    }
}

/// Count and log a TLS handshake where a request head was due, with what to do about it.
fn tls_on_plain_listener(shared: &Shared, way: WayIn) {
    let reason = if way == WayIn::Unknown {
        "a TLS handshake on sluice's plain HTTP listener: write the proxy URL as http:// \
         (https_proxy=http://host:port); the client's own TLS goes inside the CONNECT tunnel"
    } else {
        "a TLS handshake where sluice serves the tunnel's inside as HTTP"
    };
    crate::access::Line {
        way,
        error: Some(Code::TlsOnPlainListener),
        reason: Some(reason),
        ..Default::default()
    }
    .finish(shared, &shared.generation(), OTHER_HOST);
}

/// Refuse a head with `code`, counted and logged under `way` (`unknown` on the listener, as
/// the way is not known before the head parses; `intercept` inside a tunnel). Boxed: refusals
/// are rare, and their state would otherwise be part of every connection's task.
fn refuse<'a>(
    stream: Stream,
    shared: &'a Shared,
    way: WayIn,
    code: Code,
    message: &'a str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(refuse_now(stream, shared, way, code, message))
}

async fn refuse_now(mut stream: Stream, shared: &Shared, way: WayIn, code: Code, message: &str) {
    // Counted and logged before the answer goes out: whoever reads the refusal finds it
    // counted.
    crate::access::Line {
        way,
        status: code.status(),
        error: Some(code),
        reason: Some(message),
        ..Default::default()
    }
    .finish(shared, &shared.generation(), OTHER_HOST);
    let raw = crate::gate::Refusal::new(code, message).raw();
    let written = async {
        stream.write_all(&raw).await?;
        stream.flush().await
    }
    .await;
    if let Err(e) = written {
        tracing::debug!(error = %e, "client gone before the refusal");
    }
    linger(&mut stream).await;
}

impl Front {
    /// Serve a client connection, from its accept to its close: counted against the
    /// listener's and its address's limits, then its requests.
    pub async fn serve_client(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
        let generation = self.shared.generation();
        let security = &generation.config.security;
        let open = self.shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let _open = Open(&self.shared.connections);
        if open > security.max_connections {
            let why = format!("over {} open connections", security.max_connections);
            refuse(
                stream,
                &self.shared,
                WayIn::Unknown,
                Code::TooManyConnections,
                &why,
            )
            .await;
            return;
        }
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let _from = match ip {
            Some(ip) => {
                let (from, count) = FromClient::open(&self.shared, ip);
                if count > security.max_connections_per_client {
                    drop(from);
                    let why = format!(
                        "over {} open connections from {ip} (security.max_connections_per_client)",
                        security.max_connections_per_client
                    );
                    refuse(
                        stream,
                        &self.shared,
                        WayIn::Unknown,
                        Code::TooManyConnections,
                        &why,
                    )
                    .await;
                    return;
                }
                Some(from)
            }
            None => None,
        };
        drop(generation);
        self.serve_http(stream, shutdown, None).await;
    }

    /// What Pingora's proxy does once the listener has stopped.
    pub async fn cleanup(&self) {
        self.http.http_cleanup().await;
    }
}
