//! Header hygiene between client and upstream: hop-by-hop headers, proxy credentials and
//! sluice's own control headers never cross; `Via` records the hop.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};

/// Is this header meaningful only for one connection (RFC 9110 7.6.1), or a proxy
/// credential? `Transfer-Encoding` is left to Pingora, which owns body framing on each side.
fn hop_by_hop(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, UPGRADE};
    // Known names compare as tags; the two unregistered ones by their text.
    [
        CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TE,
        TRAILER,
        UPGRADE,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Names to drop from `headers`: the fixed hop-by-hop set, those listed in `Connection`, and,
/// when `control` is set, every `sluice-*` header.
fn names_to_drop(headers: &HeaderMap, control: bool) -> Vec<HeaderName> {
    let mut drop: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(http::header::CONNECTION) {
        if let Ok(text) = value.to_str() {
            // Only a name the head carries is dropped (`close` and `keep-alive` usually name
            // none).
            for token in text.split(',').map(str::trim) {
                if headers.contains_key(token) {
                    if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                        drop.push(name);
                    }
                }
            }
        }
    }
    for name in headers.keys() {
        if hop_by_hop(name) || (control && name.as_str().starts_with("sluice-")) {
            drop.push(name.clone());
        }
    }
    drop
}

/// Does the request carry any `Sluice-*` field? Most carry none: one pass over the names
/// spares a lookup per control header.
pub fn names_sluice(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| {
        k.as_str()
            .as_bytes()
            .get(..7)
            .is_some_and(|p| p == b"sluice-")
    })
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`, named in `Connection`), as
/// a WebSocket client does.
pub fn upgrade_of(req: &RequestHeader) -> Option<http::HeaderValue> {
    if req.version != http::Version::HTTP_11 {
        return None;
    }
    let listed = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    listed
        .then(|| req.headers.get(http::header::UPGRADE).cloned())
        .flatten()
}

/// Is this a gRPC call (`content-type: application/grpc`, `application/grpc+proto`, ...)?
pub fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..16))
        .is_some_and(|v| v.eq_ignore_ascii_case("application/grpc"))
}

/// Does the client accept trailers (`TE: trailers`)?
pub fn accepts_trailers(req: &RequestHeader) -> bool {
    req.headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Clean a request before it goes upstream; `via` is this process's `Via` value.
pub fn clean_request(req: &mut RequestHeader, via: &HeaderValue) {
    for name in names_to_drop(&req.headers, true) {
        req.remove_header(&name);
    }
    if let Err(e) = req.append_header(http::header::VIA, via.clone()) {
        tracing::debug!(error = %e, "could not append Via");
    }
}

/// Clean an upstream's trailers before they go to the client: no hop-by-hop or `Sluice-*`
/// fields (an upstream could forge `Sluice-Error` there too).
pub fn clean_trailers(trailers: &mut HeaderMap) {
    for name in names_to_drop(trailers, true) {
        trailers.remove(&name);
    }
}

/// Clean a response before it goes to the client. `Sluice-*` headers from upstream are
/// dropped too: only this sluice speaks with them (an upstream could forge `Sluice-Error`).
pub fn clean_response(resp: &mut ResponseHeader, via: &HeaderValue) {
    for name in names_to_drop(&resp.headers, true) {
        resp.remove_header(&name);
    }
    if let Err(e) = resp.append_header(http::header::VIA, via.clone()) {
        tracing::debug!(error = %e, "could not append Via");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_credentials_and_control_headers() {
        let mut req = RequestHeader::build("GET", b"/", None).expect("req");
        for (k, v) in [
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Connection", "keep-alive"),
            ("Sluice-Target", "https://a.test"),
            ("Sluice-Mode", "race"),
            ("TE", "trailers"),
            ("Authorization", "Bearer keep-me"),
            ("X-Other", "keep"),
        ] {
            req.append_header(k, v).expect("header");
        }
        clean_request(&mut req, &HeaderValue::from_static("1.1 sluice-ab12"));
        let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(req.headers.contains_key("authorization"));
        assert!(req.headers.contains_key("x-other"));
        assert_eq!(
            req.headers.get("via").map(|v| v.as_bytes()),
            Some(&b"1.1 sluice-ab12"[..])
        );
    }

    #[test]
    fn names_sluice_sees_any_control_field_and_only_those() {
        let mut req = RequestHeader::build("GET", b"/", None).expect("req");
        req.append_header("Host", "a.test").expect("h");
        req.append_header("X-Sluice-Like", "1").expect("h");
        req.append_header("Sluice", "1").expect("h");
        assert!(!names_sluice(&req.headers));
        req.append_header("SLUICE-Timeout", "1s").expect("h");
        assert!(names_sluice(&req.headers));
    }

    #[test]
    fn response_keeps_upstream_sluice_like_headers_but_drops_hops() {
        let mut resp = ResponseHeader::build(200, None).expect("resp");
        resp.append_header("Connection", "close").expect("h");
        resp.append_header("Via", "1.1 upstream-cdn").expect("h");
        resp.append_header("Content-Type", "text/plain").expect("h");
        clean_response(&mut resp, &HeaderValue::from_static("1.1 sluice-ab12"));
        assert!(!resp.headers.contains_key("connection"));
        let via: Vec<_> = resp.headers.get_all("via").iter().collect();
        assert_eq!(via.len(), 2);
    }
}
