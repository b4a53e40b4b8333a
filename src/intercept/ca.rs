//! The interception CA: loaded from PEM files (the key must match the certificate), or made
//! new by `sluice ca init DIR`.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::sign::CertifiedKey;

/// A CA that signs leaf certificates.
pub struct Ca {
    /// The CA as rcgen's issuer (its name, key identifier and key).
    pub(super) issuer: rcgen::Certificate,
    pub(super) key: KeyPair,
    /// The CA certificate as the client will see it in the chain.
    pub(super) der: CertificateDer<'static>,
}

impl Ca {
    /// Load `cert` and `key` (PEM). Fails, with a reason, when either does not parse, the
    /// certificate is not a CA, or the key is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Ca>, String> {
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
        Ca::from_pem(&cert_pem, &key_pem)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<Ca>, String> {
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or("ca_cert holds no certificate")?
            .map_err(|e| format!("ca_cert: {e}"))?;
        let key_der = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| format!("ca_key: {e}"))?
            .ok_or("ca_key holds no private key")?;
        // The key must be the certificate's: compared as SubjectPublicKeyInfo by rustls.
        let signing = default_provider()
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| format!("ca_key: {e}"))?;
        CertifiedKey::new(vec![der.clone()], signing)
            .keys_match()
            .map_err(|e| format!("ca_key does not belong to ca_cert: {e:?}"))?;
        let params =
            CertificateParams::from_ca_cert_der(&der).map_err(|e| format!("ca_cert: {e}"))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err("ca_cert is not a CA certificate (basicConstraints CA:TRUE)".into());
        }
        let key = KeyPair::try_from(&key_der).map_err(|e| format!("ca_key: {e}"))?;
        // rcgen signs with an issuer certificate made from the same name, key identifier
        // and key; the client validates against the original, which shares all three.
        let issuer = params
            .self_signed(&key)
            .map_err(|e| format!("ca_cert: {e}"))?;
        Ok(Arc::new(Ca { issuer, key, der }))
    }
}

/// `sluice ca init DIR`: write a new CA (`ca.pem`, and `ca.key` with mode 0600) and say how
/// to trust it. Existing files are never overwritten.
pub fn init(dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(format!("{} exists; not overwriting it", p.display()));
        }
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("sluice interception CA {}", host.trim()),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "sluice");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let (c, k) = (cert_path.display(), key_path.display());
    Ok(format!(
        "wrote {c} (the CA certificate) and {k} (its key, mode 0600: keep it secret)\n\n\
         In sluice.toml:\n  [intercept]\n  hosts = [\"api.openai.com\"]\n  ca_cert = \"{c}\"\n  ca_key = \"{k}\"\n\n\
         Then make the clients trust {c}:\n  \
         curl:            curl --cacert {c} ...\n  \
         Python requests: REQUESTS_CA_BUNDLE={c}\n  \
         httpx, OpenAI and Anthropic SDKs, Go: SSL_CERT_FILE={c}\n  \
         Node.js:         NODE_EXTRA_CA_CERTS={c}\n  \
         Debian/Ubuntu:   cp {c} /usr/local/share/ca-certificates/sluice.crt && update-ca-certificates\n\
         (REQUESTS_CA_BUNDLE and SSL_CERT_FILE replace the default roots: to reach other hosts\n\
         too, give a bundle of the system roots with this CA appended.)"
    ))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}
