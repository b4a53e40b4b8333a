//! Client authentication: `Proxy-Authorization: Basic` (name and password) or `Bearer`
//! (token) on the forward-proxy ways in and CONNECT, and `Sluice-Key: <token>` on explicit
//! target and route requests (so the client's own `Authorization` reaches the upstream).
//! Secrets are configured as SHA-256 digests and compared in constant time.

use crate::config::ClientConfig;
use base64::Engine;
use sha2::{Digest, Sha256};

/// Header carrying a client token on explicit-target and route requests.
pub const SLUICE_KEY: http::HeaderName = http::HeaderName::from_static("sluice-key");

/// A configured client, with its digests decoded.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    token: Option<[u8; 32]>,
    password: Option<[u8; 32]>,
    pub limits: Option<crate::config::ClientLimits>,
    /// Its name as a caller at a contended host (made once, shared by its requests).
    pub caller: std::sync::Arc<str>,
    /// Its share of a contended host, and the class of its requests by default.
    pub weight: u32,
    pub priority: crate::config::Priority,
}

/// Why authentication failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials were sent.
    Required,
    /// Credentials were sent and did not match.
    Failed,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

fn sha256(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Do two secrets match? Compared as SHA-256 digests, in time that does not depend on where
/// they differ (nor on their lengths).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    same(&sha256(a), &sha256(b))
}

/// Equal digests, in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Authenticate a request against `clients`: `Proxy-Authorization` on the ways in where
/// sluice is the client's proxy (forward and CONNECT), `Sluice-Key` on the others. A refusal
/// says its code, its status (407 as a proxy, 401 otherwise) and why. One function for HTTP
/// and CONNECT alike.
pub fn authenticate<'a>(
    clients: &'a Clients,
    proxy_way: bool,
    proxy_authorization: Option<&[u8]>,
    sluice_key: Option<&[u8]>,
) -> Result<&'a Client, (crate::error::Code, u16, &'static str)> {
    use crate::error::Code;
    let result = if proxy_way {
        clients.proxy_authorization(proxy_authorization)
    } else {
        clients.sluice_key(sluice_key)
    };
    let status = if proxy_way { 407 } else { 401 };
    result.map_err(|e| match e {
        AuthError::Required if proxy_way => (
            Code::AuthRequired,
            status,
            "authenticate with Proxy-Authorization (Basic or Bearer)",
        ),
        AuthError::Required => (
            Code::AuthRequired,
            status,
            "authenticate with a Sluice-Key header",
        ),
        AuthError::Failed => (Code::AuthFailed, status, "credentials not accepted"),
    })
}

/// The configured clients; empty means authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    clients: Vec<Client>,
}

impl Clients {
    pub fn new(config: &[ClientConfig]) -> Clients {
        Clients {
            clients: config
                .iter()
                .map(|c| Client {
                    name: c.name.clone(),
                    token: c.token_sha256.as_deref().and_then(hex32),
                    password: c.password_sha256.as_deref().and_then(hex32),
                    limits: c.limits.clone(),
                    caller: std::sync::Arc::from(c.name.as_str()),
                    weight: c.weight,
                    priority: c.priority,
                })
                .collect(),
        }
    }

