//! What a request head says, before any of it is believed: its end found across reads, its
//! framing checked (request smuggling: conflicting or hidden `Content-Length` and
//! `Transfer-Encoding`), its target and `Host` made one authority. Pure functions of bytes.

use crate::error::Code;
use crate::framing::Body;

pub(super) const MAX_HEADERS: usize = 128;

/// The length of the head at the start of `buf` (through its empty line), if it is there.
pub(super) fn head_length(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let rest = &buf[i + 1..];
        if rest.first() == Some(&b'\n') {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

/// Does `buf` hold the end of a head (`\n\r\n` or `\n\n`) at or after `from` (minus the
/// three bytes a terminator split across reads can reach back)? One pass over the new bytes.
pub(super) fn head_end(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(3);
    buf[start..].iter().enumerate().any(|(i, &b)| {
        b == b'\n' && {
            let rest = &buf[start + i + 1..];
            rest.first() == Some(&b'\n') || rest.starts_with(b"\r\n")
        }
    })
}

/// What the head says to do.
pub enum HeadAction {
    Connect,
    /// Serve as HTTP; with a head rewritten to carry the absolute target's authority as its
    /// one `Host` (RFC 9112 3.2.2), when the client's `Host` said otherwise; and how the
    /// request's body ends.
    Http(Option<Vec<u8>>, Body),
}

/// The refusal of a head that does not parse (`None`: it ended early).
pub(super) fn head_error(e: Option<httparse::Error>) -> (Code, String) {
    match e {
        None => (Code::BadRequest, "malformed request head".into()),
        Some(httparse::Error::TooManyHeaders) => (
            Code::HeadTooLarge,
            format!("more than {MAX_HEADERS} header lines"),
        ),
        Some(e) => (Code::BadRequest, format!("malformed request head: {e}")),
    }
}

/// Check a complete head: well formed, target length, and unambiguous body framing
/// (no `Content-Length` with `Transfer-Encoding`, no repeated or malformed
/// `Content-Length`, `chunked` last in `Transfer-Encoding`).
pub fn inspect(buf: &[u8], max_head: usize, max_uri: usize) -> Result<HeadAction, (Code, String)> {
    // Uninitialised slots: httparse fills only as many as the head has.
    let mut headers = [std::mem::MaybeUninit::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len;
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) if n > max_head => {
            return Err((
                Code::HeadTooLarge,
                format!("request head over {max_head} bytes"),
            ))
        }
        Ok(httparse::Status::Complete(n)) => head_len = n,
        Ok(httparse::Status::Partial) => return Err(head_error(None)),
        Err(e) => return Err(head_error(Some(e))),
    }
    if req.path.map_or(0, str::len) > max_uri {
        return Err((
            Code::UriTooLong,
            format!("request target over {max_uri} bytes"),
        ));
    }
    if req.method == Some("CONNECT") {
        return Ok(HeadAction::Connect);
    }
    let mut lengths = 0;
    let mut length = 0u64;
    let mut upgrade = false;
    let mut te: Option<&[u8]> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let v = h.value;
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err((Code::BadRequest, "invalid Content-Length".into()));
            }
            match std::str::from_utf8(v)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
            {
                Some(n) => length = n,
                None => return Err((Code::BadRequest, "Content-Length too large".into())),
            }
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            // A header named in `Connection` is dropped at this hop; a framing header cannot
            // be (the body would go up without the framing it came with).
            let named = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if let Some(f) = named
                .split(',')
                .map(str::trim)
                .find(|t| *t == "content-length" || *t == "transfer-encoding")
            {
                return Err((
                    Code::BadRequest,
                    format!("Connection names {f}, a framing header, as hop-by-hop"),
                ));
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err((Code::BadRequest, "repeated Transfer-Encoding".into()));
            }
            te = Some(h.value);
        }
    }
    if lengths > 1 {
        return Err((Code::BadRequest, "repeated Content-Length".into()));
    }
    if let Some(te) = te {
        if lengths > 0 {
            return Err((
                Code::BadRequest,
                "both Content-Length and Transfer-Encoding".into(),
            ));
        }
        let text = String::from_utf8_lossy(te).to_ascii_lowercase();
        let last = text.rsplit(',').next().map(str::trim);
        if last != Some("chunked") {
            return Err((
                Code::BadRequest,
                "Transfer-Encoding must end with chunked".into(),
            ));
        }
    }
    if te.is_some() && req.version == Some(0) {
        return Err((
            Code::BadRequest,
            "Transfer-Encoding on an HTTP/1.0 request".into(),
        ));
    }
    let rewritten = canonical_host(&req, buf, head_len)?;
    // An upgrade turns the connection into a relay: nothing after it is a next request.
    let body = match (upgrade, te.is_some(), lengths > 0) {
        (true, _, _) => Body::Open,
        (_, true, _) => Body::Chunked,
        (_, _, true) => Body::Length(length),
        _ => Body::None,
    };
    Ok(HeadAction::Http(rewritten, body))
}

/// The authority of an absolute-form `http(s)://` target, if the target is one.
pub(super) fn absolute_authority(target: &str) -> Option<&str> {
    let rest = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .find_map(|scheme| {
            (target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme))
                .then(|| &target[scheme.len()..])
        })?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// For an absolute-form target, a proxy takes the target's authority as the request's `Host`
/// (RFC 9112 3.2.2): when the head's `Host` fields are not exactly that one value, the head
/// is rebuilt with it (what followed the head is kept). Userinfo in the authority is refused.
fn canonical_host(
    req: &httparse::Request<'_, '_>,
    buf: &[u8],
    head_len: usize,
) -> Result<Option<Vec<u8>>, (Code, String)> {
    let Some(authority) = req.path.and_then(absolute_authority) else {
        return Ok(None);
    };
    if authority.contains('@') {
        return Err((
            Code::BadTarget,
            "userinfo in the request target is not allowed".into(),
        ));
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let exact =
        matches!((hosts.next(), hosts.next()), (Some(h), None) if h.value == authority.as_bytes());
    if exact {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(buf.len() + authority.len());
    let version = if req.version == Some(0) { "1.0" } else { "1.1" };
    let line = format!(
        "{} {} HTTP/{version}\r\n",
        req.method.unwrap_or("GET"),
        req.path.unwrap_or("/")
    );
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"Host: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in req
        .headers
        .iter()
        .filter(|h| !h.name.eq_ignore_ascii_case("host"))
    {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[head_len..]);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(head: &str) -> Option<Code> {
        inspect(head.as_bytes(), 65536, 8192).err().map(|e| e.0)
    }

    #[test]
    fn framing_attacks_are_refused() {
        let ok = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(code_of(ok), None);
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(code_of(bad), Some(Code::BadRequest), "{bad:?}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert_eq!(code_of(&long), Some(Code::UriTooLong));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70_000));
        assert_eq!(code_of(&big), Some(Code::HeadTooLarge));
        assert!(matches!(
            inspect(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n", 65536, 8192),
            Ok(HeadAction::Connect)
        ));
    }

    #[test]
    fn finds_the_end_of_a_head_across_reads() {
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert!(head_end(buf, 0));
        assert!(head_end(buf, 24));
        assert!(!head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        assert!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0));
    }
}
