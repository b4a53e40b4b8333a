//! CONNECT tunnels, terminated by sluice: read the head from the raw stream, resolve and
//! connect, answer `200` (and flush), then carry bytes both ways until both sides close or the
//! tunnel sits idle too long. Failures are answered with a status and `Sluice-Error`.

use crate::access;
use crate::admission::Ask;
use crate::error::Code;
use crate::gate::{self, Refusal};
use crate::state::Shared;
use crate::target::{parse_authority, WayIn};
use pingora_core::protocols::Stream;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEADERS: usize = 64;
const COPY_BUF: usize = 16 * 1024;

/// The parsed CONNECT head, and whatever the client sent right after it.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectHead {
    pub host: String,
    pub port: u16,
    /// The `Proxy-Authorization` value, if sent.
    pub authorization: Option<Vec<u8>>,
    /// The `Via` values, to refuse a CONNECT that already came through this sluice.
    pub via: Vec<Vec<u8>>,
    pub leftover: Vec<u8>,
}

/// Parse a CONNECT head from `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_head(buf: &[u8]) -> Result<Option<ConnectHead>, (Code, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((Code::HeadTooLarge, "too many header lines".into()))
        }
        Err(e) => return Err((Code::BadRequest, format!("malformed CONNECT head: {e}"))),
    };
    if req.method != Some("CONNECT") {
        return Err((Code::BadRequest, "expected a CONNECT request".into()));
    }
    let target = req.path.unwrap_or("");
    let (host, port) = parse_authority(target, None)
        .map_err(|e| (Code::BadTarget, format!("CONNECT target {target:?}: {e}")))?;
    let authorization = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|h| h.value.to_vec());
    let via = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("via"))
        .map(|h| h.value.to_vec())
        .collect();
    Ok(Some(ConnectHead {
        host,
        port,
        authorization,
        via,
        leftover: buf[len..].to_vec(),
    }))
}

/// Connect to the first address that answers.
async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, (Code, String)> {
    let mut last = (Code::ConnectFailed, "no address".to_string());
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => last = (Code::ConnectTimeout, format!("connect to {addr} timed out")),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = (Code::ConnectRefused, format!("connect to {addr} refused"))
            }
            Ok(Err(e)) => last = (Code::ConnectFailed, format!("connect to {addr}: {e}")),
            Ok(Ok(s)) => {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!(error = %e, "set_nodelay failed");
                }
                return Ok(s);
            }
        }
    }
    Err(last)
}

/// A tunnel whose inside sluice serves as HTTP (TLS interception, or plain HTTP in a tunnel
/// to port 80): the front reads each request from `stream` and hands it to the pipeline.
pub struct Inside {
    pub stream: Stream,
    pub info: crate::intercept::TunnelInfo,
    /// The CONNECT's `Proxy-Authorization`, which authenticates every request inside.
    pub authorization: Option<Vec<u8>>,
}

/// What a CONNECT is, once its head is checked.
enum Kind {
    /// Bytes carried both ways, as they are.
    Plain,
    /// A listed host: TLS accepted by sluice (or plain HTTP served), per request.
    Intercept,
    /// Port 80, not otherwise allowed: plain HTTP inside, per request, or closed.
    HttpOnly,
}

