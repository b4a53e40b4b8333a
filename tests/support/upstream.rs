//! A programmable fake upstream on 127.0.0.1:0 (HTTP/1.1, optional TLS, optional h2: by ALPN
//! over TLS, with prior knowledge over plain TCP), run on its own thread
//! and runtime so tests may block freely; and a raw TCP echo server for tunnels.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a route answers.
#[derive(Clone, Debug)]
pub struct Reply {
    status: u16,
    body: Vec<u8>,
    chunks: Option<Vec<Vec<u8>>>,
    headers: Vec<(String, String)>,
    latency: Duration,
    fail_first: usize,
    fail_status: u16,
    retry_after: Option<String>,
    trailers: Vec<(String, String)>,
}

impl Reply {
    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.as_bytes().to_vec(),
            chunks: None,
            headers: Vec::new(),
            latency: Duration::ZERO,
            fail_first: 0,
            fail_status: 503,
            retry_after: None,
            trailers: Vec::new(),
        }
    }

    /// Send these trailers after the body (h2 only: HTTP/1.1 answers drop them).
    pub fn trailer(mut self, name: &str, value: &str) -> Reply {
        self.trailers.push((name.to_string(), value.to_string()));
        self
    }

    /// A body sent with chunked transfer coding, one chunk per part.
    pub fn chunked(status: u16, parts: &[&str]) -> Reply {
        let mut r = Reply::text(status, "");
        r.chunks = Some(parts.iter().map(|p| p.as_bytes().to_vec()).collect());
        r
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Wait this long before sending the response head.
    pub fn latency(mut self, d: Duration) -> Reply {
        self.latency = d;
        self
    }

    /// Answer the first `n` requests with `status` (and `Retry-After` if set).
    pub fn fail_first(mut self, n: usize, status: u16) -> Reply {
        self.fail_first = n;
        self.fail_status = status;
        self
    }

    pub fn retry_after(mut self, value: &str) -> Reply {
        self.retry_after = Some(value.to_string());
        self
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The request target as sent (origin-form expected).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Route {
    prefix: String,
    reply: Reply,
    hits: AtomicUsize,
    /// A status set while the upstream runs (0: the reply's own).
    status_override: AtomicU16,
}

#[derive(Default)]
struct State {
    routes: Vec<Route>,
    log: Mutex<Vec<Received>>,
    connections: AtomicUsize,
}

pub struct Builder {
    routes: Vec<(String, Reply)>,
    tls: Option<(String, String)>,
    h2: bool,
    goaway_after: Option<usize>,
}

impl Builder {
    /// Answer paths starting with `prefix` with `reply` (first match wins). Unmatched paths
    /// echo the request: status 200, the request body, and `x-echo-*` headers.
    pub fn route(mut self, prefix: &str, reply: Reply) -> Builder {
        self.routes.push((prefix.to_string(), reply));
        self
    }

    /// Serve TLS with the test CA's server certificate.
    pub fn tls(mut self, ca: &super::TestCa) -> Builder {
        self.tls = Some((ca.cert_pem.clone(), ca.key_pem.clone()));
        self
    }

    /// Speak h2: offered by ALPN beside HTTP/1.1 over TLS, with prior knowledge (h2c) over
    /// plain TCP.
    pub fn h2(mut self) -> Builder {
        self.h2 = true;
        self
    }

    /// On h2, end each connection gracefully (GOAWAY) once it has received `n` requests.
    pub fn goaway_after(mut self, n: usize) -> Builder {
        self.goaway_after = Some(n);
        self
    }

    pub fn start(self) -> FakeUpstream {
        let state = Arc::new(State {
            routes: self
                .routes
                .into_iter()
                .map(|(prefix, reply)| Route {
                    prefix,
                    reply,
                    hits: AtomicUsize::new(0),
                    status_override: AtomicU16::new(0),
                })
                .collect(),
            ..State::default()
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let acceptor = self
            .tls
            .map(|(cert, key)| tls_acceptor(&cert, &key, self.h2));
        let speak = Speak {
            h2: self.h2,
            goaway_after: self.goaway_after,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(serve(listener, st, acceptor, speak, stop_rx));
        });
        FakeUpstream {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

fn tls_acceptor(cert_pem: &str, key_pem: &str, h2: bool) -> tokio_rustls::TlsAcceptor {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .expect("key")
        .expect("one key");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Which versions the upstream speaks.
#[derive(Clone, Copy)]
struct Speak {
    h2: bool,
    goaway_after: Option<usize>,
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    speak: Speak,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = &mut stop => return,
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                Some(acc) => {
                    if let Ok(tls) = acc.accept(tcp).await {
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        connection(tls, state, h2, speak.goaway_after).await;
                    }
                }
                None => connection(tcp, state, speak.h2, speak.goaway_after).await,
            }
        });
    }
}

/// Serve one connection, HTTP/1.1 or h2; on h2 with `goaway_after`, a graceful GOAWAY once
/// that many requests arrived on it.
async fn connection<I>(io: I, state: Arc<State>, h2: bool, goaway_after: Option<usize>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    if !h2 {
        let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
        {
            eprintln!("fake upstream connection: {e}");
        }
        return;
    }
    match goaway_after {
        Some(n) => h2_going_away(io.into_inner(), state, n).await,
        None => {
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(io, svc);
            if let Err(e) = conn.await {
                eprintln!("fake upstream h2 connection: {e}");
            }
        }
    }
}

/// An h2 connection (the h2 crate's server, driven here) that goes away gracefully once it
/// has received `n` requests: a GOAWAY, every request it took answered, then closed.
async fn h2_going_away<I>(io: I, state: Arc<State>, n: usize)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    let mut seen = 0;
    while let Some(next) = conn.accept().await {
        let Ok((req, mut respond)) = next else {
            break;
        };
        seen += 1;
        if seen == n {
            conn.graceful_shutdown();
        }
        let state = state.clone();
        tokio::spawn(async move {
            let (parts, mut body) = req.into_parts();
            let mut bytes = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                body.flow_control().release_capacity(chunk.len()).ok();
                bytes.extend_from_slice(&chunk);
            }
            let req = Request::from_parts(parts, full(bytes));
            let (status, body) = match handle_full(state, req).await {
                Ok(x) => x,
                Err(_) => return,
            };
            let resp = http::Response::builder()
                .status(status)
                .body(())
                .expect("response");
            if let Ok(mut out) = respond.send_response(resp, false) {
                out.send_data(Bytes::from(body), true).ok();
            }
        });
    }
    // Drive the connection until every answer it took has gone out.
    std::future::poll_fn(|cx| conn.poll_closed(cx)).await.ok();
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes)).boxed()
}

