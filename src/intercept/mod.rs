//! TLS interception of CONNECT tunnels (opt-in, `[intercept]`): for a listed host, sluice
//! answers the CONNECT itself, accepts the client's TLS with a leaf certificate for that host
//! signed by a local CA (made on demand, short-lived, cached), and serves the requests inside
//! through the one pipeline as if they were explicit-target requests to `https://host:port`.
//! The upstream is always verified, as for every request sluice originates.

pub mod ca;
pub mod stream;

pub use ca::Ca;
pub use stream::{tunnel_of, ClientSide, Rewind, TunnelInfo, Tunneled};

use crate::config::{ConfigError, Intercept};
use crate::metrics::Metrics;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

/// Does `host` match one of `patterns` (exact names, or `*.suffix` for names under it)?
pub fn matches(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => p.eq_ignore_ascii_case(host),
    })
}

/// Is `host` to be intercepted under `config`?
pub fn wanted(config: &Intercept, host: &str) -> bool {
    matches(&config.hosts, host) && !matches(&config.exclude, host)
}

/// Why a tunnel's TLS was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// The ClientHello named another host than the CONNECT (domain fronting).
    SniMismatch { sni: String },
    /// The handshake failed or did not finish in time.
    Handshake(String),
    /// No leaf certificate could be made.
    Leaf(String),
    /// The client rejected sluice's leaf certificate: it does not trust the interception CA.
    Untrusted(String),
}

impl Refused {
    pub fn result(&self) -> &'static str {
        match self {
            Refused::SniMismatch { .. } => "sni_mismatch",
            Refused::Handshake(_) => "handshake_failed",
            Refused::Leaf(_) => "leaf_failed",
            Refused::Untrusted(_) => "untrusted_ca",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::SniMismatch { sni } => {
                write!(f, "TLS server name {sni:?} differs from the CONNECT host")
            }
            Refused::Handshake(m) => write!(f, "TLS handshake: {m}"),
            Refused::Leaf(m) => write!(f, "leaf certificate: {m}"),
            Refused::Untrusted(m) => write!(
                f,
                "the client rejected sluice's certificate ({m}): it does not trust the \
                 interception CA; make it trust intercept.ca_cert (`sluice ca init` prints how \
                 for curl, Python, Node.js and the system store)"
            ),
        }
    }
}

/// A failed handshake, told apart: the client's alert saying it does not trust the leaf
/// (its CA) is a setup mistake with a known fix, not a broken handshake.
fn handshake_refused(e: &std::io::Error) -> Refused {
    use tokio_rustls::rustls::{AlertDescription as A, Error as TlsError};
    let alert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
        .and_then(|t| match t {
            TlsError::AlertReceived(a) => Some(*a),
            _ => None,
        });
    match alert {
        Some(A::UnknownCA) => Refused::Untrusted(e.to_string()),
        // Some clients (Go's) send these for any verification failure: the CA, the name, the
        // dates. Said, without claiming which.
        Some(A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate) => {
            Refused::Handshake(format!(
                "{e}: the client rejected sluice's certificate; check that it trusts \
                 intercept.ca_cert (`sluice ca init` prints how)"
            ))
        }
        _ => Refused::Handshake(e.to_string()),
    }
}

struct Leaf {
    config: Arc<ServerConfig>,
    made: Instant,
}

/// The CA, and the leaf certificates made with it, by host.
pub struct Interceptor {
    ca: Arc<Ca>,
    ttl: Duration,
    leaves: Mutex<LruCache<String, Leaf>>,
}

impl Interceptor {
    /// The interceptor of `config`, if it names a CA.
    /// Read the configured CA the way [`Interceptor::from_config`] will, for `--check` and the
    /// start: what is wrong comes back under its key path.
    pub fn check(config: &Intercept) -> Result<(), ConfigError> {
        Interceptor::from_config(config)
            .map(|_| ())
            .map_err(|e| ConfigError::single("intercept.ca_cert".into(), e))
    }

    pub fn from_config(config: &Intercept) -> Result<Option<Arc<Interceptor>>, String> {
        let (Some(cert), Some(key)) = (&config.ca_cert, &config.ca_key) else {
            return Ok(None);
        };
        let ca = Ca::load(cert.as_ref(), key.as_ref())?;
        Ok(Some(Arc::new(Interceptor::new(
            ca,
            config.leaf_ttl.get(),
            config.leaf_cache,
        ))))
    }

    pub fn new(ca: Arc<Ca>, ttl: Duration, cache: usize) -> Interceptor {
        let cap = NonZeroUsize::new(cache.max(1)).unwrap_or(NonZeroUsize::MIN);
        Interceptor {
            ca,
            ttl,
            leaves: Mutex::new(LruCache::new(cap)),
        }
    }

