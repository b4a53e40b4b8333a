//! A strict raw HTTP/1.1 upstream: it parses every byte it is sent as requests (heads, bodies
//! by `Content-Length` or chunked framing with extensions and trailers), keeps connections
//! alive, and answers each request with what it received. Any byte it does not expect (a
//! stray chunk after a body's end, a bad size line, a missing CRLF) is a violation: recorded,
//! answered `400`, and the connection closed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Body bytes kept per request (the length is always counted in full).
const KEEP: usize = 64 * 1024;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// Which connection it came on (0, 1, ... in accept order).
    pub connection: usize,
    /// Body bytes received.
    pub len: usize,
    /// The first `KEEP` bytes of the body.
    pub body: Vec<u8>,
    /// The request's body ended as its framing says (false: the connection closed first).
    pub complete: bool,
}

#[derive(Default)]
struct Log {
    requests: Vec<Seen>,
    violations: Vec<String>,
    connections: usize,
}

/// A running strict upstream; stops accepting when dropped.
pub struct StrictUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
}

impl StrictUpstream {
    pub fn start() -> StrictUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind strict upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let id = {
                            let mut g = l.lock().expect("log");
                            g.connections += 1;
                            g.connections - 1
                        };
                        let l = l.clone();
                        std::thread::spawn(move || serve(tcp, id, &l));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        StrictUpstream { addr, log, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.log.lock().expect("log").requests.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.log.lock().expect("log").violations.clone()
    }

    pub fn connections(&self) -> usize {
        self.log.lock().expect("log").connections
    }
}

impl Drop for StrictUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Why a connection ended without a whole request.
enum End {
    /// Closed between requests: fine.
    Clean,
    /// Closed in the middle of a body: the request is recorded as incomplete.
    Cut,
    /// A byte the framing does not allow.
    Violation(String),
}

fn serve(tcp: TcpStream, connection: usize, log: &Mutex<Log>) {
    tcp.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let Ok(mut out) = tcp.try_clone() else { return };
    let mut r = BufReader::new(tcp);
    loop {
        let mut seen = Seen {
            method: String::new(),
            target: String::new(),
            connection,
            len: 0,
            body: Vec::new(),
            complete: false,
        };
        let end = read_request(&mut r, &mut seen);
        let mut g = log.lock().expect("log");
        match end {
            Ok(()) => {
                seen.complete = true;
                let text = format!("{} {} {}", seen.method, seen.target, seen.len);
                g.requests.push(seen);
                drop(g);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                );
                if out.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
            Err(End::Clean) => return,
            Err(End::Cut) => {
                g.requests.push(seen);
                return;
            }
            Err(End::Violation(why)) => {
                g.violations.push(format!("connection {connection}: {why}"));
                drop(g);
                out.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .ok();
                return;
            }
        }
    }
}

/// One line ending in CRLF (without it), at most `max` bytes. `Ok(None)`: the stream ended
/// before any byte.
fn line(r: &mut BufReader<TcpStream>, max: usize) -> Result<Option<Vec<u8>>, End> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(max as u64 + 2)
        .read_until(b'\n', &mut buf)
        .map_err(|_| End::Cut)?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\r\n") {
        return Err(if buf.ends_with(b"\n") || buf.len() > max {
            End::Violation(format!("a line not ended by CRLF: {:?}", esc(&buf)))
        } else {
            End::Cut
        });
    }
    buf.truncate(buf.len() - 2);
    Ok(Some(buf))
}

fn esc(b: &[u8]) -> String {
    b.iter()
        .take(80)
        .flat_map(|c| std::ascii::escape_default(*c))
        .map(char::from)
        .collect()
}

fn read_request(r: &mut BufReader<TcpStream>, seen: &mut Seen) -> Result<(), End> {
    let Some(request_line) = line(r, 8192)? else {
        return Err(End::Clean);
    };
    let text = String::from_utf8_lossy(&request_line).to_string();
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some("HTTP/1.1"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(End::Violation(format!(
            "not a request line: {:?}",
            esc(&request_line)
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(End::Violation(format!("not a method: {method:?}")));
    }
    seen.method = method.to_string();
    seen.target = target.to_string();
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let Some(h) = line(r, 8192)? else {
            return Err(End::Cut);
        };
        if h.is_empty() {
            break;
        }
        let h = String::from_utf8_lossy(&h).to_string();
        let Some((name, value)) = h.split_once(':') else {
            return Err(End::Violation(format!("not a header: {h:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .map_err(|_| End::Violation(format!("Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(End::Violation(format!("Transfer-Encoding {value:?}")));
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err(End::Violation(
            "both Content-Length and chunked".to_string(),
        ));
    }
    if chunked {
        loop {
            let Some(size_line) = line(r, 4096)? else {
                return Err(End::Cut);
            };
            let text = String::from_utf8_lossy(&size_line).to_string();
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| {
                End::Violation(format!("not a chunk size line: {:?}", esc(&size_line)))
            })?;
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    let Some(t) = line(r, 8192)? else {
                        return Err(End::Cut);
                    };
                    if t.is_empty() {
                        return Ok(());
                    }
                }
            }
            take(r, size, seen)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).map_err(|_| End::Cut)?;
            if &crlf != b"\r\n" {
                return Err(End::Violation(format!(
                    "a chunk not followed by CRLF: {:?}",
                    esc(&crlf)
                )));
            }
        }
    }
    take(r, length.unwrap_or(0), seen)
}

/// Read `n` body bytes into `seen`.
fn take(r: &mut BufReader<TcpStream>, mut n: usize, seen: &mut Seen) -> Result<(), End> {
    let mut buf = [0u8; 16 * 1024];
    while n > 0 {
        let want = n.min(buf.len());
        let got = r.read(&mut buf[..want]).map_err(|_| End::Cut)?;
        if got == 0 {
            return Err(End::Cut);
        }
        seen.len += got;
        let room = KEEP.saturating_sub(seen.body.len()).min(got);
        seen.body.extend_from_slice(&buf[..room]);
        n -= got;
    }
    Ok(())
}