/// Serve one CONNECT on `stream`; `head` holds the bytes already read (the whole CONNECT
/// head, and anything the client sent right after it). A plain tunnel or a refusal is served
/// to the end here; a tunnel whose inside is HTTP comes back as `Inside`.
pub async fn serve(
    shared: &Arc<Shared>,
    mut stream: Stream,
    head: bytes::BytesMut,
) -> Option<Inside> {
    let started = Instant::now();
    let generation = shared.generation();
    let server = &generation.config.server;
    let peer = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
    let mut host_label = crate::generation::OTHER_HOST.to_string();
    let result = async {
        let head = match parse_head(&head) {
            Ok(Some(h)) => h,
            Ok(None) => return Err(Refusal::new(Code::BadRequest, "incomplete CONNECT head")),
            Err((c, m)) => return Err(Refusal::new(c, m)),
        };
        gate::not_a_loop(head.via.iter().map(Vec::as_slice), shared, "CONNECT")?;
        let mut client_cell = None;
        let mut client = None;
        if generation.clients.enabled() {
            let c = gate::authenticate(&generation, true, head.authorization.as_deref(), None)?;
            client = Some(c);
            if let Some(l) = &c.limits {
                let cell = shared.admission.client_cell(&c.name, l.rps, l.burst);
                let who = format!("client {}", c.name);
                client_cell = Some((
                    crate::admission::Host::Cell(cell),
                    l.max_queue_wait.get(),
                    who,
                ));
            }
        }
        gate::check_host(&generation, &head.host)?;
        let port = generation.egress.check_connect_port(head.port);
        let kind = if crate::intercept::wanted(&generation.config.intercept, &head.host)
            && (port.is_ok() || head.port == 80)
        {
            Kind::Intercept
        } else if head.port == 80 && port.is_err() {
            Kind::HttpOnly
        } else {
            port.map_err(|(c, m)| Refusal::new(c, m))?;
            Kind::Plain
        };
        let addrs = gate::addresses(shared, &generation, &head.host, head.port).await?;
        if !matches!(kind, Kind::Plain) {
            // Each request inside is admitted (client pace included) and sent by the
            // pipeline; a destination the egress policy refuses was refused just above.
            return Ok(Err((head, kind)));
        }
        let client_permit = match client_cell {
            Some((cell, wait, who)) => {
                Some(gate::admit(shared, || who, &cell, &Ask::plain(wait)).await?)
            }
            None => None,
        };
        let key = crate::target::host_port(&head.host, head.port);
        let cell = shared.admission.host(key.clone(), &head.host, &generation);
        host_label = generation.host_label(cell.profile()).to_string();
        let limits = generation.limits(cell.profile());
        let who = gate::Who::of(client, peer);
        let caller = gate::caller(&generation, limits, &who)?;
        let ask = Ask::of(&caller, limits.max_queue_wait.get());
        let permit = gate::admit(shared, || key.clone(), &cell, &ask).await?;
        let upstream = connect(&addrs, server.connect_timeout.get())
            .await
            .map_err(|(c, m)| Refusal::new(c, m))?;
        Ok::<_, Refusal>(Ok((head, upstream, (permit, client_permit))))
    }
    .await;
    let (head, mut upstream, (permit, client_permit)) = match result {
        Ok(Ok(open)) => open,
        Ok(Err((head, kind))) => return inside(shared, stream, head, kind, started).await,
        Err(refusal) => {
            if refusal.code.status() > 0 {
                if let Err(e) = write_and_flush(&mut stream, &refusal.raw()).await {
                    tracing::debug!(error = %e, "could not send CONNECT refusal");
                }
            }
            access::Line {
                way: WayIn::Connect,
                status: refusal.code.status(),
                elapsed: started.elapsed(),
                error: Some(refusal.code),
                reason: Some(&refusal.message),
                ..Default::default()
            }
            .finish(shared, &generation, &host_label);
            return None;
        }
    };
    if let Err(e) =
        write_and_flush(&mut stream, b"HTTP/1.1 200 Connection Established\r\n\r\n").await
    {
        tracing::debug!(error = %e, "client left before the tunnel opened");
        shared.metrics.record(
            WayIn::Connect,
            &host_label,
            Some(Code::ClientClosed),
            started.elapsed().as_secs_f64(),
        );
        return None;
    }
    let queued = permit.queued;
    let metrics = &shared.metrics;
    let idle = server.tunnel_idle_timeout.get();
    // Whatever the port, plain HTTP inside a tunnel is served request by request (paced,
    // learned from, retried); TLS and anything else stay opaque.
    let prefix = match sniff(&mut stream, &upstream, head.leftover.clone(), idle).await {
        Sniffed::Http(prefix) => {
            // Nothing was sent on the connection opened for it: it closes, and each request
            // inside takes its own admission.
            drop(upstream);
            drop(permit);
            drop(client_permit);
            return http_inside(shared, stream, &head, prefix, started);
        }
        Sniffed::Opaque(prefix) => Some(prefix),
        // Nothing either way within the idle bound: closed as an idle relay would be.
        Sniffed::Idle => None,
    };
    metrics.tunnels_opened.inc();
    metrics.tunnels_active.inc();
    let mut up_bytes = 0u64;
    let (up, down) = match prefix {
        Some(prefix) => {
            if !prefix.is_empty() {
                if let Err(e) = upstream.write_all(&prefix).await {
                    tracing::debug!(error = %e, "upstream closed at once");
                }
                up_bytes = prefix.len() as u64;
            }
            relay(&mut stream, &mut upstream, idle).await
        }
        None => (0, 0),
    };
    metrics.tunnels_active.dec();
    metrics
        .tunnel_bytes
        .with_label_values(&["up"])
        .inc_by(up + up_bytes);
    metrics
        .tunnel_bytes
        .with_label_values(&["down"])
        .inc_by(down);
    drop(permit);
    drop(client_permit);
    access::Line {
        way: WayIn::Connect,
        host: Some(&head.host),
        port: Some(head.port),
        status: 200,
        queued,
        elapsed: started.elapsed(),
        bytes_in: up + up_bytes,
        bytes_out: down,
        ..Default::default()
    }
    .finish(shared, &generation, &host_label);
    None
}

