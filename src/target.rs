//! Which destination a request is for: an absolute URI (forward proxy), a `Sluice-Target`
//! header, or a configured route. Parsing only; resolving names is `resolve.rs`'s job.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Upstream scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    pub fn is_tls(self) -> bool {
        self == Scheme::Https
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Why a target could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetError(pub String);

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, TargetError> {
    Err(TargetError(msg.into()))
}

/// A destination host: scheme, lowercased host (IPv6 without brackets), port, and an optional
/// base path (no trailing '/') prepended to every forwarded path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub base_path: String,
}

/// The way a request came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WayIn {
    /// Absolute-URI request to sluice as an HTTP proxy.
    Forward,
    /// CONNECT tunnel.
    Connect,
    /// Origin-form request with `Sluice-Target`.
    Target,
    /// Origin-form request matching a `[[routes]]` prefix.
    Route,
    /// A request inside a CONNECT tunnel that sluice serves itself (TLS interception, or
    /// plain HTTP in a tunnel to port 80).
    Intercept,
    /// A request to sluice's own jobs API (`/_sluice/v1/`).
    Jobs,
    /// Not (yet) known: the request failed before its way in was clear.
    #[default]
    Unknown,
}

impl WayIn {
    pub const ALL: [WayIn; 7] = [
        WayIn::Forward,
        WayIn::Connect,
        WayIn::Target,
        WayIn::Route,
        WayIn::Intercept,
        WayIn::Jobs,
        WayIn::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WayIn::Forward => "forward",
            WayIn::Connect => "connect",
            WayIn::Target => "target",
            WayIn::Route => "route",
            WayIn::Intercept => "intercept",
            WayIn::Jobs => "jobs",
            WayIn::Unknown => "unknown",
        }
    }
}

impl Origin {
    /// `scheme://authority` with nothing after it but an optional single '/'.
    pub fn parse(text: &str) -> Result<Origin, TargetError> {
        let (origin, rest) = split_absolute(text)?;
        if !(rest.is_empty() || rest == "/") {
            return bad(format!(
                "{text:?} must be scheme://host[:port] with no path"
            ));
        }
        Ok(origin)
    }

    /// `scheme://authority[/base/path]`, no query or fragment.
    pub fn parse_with_base(text: &str) -> Result<Origin, TargetError> {
        let (mut origin, rest) = split_absolute(text)?;
        if rest.contains(['?', '#']) {
            return bad(format!("{text:?} must not carry a query or fragment"));
        }
        origin.base_path = rest.trim_end_matches('/').to_string();
        Ok(origin)
    }

    /// The value of the `Host` header for this origin (port omitted when it is the default).
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Is `value` exactly [`Origin::host_header`]? Compared in place, with nothing formatted.
    pub fn is_host_header(&self, value: &[u8]) -> bool {
        let host = self.host.as_bytes();
        let rest = match self.host.contains(':') {
            true => value
                .strip_prefix(b"[")
                .and_then(|v| v.strip_prefix(host))
                .and_then(|v| v.strip_prefix(b"]")),
            false => value.strip_prefix(host),
        };
        match rest {
            None => false,
            Some(port) if self.port == self.scheme.default_port() => port.is_empty(),
            Some(port) => port.strip_prefix(b":").is_some_and(|digits| {
                digits.first().is_some_and(|d| (b'1'..=b'9').contains(d))
                    && digits.iter().all(u8::is_ascii_digit)
                    && std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse::<u16>().ok())
                        == Some(self.port)
            }),
        }
    }

    /// `host:port`, the key used for pacing and static resolution.
    pub fn host_port(&self) -> String {
        host_port(&self.host, self.port)
    }

    /// The path to send upstream: the base path joined with the request's path and query.
    pub fn join_path(&self, path_and_query: &str) -> String {
        let tail = if path_and_query.is_empty() {
            "/"
        } else {
            path_and_query
        };
        if self.base_path.is_empty() {
            if tail.starts_with('/') {
                tail.to_string()
            } else {
                format!("/{tail}")
            }
        } else if tail.starts_with('?') || tail == "/" {
            format!("{}{}", self.base_path, tail.trim_start_matches('/'))
        } else if tail.starts_with('/') {
            format!("{}{tail}", self.base_path)
        } else {
            format!("{}/{tail}", self.base_path)
        }
    }
}