    /// The TLS configuration serving `host`: cached, or made now (an ECDSA P-256 key and a
    /// certificate valid for `ttl`, made again after half of it).
    pub fn leaf(&self, host: &str, metrics: &Metrics) -> Result<Arc<ServerConfig>, String> {
        let key = host.to_ascii_lowercase();
        {
            let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = leaves.get(&key) {
                if l.made.elapsed() < self.ttl / 2 {
                    metrics.intercept_leaves.with_label_values(&["hit"]).inc();
                    return Ok(l.config.clone());
                }
            }
        }
        metrics.intercept_leaves.with_label_values(&["miss"]).inc();
        let config = self.make_leaf(&key)?;
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        leaves.put(
            key,
            Leaf {
                config: config.clone(),
                made: Instant::now(),
            },
        );
        metrics.intercept_leaf_cache.set(leaves.len() as i64);
        Ok(config)
    }

    fn make_leaf(&self, host: &str) -> Result<Arc<ServerConfig>, String> {
        let mut params =
            rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        let ttl = time::Duration::try_from(self.ttl).unwrap_or(time::Duration::days(1));
        params.not_after = now + ttl;
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.ca.issuer, &self.ca.key)
            .map_err(|e| e.to_string())?;
        let provider = Arc::new(default_provider());
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| e.to_string())?;
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone(), self.ca.der.clone()];
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(certified)));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Accept the client's TLS on `io` for the tunnel to `host`, within `timeout`. The
    /// server name the client asks for must be `host` (a client that names none gets it).
    pub async fn accept<IO>(
        &self,
        io: IO,
        host: &str,
        timeout: Duration,
        metrics: &Metrics,
    ) -> Result<TlsStream<IO>, Refused>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = async {
            let start = LazyConfigAcceptor::new(Default::default(), io)
                .await
                .map_err(|e| Refused::Handshake(e.to_string()))?;
            let hello: ClientHello<'_> = start.client_hello();
            if let Some(sni) = hello.server_name() {
                if !sni.eq_ignore_ascii_case(host) {
                    return Err(Refused::SniMismatch {
                        sni: sni.to_string(),
                    });
                }
            }
            let config = self.leaf(host, metrics).map_err(Refused::Leaf)?;
            start
                .into_stream(config)
                .await
                .map_err(|e| handshake_refused(&e))
        };
        match tokio::time::timeout(timeout, handshake).await {
            Ok(r) => r,
            Err(_) => Err(Refused::Handshake(format!("not done within {timeout:?}"))),
        }
    }
}

/// Always the one leaf made for this tunnel's host.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_or_under_a_suffix() {
        let p = vec!["api.openai.com".to_string(), "*.stripe.com".to_string()];
        assert!(matches(&p, "api.openai.com"));
        assert!(matches(&p, "API.OpenAI.com"));
        assert!(!matches(&p, "openai.com"));
        assert!(!matches(&p, "xapi.openai.com"));
        assert!(matches(&p, "api.stripe.com"));
        assert!(matches(&p, "a.b.stripe.com"));
        assert!(!matches(&p, "stripe.com"));
        assert!(!matches(&p, "evilstripe.com"));
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile_dir();
        ca::init(&dir).expect("init");
        let cert = std::fs::read_to_string(dir.join("ca.pem")).expect("cert");
        let key = std::fs::read_to_string(dir.join("ca.key")).expect("key");
        assert!(Ca::from_pem(&cert, &key).is_ok());
        let other = rcgen::KeyPair::generate().expect("key").serialize_pem();
        let e = Ca::from_pem(&cert, &other).err().expect("mismatch refused");
        assert!(e.contains("does not belong"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ca::init(&dir).is_err(), "an existing CA is not overwritten");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn leaves_are_cached_by_host() {
        let dir = tempfile_dir();
        ca::init(&dir).expect("init");
        let ca = Ca::load(&dir.join("ca.pem"), &dir.join("ca.key")).expect("ca");
        let i = Interceptor::new(ca, Duration::from_secs(3600), 2);
        let m = Metrics::new().expect("metrics");
        let a = i.leaf("a.test", &m).expect("leaf");
        let again = i.leaf("A.test", &m).expect("leaf");
        assert!(Arc::ptr_eq(&a, &again));
        i.leaf("b.test", &m).expect("leaf");
        i.leaf("c.test", &m).expect("leaf");
        // Bounded: a.test was the least recently used.
        let a2 = i.leaf("a.test", &m).expect("leaf");
        assert!(!Arc::ptr_eq(&a, &a2));
        assert_eq!(m.intercept_leaves.with_label_values(&["hit"]).get(), 1);
        assert_eq!(m.intercept_leaves.with_label_values(&["miss"]).get(), 4);
        assert_eq!(m.intercept_leaf_cache.get(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "sluice-ca-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
}