/// `handle`, its answer read whole: status and body.
async fn handle_full(state: Arc<State>, req: Request<Body>) -> Result<(u16, Vec<u8>), ()> {
    let resp = handle(state, req).await.map_err(|_| ())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|_| ())?;
    Ok((status, body.to_bytes().to_vec()))
}

async fn handle<B>(state: Arc<State>, req: Request<B>) -> Result<Response<Body>, Infallible>
where
    B: hyper::body::Body<Data = Bytes>,
{
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.to_string(), |p| p.to_string());
    // An h2 request always names its scheme and authority; its target is its path.
    let target = if parts.uri.scheme().is_some() && parts.version != http::Version::HTTP_2 {
        parts.uri.to_string()
    } else {
        target
    };
    let received = Received {
        method: parts.method.to_string(),
        version: format!("{:?}", parts.version),
        target: target.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).to_string(),
                )
            })
            .collect(),
        body: body.clone(),
        at: Instant::now(),
    };
    let host = received.header("host").unwrap_or("").to_string();
    if let Ok(mut log) = state.log.lock() {
        log.push(received);
    }
    let path = parts.uri.path();
    let Some(route) = state.routes.iter().find(|r| path.starts_with(&r.prefix)) else {
        let resp = Response::builder()
            .status(200)
            .header("x-echo-method", parts.method.as_str())
            .header("x-echo-target", target)
            .header("x-echo-host", host)
            .body(full(body))
            .expect("echo response");
        return Ok(resp);
    };
    let reply = &route.reply;
    let hit = route.hits.fetch_add(1, Ordering::SeqCst);
    if !reply.latency.is_zero() {
        tokio::time::sleep(reply.latency).await;
    }
    let failing = hit < reply.fail_first;
    let status = match route.status_override.load(Ordering::SeqCst) {
        0 if failing => reply.fail_status,
        0 => reply.status,
        s => s,
    };
    let mut b = Response::builder().status(status);
    for (k, v) in &reply.headers {
        b = b.header(k, v);
    }
    if let Some(ra) = &reply.retry_after {
        if failing || reply.fail_first == 0 {
            b = b.header("retry-after", ra);
        }
    }
    let body = match (&reply.chunks, failing) {
        (Some(chunks), false) => {
            let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from(c.clone()))))
                .collect();
            if let Some(t) = trailers_of(reply) {
                frames.push(Ok(Frame::trailers(t)));
            }
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        }
        (_, true) => full(format!("failing ({status})").into_bytes()),
        (None, false) => match trailers_of(reply) {
            Some(t) => {
                let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                    Ok(Frame::data(Bytes::from(reply.body.clone()))),
                    Ok(Frame::trailers(t)),
                ];
                StreamBody::new(futures_util::stream::iter(frames)).boxed()
            }
            None => full(reply.body.clone()),
        },
    };
    Ok(b.body(body).expect("route response"))
}

fn trailers_of(reply: &Reply) -> Option<http::HeaderMap> {
    if reply.trailers.is_empty() {
        return None;
    }
    let mut map = http::HeaderMap::new();
    for (k, v) in &reply.trailers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).expect("trailer name");
        map.append(name, http::HeaderValue::from_str(v).expect("trailer value"));
    }
    Some(map)
}

/// A running fake upstream; stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn builder() -> Builder {
        Builder {
            routes: Vec::new(),
            tls: None,
            h2: false,
            goaway_after: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.state.log.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// From now on, answer the route with this `prefix` with `status` (its body unchanged).
    pub fn set_status(&self, prefix: &str, status: u16) {
        for r in self.state.routes.iter().filter(|r| r.prefix == prefix) {
            r.status_override.store(status, Ordering::SeqCst);
        }
    }

    /// Requests received whose path starts with `prefix`.
    pub fn count_path(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.target.starts_with(prefix))
            .count()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may already be gone; nothing to do then.
            stop.send(()).ok();
        }
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// A raw TCP server that echoes every byte back, one thread per connection.
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        EchoServer { addr }
    }
}