/// Open the inside of a tunnel that sluice serves as HTTP: answer `200`, then look at the
/// client's first bytes: a TLS ClientHello (for a listed host) is accepted with a leaf
/// certificate; an HTTP request is served as it is; anything else closes the tunnel.
async fn inside(
    shared: &Arc<Shared>,
    mut stream: Stream,
    head: ConnectHead,
    kind: Kind,
    started: Instant,
) -> Option<Inside> {
    use crate::intercept::{ClientSide, Rewind, TunnelInfo, Tunneled};
    let generation = shared.generation();
    let server = &generation.config.server;
    let metrics = &shared.metrics;
    let result = |r: &str| metrics.intercept_tunnels.with_label_values(&[r]).inc();
    let log = |status: u16, kind: &str, error: &str, reason: &str| {
        access::Line {
            way: WayIn::Connect,
            host: Some(&head.host),
            port: Some(head.port),
            status,
            inside: Some(kind),
            elapsed: started.elapsed(),
            error_name: (error != "-").then_some(error),
            reason: (reason != "-").then_some(reason),
            ..Default::default()
        }
        .write(&generation)
    };
    if let Err(e) =
        write_and_flush(&mut stream, b"HTTP/1.1 200 Connection Established\r\n\r\n").await
    {
        tracing::debug!(error = %e, "client left before the tunnel opened");
        return None;
    }
    // The first byte tells TLS (a handshake record, 0x16) from HTTP (a method's letter).
    let mut prefix = head.leftover.clone();
    if prefix.is_empty() {
        let mut first = [0u8; 1];
        let read = tokio::time::timeout(server.header_read_timeout.get(), stream.read(&mut first));
        match read.await {
            Ok(Ok(1)) => prefix.push(first[0]),
            _ => {
                log(200, "none", "client_closed", "nothing sent in the tunnel");
                return None;
            }
        }
    }
    let authority = crate::target::host_port(&head.host, head.port);
    let client = ClientSide::of(&stream);
    let is_tls = prefix[0] == 0x16;
    let is_http = prefix[0].is_ascii_uppercase();
    let wrapped: Stream = if is_tls && matches!(kind, Kind::Intercept) {
        let Some(interceptor) = shared.interceptor.as_ref() else {
            result("no_ca");
            log(
                200,
                "tls",
                "internal",
                "interception has no CA (intercept.ca_cert)",
            );
            return None;
        };
        let io = Rewind::new(bytes::Bytes::from(prefix), stream);
        let tls = interceptor
            .accept(io, &head.host, server.header_read_timeout.get(), metrics)
            .await;
        match tls {
            Ok(tls) => {
                let info = TunnelInfo {
                    scheme: "https",
                    authority: authority.clone(),
                };
                match Tunneled::new(tls, client, info) {
                    Ok(t) => {
                        result("tls");
                        Box::new(t)
                    }
                    Err(e) => {
                        log(200, "tls", "internal", &e.to_string());
                        return None;
                    }
                }
            }
            Err(refused) => {
                result(refused.result());
                log(200, "tls", refused.result(), &refused.to_string());
                return None;
            }
        }
    } else if is_http {
        return http_inside(shared, stream, &head, prefix, started);
    } else {
        result("not_http");
        let why = match kind {
            Kind::HttpOnly => "a tunnel to port 80 carries HTTP only (security.connect_ports)",
            _ => "neither TLS nor HTTP in an intercepted tunnel",
        };
        log(200, "other", "forbidden_port", why);
        return None;
    };
    log(200, "tls", "-", "-");
    Some(Inside {
        stream: wrapped,
        info: TunnelInfo {
            scheme: "https",
            authority,
        },
        authorization: head.authorization.clone(),
    })
}