    /// The configured pace of a client, if any.
    pub fn limits_of(&self, name: &str) -> Option<&crate::config::ClientLimits> {
        self.clients
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.limits.as_ref())
    }

    pub fn enabled(&self) -> bool {
        !self.clients.is_empty()
    }

    /// The client of this name (a job's requests carry the name of the client that
    /// submitted it; its credentials were checked then).
    pub fn by_name(&self, name: &str) -> Option<&Client> {
        self.clients.iter().find(|c| c.name == name)
    }

    /// The client a bearer token belongs to. Every client is compared (no early exit).
    pub fn by_token(&self, token: &[u8]) -> Option<&Client> {
        let digest = sha256(token);
        let mut found = None;
        for c in &self.clients {
            if let Some(t) = &c.token {
                if same(t, &digest) && found.is_none() {
                    found = Some(c);
                }
            }
        }
        found
    }

    /// The client for a Basic name and password.
    pub fn by_password(&self, name: &str, password: &[u8]) -> Option<&Client> {
        let digest = sha256(password);
        let c = self.clients.iter().find(|c| c.name == name)?;
        let stored = c.password.as_ref()?;
        same(stored, &digest).then_some(c)
    }

    /// Authenticate a `Proxy-Authorization` value.
    pub fn proxy_authorization(&self, value: Option<&[u8]>) -> Result<&Client, AuthError> {
        let Some(value) = value else {
            return Err(AuthError::Required);
        };
        let text = std::str::from_utf8(value)
            .map_err(|_| AuthError::Failed)?
            .trim();
        let (scheme, rest) = text.split_once(' ').ok_or(AuthError::Failed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.by_token(rest.as_bytes()).ok_or(AuthError::Failed);
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| AuthError::Failed)?;
            let text = std::str::from_utf8(&decoded).map_err(|_| AuthError::Failed)?;
            let (name, password) = text.split_once(':').ok_or(AuthError::Failed)?;
            return self
                .by_password(name, password.as_bytes())
                // A token may also be sent as the Basic password (for clients that only do Basic).
                .or_else(|| self.by_token(password.as_bytes()))
                .ok_or(AuthError::Failed);
        }
        Err(AuthError::Failed)
    }

    /// Authenticate a `Sluice-Key` value.
    pub fn sluice_key(&self, value: Option<&[u8]>) -> Result<&Client, AuthError> {
        let Some(value) = value else {
            return Err(AuthError::Required);
        };
        self.by_token(value.trim_ascii()).ok_or(AuthError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn clients() -> Clients {
        Clients::new(&[
            ClientConfig {
                name: "billing".into(),
                token_sha256: Some(hex(sha256(b"tok-billing"))),
                password_sha256: Some(hex(sha256(b"pw"))),
                limits: None,
                weight: 1,
                priority: Default::default(),
            },
            ClientConfig {
                name: "search".into(),
                token_sha256: Some(hex(sha256(b"tok-search"))),
                password_sha256: None,
                limits: None,
                weight: 1,
                priority: Default::default(),
            },
        ])
    }

    #[test]
    fn bearer_basic_and_sluice_key() {
        let c = clients();
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let name = |r: Result<&Client, AuthError>| r.map(|c| c.name.clone());
        assert_eq!(
            name(c.proxy_authorization(Some(b"Bearer tok-search"))),
            Ok("search".into())
        );
        assert_eq!(
            name(c.proxy_authorization(Some(basic("billing:pw").as_bytes()))),
            Ok("billing".into())
        );
        assert_eq!(
            name(c.proxy_authorization(Some(basic("x:tok-billing").as_bytes()))),
            Ok("billing".into())
        );
        assert_eq!(name(c.proxy_authorization(None)), Err(AuthError::Required));
        assert_eq!(
            name(c.proxy_authorization(Some(b"Bearer nope"))),
            Err(AuthError::Failed)
        );
        assert_eq!(
            name(c.proxy_authorization(Some(basic("billing:wrong").as_bytes()))),
            Err(AuthError::Failed)
        );
        assert_eq!(
            name(c.proxy_authorization(Some(b"Basic !!!"))),
            Err(AuthError::Failed)
        );
        assert_eq!(
            name(c.proxy_authorization(Some(b"Digest x"))),
            Err(AuthError::Failed)
        );
        assert_eq!(
            name(c.sluice_key(Some(b" tok-billing "))),
            Ok("billing".into())
        );
        assert_eq!(
            name(c.sluice_key(Some(b"tok-bill"))),
            Err(AuthError::Failed)
        );
    }

    #[test]
    fn digests_decode() {
        assert!(hex32(&"ab".repeat(32)).is_some());
        assert!(hex32("abc").is_none());
        assert!(hex32(&"zz".repeat(32)).is_none());
    }
}
