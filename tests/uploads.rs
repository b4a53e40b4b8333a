//! Request bodies on their way up: a chunked upload reaches the upstream whole and ends once,
//! after its last byte, however the client's writes split it (a size line alone, data then a
//! CRLF with the next size line, chunk extensions, trailers, one byte at a time), through every
//! way in; an upstream connection whose request body was not sent whole is never pooled; and a
//! large streamed upload is not buffered. The upstream is strict: any byte it does not expect
//! is a violation.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::strict::StrictUpstream;
use support::*;

const HOST: &str = "api.uploads.test";

/// Gap between a client's writes, so that each arrives in a read of its own.
const GAP: Duration = Duration::from_millis(15);

/// sluice with `HOST` pinned to the strict upstream, unpaced, and a route `/r` to it.
fn sluice_for(up: &StrictUpstream) -> Sluice {
    let p = up.port();
    Sluice::start(
        "",
        &format!(
            "[defaults]\nrps = 0.0\n[[routes]]\nprefix = \"/r\"\ntarget = \"http://{HOST}\"\n\
             [resolve]\n\"{HOST}\" = [\"127.0.0.1:{p}\"]\n"
        ),
    )
}

/// The three ways in an HTTP request can take: (name, request line and headers up to the
/// framing header) for a request to `path` on the upstream.
fn ways(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "forward",
            format!("POST http://{HOST}{path} HTTP/1.1\r\nHost: {HOST}\r\n"),
        ),
        (
            "explicit",
            format!("POST {path} HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n"),
        ),
        (
            "route",
            format!("POST /r{path} HTTP/1.1\r\nHost: sluice\r\n"),
        ),
    ]
}

fn connect(sluice: &Sluice) -> TcpStream {
    let s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s
}

/// Write each piece in a write of its own, `GAP` apart.
fn write_pieces(s: &mut TcpStream, pieces: &[Vec<u8>]) {
    for p in pieces {
        s.write_all(p).expect("write");
        std::thread::sleep(GAP);
    }
}

/// Read one response with a `Content-Length` body (or none): (status, head, body).
fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            other => panic!(
                "the response head ended early ({other:?}): {:?}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    let head = String::from_utf8_lossy(&raw).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = header_of(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("response body");
    (status, head, String::from_utf8_lossy(&body).to_string())
}

/// A GET through an explicit target on a connection of its own: (status, head, body).
fn get(sluice: &Sluice, path: &str) -> (u16, String, String) {
    let mut s = connect(sluice);
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: sluice\r\nSluice-Target: http://{HOST}\r\n\r\n")
            .as_bytes(),
    )
    .expect("request");
    read_response(&mut s)
}

/// The body every upload sends: three chunks of 100 bytes.
fn payload() -> [Vec<u8>; 3] {
    [vec![b'a'; 100], vec![b'b'; 100], vec![b'c'; 100]]
}