/// Split `scheme://authority<rest>`; `rest` is what follows the authority (path, query), with
/// any fragment dropped.
pub fn split_absolute(text: &str) -> Result<(Origin, &str), TargetError> {
    // The scheme ends at the first ':' (a scheme has none), and "//" follows it.
    let split = text
        .find(':')
        .and_then(|i| Some((&text[..i], text[i + 1..].strip_prefix("//")?)));
    let Some((scheme, after)) = split else {
        return bad(format!(
            "{text:?} is not an absolute http:// or https:// URI"
        ));
    };
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        Scheme::Http
    } else if scheme.eq_ignore_ascii_case("https") {
        Scheme::Https
    } else {
        return bad(format!("unsupported scheme {scheme:?}: use http or https"));
    };
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, mut rest) = after.split_at(end);
    if let Some(i) = rest.find('#') {
        rest = &rest[..i];
    }
    let (host, port) = parse_authority(authority, Some(scheme.default_port()))?;
    Ok((
        Origin {
            scheme,
            host,
            port,
            base_path: String::new(),
        },
        rest,
    ))
}

/// An absolute http(s) URL as its origin and the path (and query) to send, never empty.
pub fn split_url(text: &str) -> Result<(Origin, String), TargetError> {
    let text = text.trim();
    if text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return bad("a URL has no spaces or control characters");
    }
    let (origin, rest) = split_absolute(text)?;
    let path = origin.join_path(rest);
    Ok((origin, path))
}

/// Parse `host[:port]` (or `[v6]:port`). Without `default_port`, the port is required
/// (CONNECT's authority form). The host comes back lowercased, IPv6 without brackets.
pub fn parse_authority(
    authority: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), TargetError> {
    if authority.is_empty() {
        return bad("empty host");
    }
    if authority.contains('@') {
        return bad("credentials in the URI are not accepted");
    }
    let (host, port_text) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return bad(format!("{authority:?}: unclosed '['"));
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return bad(format!("{addr:?} is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad(format!("{authority:?}: junk after ']'")),
            },
        };
        (addr.to_ascii_lowercase(), port)
    } else {
        let (h, p) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if h.is_empty() {
            return bad("empty host");
        }
        if h.len() > 253
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return bad(format!("{h:?} is not a valid host name"));
        }
        (h.to_ascii_lowercase(), p)
    };
    let port = match port_text {
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return bad(format!("{p:?} is not a valid port")),
            Ok(n) => n,
        },
        None => match default_port {
            Some(d) => d,
            None => return bad(format!("{authority:?} needs a port")),
        },
    };
    Ok((host, port))
}

/// `host:port` (IPv6 hosts in brackets): the key of a destination host.
pub fn host_port(host: &str, port: u16) -> String {
    // Made once per request (the pacing key): written directly, not through `format!`.
    let v6 = host.contains(':');
    let mut key = String::with_capacity(host.len() + 8);
    if v6 {
        key.push('[');
    }
    key.push_str(host);
    if v6 {
        key.push(']');
    }
    key.push(':');
    key.push_str(itoa::Buffer::new().format(port));
    key
}

/// The host as an IP address, when it is a literal.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    host.parse().ok()
}

/// Header naming an explicit destination on an origin-form request.
pub const SLUICE_TARGET: http::HeaderName = http::HeaderName::from_static("sluice-target");

/// Where a request goes: its way in, the origin, and the path and query to send there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub way: WayIn,
    pub origin: Origin,
    pub path: String,
}

/// A route compiled from `[[routes]]`.
#[derive(Clone, Debug)]
pub struct Route {
    pub prefix: String,
    pub origin: Origin,
}

/// The route whose prefix matches `path` at a segment boundary, if any (`routes` longest
/// prefix first).
pub fn route_for<'a>(routes: &'a [Route], path: &str) -> Option<&'a Route> {
    routes.iter().find(|r| {
        path.strip_prefix(r.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
    })
}