/// What a tunnel's first bytes say it carries.
enum Sniffed {
    /// An HTTP/1 request in origin form: served request by request (the bytes read so far).
    Http(Vec<u8>),
    /// Anything else (TLS, a protocol whose server speaks first, another protocol that looks
    /// like HTTP, a CONNECT or an absolute target for a proxy further on, a client that left):
    /// carried as it is, after the bytes read so far.
    Opaque(Vec<u8>),
    /// Nothing from either side within the idle bound: the tunnel is closed.
    Idle,
}

/// Most bytes read to find a request line (past it, the tunnel stays opaque).
const MAX_SNIFF: usize = 8 * 1024;

/// Does `prefix` start an HTTP/1 request that sluice serves (`None`: too few bytes to tell)?
/// Only a whole request line counts: an upper-case method other than `CONNECT` (a proxy
/// further on) and `PRI` (HTTP/2's preface), an origin-form target (`/...`, or `*`), and
/// `HTTP/1.0` or `HTTP/1.1`. RTSP, SIP and other protocols whose lines look like HTTP's, and
/// absolute targets (a proxy further on), stay opaque.
fn request_line(prefix: &[u8]) -> Option<bool> {
    let method_end = prefix.iter().position(|b| !b.is_ascii_uppercase());
    match method_end {
        None if prefix.len() < 16 => return None,
        None => return Some(false),
        Some(0) => return Some(false),
        Some(i) if prefix[i] != b' ' => return Some(false),
        Some(_) => {}
    }
    let Some(end) = prefix.iter().position(|&b| b == b'\n') else {
        return if prefix.len() < MAX_SNIFF {
            None
        } else {
            Some(false)
        };
    };
    let line = prefix[..end].strip_suffix(b"\r").unwrap_or(&prefix[..end]);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(false);
    };
    Some(
        method != b"CONNECT"
            && method != b"PRI"
            && (target.starts_with(b"/") || target == b"*")
            && (version == b"HTTP/1.1" || version == b"HTTP/1.0"),
    )
}

/// Read the client's first bytes until they tell an HTTP request from anything else, while
/// the upstream has said nothing (a server that speaks first makes the tunnel opaque).
async fn sniff(
    client: &mut Stream,
    upstream: &TcpStream,
    mut prefix: Vec<u8>,
    idle: Duration,
) -> Sniffed {
    let mut until = tokio::time::Instant::now() + idle;
    loop {
        match request_line(&prefix) {
            Some(true) => return Sniffed::Http(prefix),
            Some(false) => return Sniffed::Opaque(prefix),
            None => {}
        }
        let mut buf = [0u8; 1024];
        tokio::select! {
            read = client.read(&mut buf) => match read {
                Ok(n) if n > 0 => {
                    prefix.extend_from_slice(&buf[..n]);
                    until = tokio::time::Instant::now() + idle;
                }
                _ => return Sniffed::Opaque(prefix),
            },
            _ = upstream.readable() => return Sniffed::Opaque(prefix),
            _ = tokio::time::sleep_until(until) => return Sniffed::Idle,
        }
    }
}

/// A tunnel whose client speaks plain HTTP: its requests, from `prefix` on, are served by the
/// front like forward-proxy requests to `http://host:port`.
fn http_inside(
    shared: &Arc<Shared>,
    stream: Stream,
    head: &ConnectHead,
    prefix: Vec<u8>,
    started: Instant,
) -> Option<Inside> {
    use crate::intercept::{ClientSide, Rewind, TunnelInfo, Tunneled};
    let authority = crate::target::host_port(&head.host, head.port);
    let info = TunnelInfo {
        scheme: "http",
        authority: authority.clone(),
    };
    let client = ClientSide::of(&stream);
    let io = Rewind::new(bytes::Bytes::from(prefix), stream);
    let generation = shared.generation();
    let log = |error: &str, reason: &str| {
        access::Line {
            way: WayIn::Connect,
            host: Some(&head.host),
            port: Some(head.port),
            status: 200,
            inside: Some("http"),
            elapsed: started.elapsed(),
            error_name: (error != "-").then_some(error),
            reason: (reason != "-").then_some(reason),
            ..Default::default()
        }
        .write(&generation)
    };
    match Tunneled::new(io, client, info) {
        Ok(t) => {
            shared
                .metrics
                .intercept_tunnels
                .with_label_values(&["http"])
                .inc();
            log("-", "-");
            Some(Inside {
                stream: Box::new(t),
                info: TunnelInfo {
                    scheme: "http",
                    authority,
                },
                authorization: head.authorization.clone(),
            })
        }
        Err(e) => {
            log("internal", &e.to_string());
            None
        }
    }
}