fn whole() -> Vec<u8> {
    payload().concat()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Send a chunked upload of `payload()` split as `split` says through each way in, then a
/// plain request on the same client connection; the upstream must see each body whole, once,
/// and nothing else.
fn upload_split_every_way(split: fn() -> Vec<Vec<u8>>) {
    let up = StrictUpstream::start();
    let sluice = sluice_for(&up);
    for (way, head) in ways("/upload") {
        let mut s = connect(&sluice);
        s.write_all(format!("{head}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
            .expect("head");
        std::thread::sleep(GAP);
        write_pieces(&mut s, &split());
        let (status, _, body) = read_response(&mut s);
        assert_eq!(status, 200, "{way}: {body}");
        assert_eq!(body, "POST /upload 300", "{way}: the upstream's account");
        // The client connection is still in step: a second request on it is answered.
        let next = head.replace("POST", "GET").replace("/upload", "/next");
        s.write_all(format!("{next}\r\n").as_bytes()).expect("next");
        let (status, _, body) = read_response(&mut s);
        assert_eq!((status, body.as_str()), (200, "GET /next 0"), "{way}");
    }
    let seen = up.requests();
    assert_eq!(
        up.violations(),
        Vec::<String>::new(),
        "bytes the upstream did not expect"
    );
    let uploads: Vec<_> = seen.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(uploads.len(), 3, "one upload per way in: {seen:?}");
    for r in uploads {
        assert!(r.complete, "{r:?}");
        assert_eq!(r.body, whole(), "the body arrived whole, in order");
    }
    assert_eq!(seen.len(), 6, "nothing but the six requests: {seen:?}");
}

#[test]
fn a_size_line_alone_in_a_write_does_not_end_the_body() {
    upload_split_every_way(|| {
        let [a, b, c] = payload();
        vec![
            b"64\r\n".to_vec(),
            cat(&[&a, b"\r\n"]),
            b"64\r\n".to_vec(),
            cat(&[&b, b"\r\n"]),
            b"64\r\n".to_vec(),
            cat(&[&c, b"\r\n"]),
            b"0\r\n\r\n".to_vec(),
        ]
    });
}

#[test]
fn data_then_its_crlf_with_the_next_size_line_does_not_end_the_body() {
    upload_split_every_way(|| {
        let [a, b, c] = payload();
        vec![
            b"64\r\n".to_vec(),
            a,
            b"\r\n64\r\n".to_vec(),
            b,
            b"\r\n64\r\n".to_vec(),
            c,
            b"\r\n0\r\n".to_vec(),
            b"\r\n".to_vec(),
        ]
    });
}

#[test]
fn chunk_extensions_are_read_and_not_forwarded_as_data() {
    upload_split_every_way(|| {
        let [a, b, c] = payload();
        vec![
            cat(&[b"64;note=first\r\n", &a, b"\r\n"]),
            b"64;q=\"quoted value\"\r\n".to_vec(),
            cat(&[&b, b"\r\n64;x\r\n", &c, b"\r\n0;last=1\r\n\r\n"]),
        ]
    });
}

#[test]
fn a_body_ending_in_trailers_ends_once() {
    upload_split_every_way(|| {
        let [a, b, c] = payload();
        vec![
            cat(&[b"64\r\n", &a, b"\r\n64\r\n", &b, b"\r\n64\r\n", &c, b"\r\n"]),
            b"0\r\n".to_vec(),
            b"X-Checksum: 12345\r\n".to_vec(),
            b"X-Other: 1\r\n\r\n".to_vec(),
        ]
    });
}

#[test]
fn one_byte_writes_arrive_whole() {
    upload_split_every_way(|| {
        let [a, b, c] = payload();
        let body = cat(&[
            b"64\r\n",
            &a,
            b"\r\n64\r\n",
            &b,
            b"\r\n64\r\n",
            &c,
            b"\r\n0\r\n\r\n",
        ]);
        // One byte per write around the framing; the data in a few writes (the test's time).
        let mut out = Vec::new();
        let mut i = 0;
        while i < body.len() {
            let framing = !(body[i] as char).is_ascii_lowercase();
            let n = if framing { 1 } else { 50.min(body.len() - i) };
            out.push(body[i..i + n].to_vec());
            i += n;
        }
        out
    });
}

/// After an upload split the way that used to end it early, another client's request on the
/// pooled upstream connection gets its own answer, and the upstream sees nothing stray.
#[test]
fn a_pooled_upstream_connection_carries_nothing_of_an_earlier_upload() {
    let up = StrictUpstream::start();
    let sluice = sluice_for(&up);
    let [a, b, c] = payload();
    for round in 0..3 {
        let mut s = connect(&sluice);
        let head = &ways("/upload")[1].1;
        s.write_all(format!("{head}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
            .expect("head");
        write_pieces(
            &mut s,
            &[
                b"64\r\n".to_vec(),
                a.clone(),
                b"\r\n64\r\n".to_vec(),
                b.clone(),
                b"\r\n64\r\n".to_vec(),
                c.clone(),
                b"\r\n0\r\n\r\n".to_vec(),
            ],
        );
        let (status, _, body) = read_response(&mut s);
        assert_eq!(
            (status, body.as_str()),
            (200, "POST /upload 300"),
            "round {round}"
        );
        drop(s);
        // Another client, another connection to sluice: the upstream connection is pooled.
        let (status, _, body) = get(&sluice, "/second");
        assert_eq!(
            (status, body.as_str()),
            (200, "GET /second 0"),
            "round {round}: the second client's own answer"
        );
    }
    assert_eq!(up.violations(), Vec::<String>::new());
    assert_eq!(up.requests().len(), 6, "{:?}", up.requests());
    assert!(
        up.connections() < 6,
        "the upstream connection was reused ({} connections)",
        up.connections()
    );
}

/// A client that leaves in the middle of its body: the upstream connection that carried the
/// part sent is closed, never pooled, and the next request goes on a connection of its own.
#[test]
fn an_upload_cut_short_is_never_pooled() {
    let up = StrictUpstream::start();
    let sluice = sluice_for(&up);
    for (path, framing) in [
        ("/cut-length", "Content-Length: 1000\r\n"),
        ("/cut-chunked", "Transfer-Encoding: chunked\r\n"),
    ] {
        let mut s = connect(&sluice);
        let head = &ways(path)[1].1;
        s.write_all(format!("{head}{framing}\r\n").as_bytes())
            .expect("head");
        let part: &[u8] = if framing.starts_with("Content") {
            &[b'x'; 300]
        } else {
            b"12c\r\nxxxxxxxxxxxxxxxxxxxxxxxx"
        };
        s.write_all(part).expect("part");
        // Let the part reach the upstream, then leave.
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        assert_eventually!(
            up.requests().iter().any(|r| r.target == path),
            "the upstream saw its connection close mid-body ({path})"
        );
        let after = format!("{path}-after");
        let (status, _, body) = get(&sluice, &after);
        assert_eq!((status, body), (200, format!("GET {after} 0")), "{path}");
        let seen = up.requests();
        let cut = seen.iter().find(|r| r.target == path).expect("cut");
        let next = seen.iter().find(|r| r.target == after).expect("after");
        assert!(
            !cut.complete,
            "{path}: the cut upload was not ended: {cut:?}"
        );
        assert_ne!(
            cut.connection, next.connection,
            "{path}: the next request had a connection of its own"
        );
    }
    assert_eq!(up.violations(), Vec::<String>::new());
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// One chunked upload of `mib` MiB through `sluice` to a region on the strict upstream, its
/// size line and data in separate writes; the highest peak RSS seen while it was sent.
fn upload(sluice: &Sluice, up: &StrictUpstream, mib: usize) -> u64 {
    const MIB: usize = 1024 * 1024;
    let total = mib * MIB;
    let mut during = peak_rss_kib(sluice.pid());
    let mut s = TcpStream::connect(sluice.proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let head = format!(
        "POST /big HTTP/1.1\r\nHost: {HOST}\r\nSluice-Target: http://{HOST}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("head");
    let chunk = vec![b'x'; 256 * 1024];
    for i in 0..(total / chunk.len()) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .expect("size");
        s.write_all(&chunk).expect("chunk");
        s.write_all(b"\r\n").expect("crlf");
        if i % 40 == 0 {
            during = during.max(peak_rss_kib(sluice.pid()));
        }
    }
    s.write_all(b"0\r\n\r\n").expect("end");
    let (status, _, body) = read_response(&mut s);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("POST /big {total}"),
        "the upstream got the whole body"
    );
    assert_eq!(up.violations(), Vec::<String>::new());
    during
}

#[test]
fn a_large_chunked_upload_to_a_host_with_regions_streams() {
    let up = StrictUpstream::start();
    let port = up.port();
    let sluice = Sluice::start(
        "",
        &format!(
            "[security]\nallow_cidrs = [\"127.0.0.0/8\"]\nmax_body_bytes = 209715200\n\
             [defaults]\nrps = 0.0\n[hosts.\"{HOST}\"]\nregions = [{{ name = \"a\", address = \"127.0.0.1:{port}\" }}]\n"
        ),
    );
    // A first upload warms what the process keeps between requests (the allocator's
    // per-thread caches, pooled buffers), whose size varies from run to run by a few MiB.
    // The second is twice as large: had it been buffered, the high-water mark would rise by
    // 100 MiB, far past the bound.
    upload(&sluice, &up, 50);
    let before = peak_rss_kib(sluice.pid());
    let during = upload(&sluice, &up, 100);
    let after = peak_rss_kib(sluice.pid()).max(during);
    let grew = after.saturating_sub(before);
    eprintln!(
        "100 MiB upload after a 50 MiB one: sluice peak RSS {before} -> {after} KiB (+{grew} KiB)"
    );
    assert!(
        grew < 16 * 1024,
        "peak RSS grew by {grew} KiB for a 100 MiB body: it was buffered"
    );
    assert_eq!(up.requests().len(), 2);
}