/// The scheme of an absolute-form request target that is neither http nor https
/// (`ftp://x/`, `ws://x/`): such a target is refused, never taken for a path.
fn other_scheme(raw: &[u8]) -> Option<String> {
    if raw.first() == Some(&b'/') || raw == b"*" {
        return None;
    }
    let colon = raw.iter().position(|&b| b == b':')?;
    let scheme = &raw[..colon];
    let is_scheme = !scheme.is_empty()
        && scheme[0].is_ascii_alphabetic()
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    is_scheme.then(|| String::from_utf8_lossy(scheme).into_owned())
}

/// Find the destination of an HTTP request: absolute URI first, then `Sluice-Target`, then
/// `routes` (longest prefix first).
pub fn destination(
    req: &pingora_http::RequestHeader,
    routes: &[Route],
) -> Result<Destination, (WayIn, crate::error::Code, String)> {
    use crate::error::Code;
    let raw = req.raw_path();
    let is_absolute = raw.len() > 7
        && (raw[..7].eq_ignore_ascii_case(b"http://")
            || raw.len() > 8 && raw[..8].eq_ignore_ascii_case(b"https://"));
    if is_absolute {
        let way = WayIn::Forward;
        let text = std::str::from_utf8(raw).map_err(|_| {
            (
                way,
                Code::BadTarget,
                "request target is not UTF-8".to_string(),
            )
        })?;
        let (origin, rest) =
            split_absolute(text).map_err(|e| (way, Code::BadTarget, e.to_string()))?;
        let path = origin.join_path(rest);
        return Ok(Destination { way, origin, path });
    }
    // A WebSocket client through a proxy (aiohttp does) names `ws://` or `wss://`: the same
    // destination as `http://` or `https://`, for an upgrade request only.
    let ws = [("ws://", "http://"), ("wss://", "https://")]
        .into_iter()
        .find(|(p, _)| raw.len() > p.len() && raw[..p.len()].eq_ignore_ascii_case(p.as_bytes()));
    if let Some((prefix, as_http)) = ws {
        let way = WayIn::Forward;
        let upgrade = req.headers.contains_key(http::header::UPGRADE);
        let text = std::str::from_utf8(&raw[prefix.len()..])
            .ok()
            .filter(|_| upgrade)
            .ok_or((
                way,
                Code::BadTarget,
                format!("a {prefix} target needs an upgrade request (Upgrade: websocket)"),
            ))?;
        let text = format!("{as_http}{text}");
        let (origin, rest) =
            split_absolute(&text).map_err(|e| (way, Code::BadTarget, e.to_string()))?;
        let path = origin.join_path(rest);
        return Ok(Destination { way, origin, path });
    }
    if let Some(scheme) = other_scheme(raw) {
        return Err((
            WayIn::Forward,
            Code::BadTarget,
            format!("absolute request target with scheme {scheme:?}: sluice forwards http and https only"),
        ));
    }
    let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Some(value) = req.headers.get(SLUICE_TARGET) {
        let way = WayIn::Target;
        let text = value.to_str().map_err(|_| {
            (
                way,
                Code::BadTarget,
                "Sluice-Target is not ASCII".to_string(),
            )
        })?;
        let origin = Origin::parse_with_base(text.trim())
            .map_err(|e| (way, Code::BadTarget, format!("Sluice-Target: {e}")))?;
        let path = origin.join_path(path_and_query);
        return Ok(Destination { way, origin, path });
    }
    if let Some(route) = route_for(routes, path_and_query) {
        let rest = &path_and_query[route.prefix.len()..];
        let origin = route.origin.clone();
        let path = origin.join_path(rest);
        return Ok(Destination {
            way: WayIn::Route,
            origin,
            path,
        });
    }
    Err((
        WayIn::Unknown,
        Code::NoTarget,
        "no destination: send an absolute URI (use sluice as http_proxy), a Sluice-Target \
         header, or a path under a configured route"
            .to_string(),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_host_header_is_host_header_compared() {
        let origins = [
            "http://a.test",
            "http://a.test:80",
            "https://a.test:443",
            "https://a.test:8443",
            "http://127.0.0.1:18091",
            "http://[::1]:8080",
            "https://[::1]",
        ];
        let values = [
            "a.test",
            "a.test:80",
            "a.test:443",
            "a.test:8443",
            "a.test:08443",
            "a.test:+8443",
            "a.test:",
            "A.test",
            "127.0.0.1:18091",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "::1",
            "[::1]:",
            "[::1]:8080x",
            "",
            "a.test:65536",
        ];
        for o in origins {
            let origin = Origin::parse(o).expect("origin");
            for v in values {
                assert_eq!(
                    origin.is_host_header(v.as_bytes()),
                    origin.host_header() == v,
                    "{o} / {v:?}"
                );
            }
            assert!(
                origin.is_host_header(origin.host_header().as_bytes()),
                "{o}"
            );
        }
    }
    use super::*;

    #[test]
    fn parses_origins() {
        let o = Origin::parse("https://API.Example.com").expect("ok");
        assert_eq!(
            (o.scheme, o.host.as_str(), o.port),
            (Scheme::Https, "api.example.com", 443)
        );
        let o = Origin::parse("http://[::1]:8080/").expect("ok");
        assert_eq!((o.host.as_str(), o.port), ("::1", 8080));
        assert_eq!(o.host_header(), "[::1]:8080");
        assert_eq!(o.host_port(), "[::1]:8080");
        assert_eq!(host_port("a.test", 0), "a.test:0");
        assert_eq!(host_port("a.test", 65535), "a.test:65535");
        assert_eq!(host_port("fe80::1%eth0", 443), "[fe80::1%eth0]:443");
        assert!(Origin::parse("https://a.test/v1").is_err());
        let o = Origin::parse_with_base("https://a.test/v1/").expect("ok");
        assert_eq!(o.base_path, "/v1");
    }

    #[test]
    fn rejects_bad_targets() {
        for t in [
            "api.example.com",
            "ftp://a.test",
            "https://",
            "https://:443",
            "https://a.test:0",
            "https://a.test:70000",
            "https://a.test:x",
            "https://user:pw@a.test",
            "https://[::1",
            "https://[zz]:1",
            "https://a b.test",
            "https://a.test]:1",
        ] {
            assert!(Origin::parse(t).is_err(), "{t} should be rejected");
        }
    }

    #[test]
    fn splits_absolute_uris() {
        let (o, rest) = split_absolute("http://a.test:81/x/y?q=1#frag").expect("ok");
        assert_eq!((o.host.as_str(), o.port, rest), ("a.test", 81, "/x/y?q=1"));
        let (_, rest) = split_absolute("http://a.test").expect("ok");
        assert_eq!(rest, "");
        let (_, rest) = split_absolute("http://a.test?q").expect("ok");
        assert_eq!(rest, "?q");
        let (o, _) = split_absolute("HTTPS://A.test").expect("ok");
        assert_eq!((o.scheme, o.host.as_str()), (Scheme::Https, "a.test"));
        for t in [
            "a.test:8080/x",
            "http:/a.test",
            "http:a.test://b",
            ":///",
            "",
            "http",
        ] {
            assert!(split_absolute(t).is_err(), "{t:?} should be rejected");
        }
    }

    #[test]
    fn authority_form_needs_a_port() {
        assert_eq!(
            parse_authority("Example.com:443", None).expect("ok"),
            ("example.com".to_string(), 443)
        );
        assert!(parse_authority("example.com", None).is_err());
        assert_eq!(
            parse_authority("[::ffff:127.0.0.1]:443", None).expect("ok"),
            ("::ffff:127.0.0.1".to_string(), 443)
        );
    }

    #[test]
    fn joins_base_paths() {
        let o = Origin::parse_with_base("https://a.test").expect("ok");
        assert_eq!(o.join_path(""), "/");
        assert_eq!(o.join_path("/v1/x?q=1"), "/v1/x?q=1");
        assert_eq!(o.join_path("?q=1"), "/?q=1");
        let o = Origin::parse_with_base("https://a.test/api").expect("ok");
        assert_eq!(o.join_path(""), "/api");
        assert_eq!(o.join_path("/"), "/api");
        assert_eq!(o.join_path("/v1"), "/api/v1");
        assert_eq!(o.join_path("?q"), "/api?q");
    }
}