async fn write_and_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Copy both ways until both directions end or nothing moves for `idle`.
/// Returns (bytes client->upstream, bytes upstream->client).
pub async fn relay<A, B>(a: &mut A, b: &mut B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let origin = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let copy = async {
        tokio::join!(
            copy_one_way(&mut ar, &mut bw, &up, &last, origin),
            copy_one_way(&mut br, &mut aw, &down, &last, origin),
        )
    };
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = origin + since + idle;
            tokio::time::sleep_until(deadline).await;
            if Duration::from_millis(last.load(Ordering::Relaxed)) == since {
                return;
            }
        }
    };
    tokio::select! {
        _ = copy => {}
        _ = watchdog => tracing::debug!("tunnel idle, closing"),
    }
    (up.into_inner(), down.into_inner())
}

async fn copy_one_way<R, W>(
    r: &mut R,
    w: &mut W,
    counter: &AtomicU64,
    last: &AtomicU64,
    origin: tokio::time::Instant,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        last.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Pass the half-close on; errors mean the other side is already gone.
    if let Err(e) = w.shutdown().await {
        tracing::trace!(error = %e, "shutdown after copy");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_request_line_from_other_first_bytes() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x?y=1 HTTP/1.0\r\nHost: a\r\n",
            b"OPTIONS * HTTP/1.1\n",
        ] {
            assert_eq!(request_line(http), Some(true), "{http:?}");
        }
        for other in [
            &b"\x16\x03\x01"[..],
            b"SSH-2.0-OpenSSH",
            b"PRI * HTTP/2.0\r\n",
            b"get / HTTP/1.1\r\n",
            b" GET",
            b"ABCDEFGHIJKLMNOPQ",
            b"CONNECT a.test:443 HTTP/1.1\r\n",
            b"GET http://other.test/ HTTP/1.1\r\n",
            b"OPTIONS rtsp://cam/ RTSP/1.0\r\n",
            b"INVITE sip:bob@b.test SIP/2.0\r\n",
            b"CAP LS 302\r\n",
            b"AUTH secret\r\n",
        ] {
            assert_eq!(request_line(other), Some(false), "{other:?}");
        }
        for undecided in [&b""[..], b"G", b"DELET", b"GET /a-long-path"] {
            assert_eq!(request_line(undecided), None, "{undecided:?}");
        }
        let long = [&b"GET /"[..], &[b'a'; MAX_SNIFF]].concat();
        assert_eq!(
            request_line(&long),
            Some(false),
            "no line end within the bound"
        );
    }

    #[test]
    fn parses_heads_and_keeps_early_bytes() {
        let head =
            parse_head(b"CONNECT Api.Test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n\x16\x03\x01")
                .expect("valid")
                .expect("complete");
        assert_eq!(head.host, "api.test");
        assert_eq!(head.port, 443);
        assert_eq!(head.leftover, b"\x16\x03\x01");
        assert_eq!(
            parse_head(b"CONNECT a.test:443 HTTP/1.1\r\n").expect("partial"),
            None
        );
    }

    #[test]
    fn refuses_bad_heads() {
        assert_eq!(
            parse_head(b"CONNECT a.test HTTP/1.1\r\n\r\n").map_err(|e| e.0),
            Err(Code::BadTarget)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\n\r\n").map_err(|e| e.0),
            Err(Code::BadRequest)
        );
        assert_eq!(
            parse_head(b"CONNECT \x01 HTTP/1.1\r\n\r\n").map_err(|e| e.0),
            Err(Code::BadRequest)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn relay_closes_idle_tunnels() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let relay =
            tokio::spawn(async move { relay(&mut near, &mut far, Duration::from_secs(30)).await });
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong!").await.expect("write");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.expect("read");
        // Nothing moves: the paused clock jumps ahead and the watchdog closes the tunnel.
        let (up, down) = relay.await.expect("relay ends by itself");
        assert_eq!((up, down), (4, 5));
    }

    #[tokio::test]
    async fn relay_ends_when_both_sides_close() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let relay =
            tokio::spawn(
                async move { relay(&mut near, &mut far, Duration::from_secs(3600)).await },
            );
        client.write_all(b"abc").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"abc");
        server.write_all(b"xy").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"xy");
        assert_eq!(relay.await.expect("ends"), (3, 2));
    }
}
