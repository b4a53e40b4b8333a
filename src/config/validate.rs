//! Semantic checks of a parsed `Config`: every failure is collected with its key path.

use super::Config;
use crate::target::Origin;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;

/// One or more configuration errors, each with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub errors: Vec<(String, String)>,
}

impl ConfigError {
    pub fn single(path: String, message: String) -> Self {
        Self {
            errors: vec![(path, message)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (path, message)) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if path.is_empty() || path == "." {
                write!(f, "{message}")?;
            } else {
                write!(f, "{path}: {message}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// `[intercept]`: names well formed, and, when any host is listed, a CA whose key is its own.
fn check_intercept(i: &super::Intercept, err: &mut impl FnMut(String, String)) {
    for (list, names) in [("hosts", &i.hosts), ("exclude", &i.exclude)] {
        for (n, name) in names.iter().enumerate() {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            let ok = !bare.is_empty()
                && !bare.contains(['*', '/', ':', ' '])
                && !bare.starts_with('.')
                && !bare.ends_with('.');
            if !ok {
                err(
                    format!("intercept.{list}[{n}]"),
                    format!("{name:?} is not a host name or \"*.suffix\""),
                );
            }
        }
    }
    let ttl = i.leaf_ttl.get();
    if ttl < std::time::Duration::from_secs(3600)
        || ttl > std::time::Duration::from_secs(30 * 86400)
    {
        err(
            "intercept.leaf_ttl".into(),
            "must be between 1h and 30 days (leaf certificates are short-lived)".into(),
        );
    }
    if i.leaf_cache == 0 || i.leaf_cache > 1_000_000 {
        err(
            "intercept.leaf_cache".into(),
            "must be between 1 and 1000000".into(),
        );
    }
    match (&i.ca_cert, &i.ca_key) {
        (None, None) if i.hosts.is_empty() => {}
        // Both named: the files are read where interception is built (`intercept::check`).
        (Some(_), Some(_)) => {}
        _ => err(
            "intercept".into(),
            "hosts need both ca_cert and ca_key (sluice ca init DIR makes a CA)".into(),
        ),
    }
}

impl Config {
    /// Check every rule; report all failures, each with its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: String, message: String| errors.push((path, message));
        let s = &self.server;

        let listen = parse_listen(&s.listen);
        if let Err(m) = &listen {
            err("server.listen".into(), m.clone());
        }
        let admin = parse_listen(&s.admin_listen);
        if let Err(m) = &admin {
            err("server.admin_listen".into(), m.clone());
        }
        if let (Ok(a), Ok(b)) = (&listen, &admin) {
            if a == b {
                err(
                    "server.admin_listen".into(),
                    format!("must differ from server.listen ({a})"),
                );
            }
        }
        if let Some(t) = &s.admin_token {
            if t.len() < 16 || t.bytes().any(|b| !b.is_ascii_graphic()) {
                err(
                    "server.admin_token".into(),
                    "must be at least 16 printable characters with no spaces".into(),
                );
            }
        }
        if s.metrics_auth && s.admin_token.is_none() {
            err(
                "server.metrics_auth".into(),
                "needs server.admin_token".into(),
            );
        }
        for (i, d) in s.dns_servers.iter().enumerate() {
            let ok =
                d.parse::<std::net::SocketAddr>().is_ok() || d.parse::<std::net::IpAddr>().is_ok();
            if !ok {
                err(
                    format!("server.dns_servers[{i}]"),
                    format!("{d:?} is not an IP address or ip:port"),
                );
            }
        }
        if s.dns_cache_size == 0 || s.dns_cache_size > 10_000_000 {
            err(
                "server.dns_cache_size".into(),
                "must be between 1 and 10000000".into(),
            );
        }
        if s.dns_max_in_flight == 0 || s.dns_max_in_flight > 100_000 {
            err(
                "server.dns_max_in_flight".into(),
                "must be between 1 and 100000".into(),
            );
        }
        if s.threads > 1024 {
            err("server.threads".into(), "must be at most 1024".into());
        }
        for (key, value) in [
            ("connect_timeout", s.connect_timeout),
            ("write_timeout", s.write_timeout),
            ("dns_timeout", s.dns_timeout),
            ("header_read_timeout", s.header_read_timeout),
            ("tunnel_idle_timeout", s.tunnel_idle_timeout),
        ] {
            if value.get().is_zero() {
                err(format!("server.{key}"), "must be greater than zero".into());
            }
        }
        if s.read_timeout.is_some_and(|t| t.get().is_zero()) {
            err(
                "server.read_timeout".into(),
                "must be greater than zero (or left out: no cap on each read)".into(),
            );
        }
        if let Some(path) = &s.upstream_ca_file {
            if let Err(m) = check_ca_file(path) {
                err("server.upstream_ca_file".into(), m);
            }
        }
        if let Err(m) = tracing_subscriber::EnvFilter::try_new(&s.log_level) {
            err("server.log_level".into(), format!("invalid filter: {m}"));
        }

        for (name, addrs) in &self.resolve {
            let path = format!("resolve.{name:?}");
            if name.is_empty() || name.contains('/') || name.contains(char::is_whitespace) {
                err(path.clone(), "must be a host name or host:port".into());
            }
            if addrs.is_empty() {
                err(path.clone(), "needs at least one address".into());
            }
            for (i, a) in addrs.iter().enumerate() {
                if a.parse::<SocketAddr>().is_err() {
                    err(
                        format!("{path}[{i}]"),
                        format!("{a:?} is not an ip:port socket address"),
                    );
                }
            }
        }

        check_limits("defaults", &self.defaults, &mut err);
        let most = super::MAX_HOST_ENTRIES;
        if self.hosts.len() > most {
            err(
                "hosts".into(),
                format!("{} entries; at most {most}", self.hosts.len()),
            );
        }
        for (name, o) in &self.hosts {
            let path = format!("hosts.{name:?}");
            let pattern = name.strip_prefix("*.").unwrap_or(name);
            if crate::target::parse_authority(pattern, Some(1)).is_err() || pattern.contains('*') {
                err(
                    path.clone(),
                    "must be a host name, host:port, or *.suffix".into(),
                );
            }
            check_limits(&path, &o.apply(&self.defaults), &mut err);
            check_regions(&path, name, o, &mut err);
        }

        let sec = &self.security;
        for (key, list) in [
            ("allow_cidrs", &sec.allow_cidrs),
            ("deny_cidrs", &sec.deny_cidrs),
        ] {
            for (i, c) in list.iter().enumerate() {
                if let Err(m) = crate::cidr::Cidr::parse(c) {
                    err(format!("security.{key}[{i}]"), m);
                }
            }
        }
        for (key, list) in [
            ("allow_hosts", &sec.allow_hosts),
            ("deny_hosts", &sec.deny_hosts),
        ] {
            for (i, h) in list.iter().enumerate() {
                let name = h.strip_prefix("*.").unwrap_or(h);
                if crate::target::parse_authority(name, Some(1)).is_err() || name.contains(':') {
                    err(
                        format!("security.{key}[{i}]"),
                        format!("{h:?} must be a host name or *.suffix"),
                    );
                }
            }
        }
        if sec.connect_ports.contains(&0) {
            err("security.connect_ports".into(), "ports are 1-65535".into());
        }
        for (key, v) in [
            ("max_header_bytes", sec.max_header_bytes),
            ("max_uri_bytes", sec.max_uri_bytes),
            ("max_connections", sec.max_connections),
            ("max_connections_per_client", sec.max_connections_per_client),
        ] {
            if v == 0 {
                err(
                    format!("security.{key}"),
                    "must be greater than zero".into(),
                );
            }
        }
        if sec.max_header_bytes > 1024 * 1024 {
            err(
                "security.max_header_bytes".into(),
                "must be at most 1 MiB (1048576)".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            let path = format!("clients[{i}]");
            if c.name.is_empty() || c.name.contains([':', ' ']) || c.name.len() > 64 {
                err(
                    format!("{path}.name"),
                    "must be 1-64 characters without ':' or spaces".into(),
                );
            }
            if !names.insert(c.name.as_str()) {
                err(
                    format!("{path}.name"),
                    format!("{:?} is listed twice", c.name),
                );
            }
            if c.token_sha256.is_none() && c.password_sha256.is_none() {
                err(path.clone(), "needs token_sha256 or password_sha256".into());
            }
            for (key, v) in [
                ("token_sha256", &c.token_sha256),
                ("password_sha256", &c.password_sha256),
            ] {
                if let Some(h) = v {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        err(
                            format!("{path}.{key}"),
                            "must be 64 hex digits (sha256sum of the secret)".into(),
                        );
                    }
                }
            }
            if !(1..=MAX_WEIGHT).contains(&c.weight) {
                err(
                    format!("{path}.weight"),
                    format!("must be between 1 and {MAX_WEIGHT}"),
                );
            }
            if let Some(l) = &c.limits {
                if !(l.rps.is_finite() && l.rps > 0.0) {
                    err(format!("{path}.limits.rps"), "must be positive".into());
                }
                if l.burst == 0 {
                    err(format!("{path}.limits.burst"), "must be at least 1".into());
                }
            }
        }

        if !(1..=MAX_CALLERS_PER_HOST).contains(&self.callers.max_per_host) {
            err(
                "callers.max_per_host".into(),
                format!("must be between 1 and {MAX_CALLERS_PER_HOST}"),
            );
        }
        self.shared.check(&mut err);
        check_intercept(&self.intercept, &mut err);
        super::jobs::check(&self.jobs, &self.webhooks, &mut err);

        let mut prefixes = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            let p = &route.prefix;
            if !p.starts_with('/') || p.len() < 2 {
                err(
                    format!("{path}.prefix"),
                    format!("{p:?} must start with '/' and name a path, e.g. \"/openai\""),
                );
            } else if p.ends_with('/') {
                err(
                    format!("{path}.prefix"),
                    format!("{p:?} must not end with '/'"),
                );
            } else if p.contains(['?', '#', ' ']) {
                err(
                    format!("{path}.prefix"),
                    format!("{p:?} must be a plain path"),
                );
            }
            if !prefixes.insert(p.as_str()) {
                err(
                    format!("{path}.prefix"),
                    format!("{p:?} is used by an earlier route"),
                );
            }
            if let Err(e) = Origin::parse_with_base(&route.target) {
                err(format!("{path}.target"), e.to_string());
            }
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { errors })
        }
    }
}

/// Longest `request_timeout` or `body_idle_timeout` (as long as a `Sluice-Timeout` may be).
const MAX_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Largest `[[clients]] weight`.
pub const MAX_WEIGHT: u32 = 1000;

/// Most callers `[callers] max_per_host` may track apart at one host.
pub const MAX_CALLERS_PER_HOST: usize = 4096;

fn check_limits(path: &str, l: &super::HostLimits, err: &mut impl FnMut(String, String)) {
    if !(l.rps.is_finite() && l.rps >= 0.0 && l.rps <= 1_000_000.0) {
        err(
            format!("{path}.rps"),
            "must be between 0 (no pacing) and 1000000".into(),
        );
    }
    if l.burst == 0 {
        err(format!("{path}.burst"), "must be at least 1".into());
    }
    for (key, t) in [
        ("request_timeout", l.request_timeout),
        ("body_idle_timeout", l.body_idle_timeout),
    ] {
        if t.get().is_zero() || t.get() > MAX_REQUEST_TIMEOUT {
            err(
                format!("{path}.{key}"),
                format!(
                    "must be greater than zero and at most {}",
                    humantime::format_duration(MAX_REQUEST_TIMEOUT)
                ),
            );
        }
    }
    if l.head_time_floor.get() > MAX_REQUEST_TIMEOUT {
        err(
            format!("{path}.head_time_floor"),
            format!(
                "must be at most {}",
                humantime::format_duration(MAX_REQUEST_TIMEOUT)
            ),
        );
    }
    if !(l.max_rps.is_finite() && l.max_rps >= 0.0) {
        err(
            format!("{path}.max_rps"),
            "must be 0 (no ceiling) or positive".into(),
        );
    }
    for (key, v) in [
        ("tokens_per_minute", l.tokens_per_minute),
        ("input_tokens_per_minute", l.input_tokens_per_minute),
        ("output_tokens_per_minute", l.output_tokens_per_minute),
    ] {
        if v > super::MAX_TOKENS_PER_MINUTE {
            err(
                format!("{path}.{key}"),
                format!(
                    "must be at most {} (0: learned from the upstream's headers)",
                    super::MAX_TOKENS_PER_MINUTE
                ),
            );
        }
    }
    check_dispatch(path, l, err);
}

fn check_dispatch(path: &str, l: &super::HostLimits, err: &mut impl FnMut(String, String)) {
    if !(1..=10).contains(&l.max_attempts) {
        err(
            format!("{path}.max_attempts"),
            "must be from 1 to 10".into(),
        );
    }
    let b = &l.retry_budget;
    if !(b.ratio.is_finite() && (0.0..=1.0).contains(&b.ratio)) {
        err(
            format!("{path}.retry_budget.ratio"),
            "must be between 0 and 1 (0.2 = extra attempts up to 20% of requests)".into(),
        );
    }
    let o = &l.outlier;
    if o.base_ejection.get().is_zero() {
        err(
            format!("{path}.outlier.base_ejection"),
            "must be greater than zero".into(),
        );
    }
    if o.max_ejection < o.base_ejection {
        err(
            format!("{path}.outlier.max_ejection"),
            "must be at least outlier.base_ejection".into(),
        );
    }
}

/// A host's regions and health check: names unique, each region with exactly one of
/// `address`, `addresses` or `via`, and only on exact host names.
fn check_regions(
    path: &str,
    name: &str,
    o: &super::HostOverride,
    err: &mut impl FnMut(String, String),
) {
    if !o.regions.is_empty() && name.starts_with('*') {
        err(
            format!("{path}.regions"),
            "regions belong to one host: name it exactly, not with *.suffix".into(),
        );
    }
    if o.health_check.is_some() && o.regions.is_empty() {
        err(
            format!("{path}.health_check"),
            "checks a host's regions: add `regions` or remove it".into(),
        );
    }
    let mut names = HashSet::new();
    for (i, r) in o.regions.iter().enumerate() {
        let rp = format!("{path}.regions[{i}]");
        let valid_name = !r.name.is_empty()
            && r.name.len() <= 64
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_name {
            err(
                format!("{rp}.name"),
                "must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
            );
        } else if !names.insert(r.name.to_ascii_lowercase()) {
            err(
                format!("{rp}.name"),
                format!("{:?} is listed twice", r.name),
            );
        }
        let kinds = usize::from(r.address.is_some())
            + usize::from(!r.addresses.is_empty())
            + usize::from(r.via.is_some());
        if kinds != 1 {
            err(
                rp.clone(),
                "needs exactly one of `address`, `addresses` or `via`".into(),
            );
        }
        for (key, a) in r.address.iter().map(|a| ("address".to_string(), a)).chain(
            r.addresses
                .iter()
                .enumerate()
                .map(|(j, a)| (format!("addresses[{j}]"), a)),
        ) {
            if a.parse::<SocketAddr>().is_err() {
                err(
                    format!("{rp}.{key}"),
                    format!("{a:?} is not an ip:port socket address"),
                );
            }
        }
        if let Some(via) = &r.via {
            match Origin::parse(via) {
                Ok(origin) if !origin.scheme.is_tls() => {}
                Ok(_) => err(
                    format!("{rp}.via"),
                    "a peer sluice is reached over plain http://host:port".into(),
                ),
                Err(e) => err(format!("{rp}.via"), e.0),
            }
            if r.tls.is_some() || r.sni.is_some() {
                err(
                    rp.clone(),
                    "`tls` and `sni` belong to the peer's own region, not to `via`".into(),
                );
            }
        }
        if r.sni.is_some() && r.tls == Some(false) {
            err(format!("{rp}.sni"), "needs tls".into());
        }
    }
    if let Some(h) = &o.health_check {
        let hp = format!("{path}.health_check");
        if h.interval.get().is_zero() {
            err(format!("{hp}.interval"), "must be greater than zero".into());
        }
        if h.timeout.get().is_zero() {
            err(format!("{hp}.timeout"), "must be greater than zero".into());
        }
        if h.healthy == 0 {
            err(format!("{hp}.healthy"), "must be at least 1".into());
        }
        if h.unhealthy == 0 {
            err(format!("{hp}.unhealthy"), "must be at least 1".into());
        }
        if let Some(p) = &h.path {
            if !p.starts_with('/') || http::Uri::try_from(p.as_str()).is_err() {
                err(
                    format!("{hp}.path"),
                    format!("{p:?} must be an absolute path like \"/health\""),
                );
            }
        }
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an ip:port socket address"))
}

pub(super) fn check_ca_file(path: &str) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut reader = std::io::BufReader::new(text.as_slice());
    let mut count = 0;
    for item in rustls_pemfile::certs(&mut reader) {
        item.map_err(|e| format!("{path}: bad PEM: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use crate::config::Config;

    /// The key paths of every error `validate()` reports for `text`.
    pub(in crate::config) fn errors_of(text: &str) -> Vec<String> {
        let config = Config::parse(text).expect("parses");
        match config.validate() {
            Ok(()) => vec![],
            Err(e) => e.errors.into_iter().map(|(p, _)| p).collect(),
        }
    }

    #[test]
    fn hosts_entries_are_bounded_by_what_a_cell_can_name() {
        let most = crate::config::MAX_HOST_ENTRIES;
        let toml = |n: usize| {
            (0..n)
                .map(|i| format!("[hosts.\"h{i}.test\"]\nrps = 1.0\n"))
                .collect::<String>()
        };
        assert!(errors_of(&toml(most)).is_empty());
        assert_eq!(errors_of(&toml(most + 1)), vec!["hosts".to_string()]);
    }

    #[test]
    fn reports_every_error_with_its_path() {
        let paths = errors_of(
            r#"
            [server]
            listen = "nowhere"
            admin_listen = "127.0.0.1:99999"
            connect_timeout = "0s"
            [resolve]
            "a.test" = ["10.0.0.1"]
            [[routes]]
            prefix = "openai"
            target = "ftp://x"
            [[routes]]
            prefix = "openai"
            target = "https://ok.test"
            "#,
        );
        for want in [
            "server.listen",
            "server.admin_listen",
            "server.connect_timeout",
            "resolve.\"a.test\"[0]",
            "routes[0].prefix",
            "routes[0].target",
            "routes[1].prefix",
        ] {
            assert!(
                paths.iter().any(|p| p == want),
                "missing {want} in {paths:?}"
            );
        }
    }

    #[test]
    fn listeners_must_differ() {
        let paths =
            errors_of("[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:1\"\n");
        assert_eq!(paths, vec!["server.admin_listen".to_string()]);
    }

    #[test]
    fn timeouts_are_bounded() {
        let paths = errors_of(
            "[server]\nread_timeout = \"0s\"\n[defaults]\nrequest_timeout = \"0s\"\n\
             [hosts.\"a.test\"]\nbody_idle_timeout = \"2h\"\n",
        );
        assert_eq!(
            paths,
            vec![
                "server.read_timeout".to_string(),
                "defaults.request_timeout".to_string(),
                // The host inherits the default's 0s.
                "hosts.\"a.test\".request_timeout".to_string(),
                "hosts.\"a.test\".body_idle_timeout".to_string(),
            ]
        );
        assert!(errors_of("[server]\nread_timeout = \"5s\"\n").is_empty());
    }

    #[test]
    fn missing_ca_file_is_an_error() {
        let paths = errors_of("[server]\nupstream_ca_file = \"/nonexistent/ca.pem\"\n");
        assert_eq!(paths, vec!["server.upstream_ca_file".to_string()]);
    }

    #[test]
    fn region_mistakes_are_named_by_path() {
        let errors = errors_of(
            r#"
            [defaults]
            max_attempts = 0
            retry_budget = { ratio = 1.5 }
            [hosts."api.test"]
            health_check = { path = "health", interval = "0s" }
            regions = [
              { name = "a", address = "10.0.0.1" },
              { name = "a", address = "10.0.0.2:443" },
              { name = "b", address = "10.0.0.3:443", via = "http://peer:8080" },
              { name = "c", via = "https://peer:8443" },
              { name = "bad name" , addresses = ["10.0.0.4:443"] },
              { name = "d" },
            ]
            [hosts."*.wild.test"]
            regions = [{ name = "a", address = "10.0.0.1:443" }]
            [hosts."lonely.test"]
            health_check = { path = "/health" }
            "#,
        );
        for want in [
            "defaults.max_attempts",
            "defaults.retry_budget.ratio",
            "hosts.\"api.test\".regions[0].address",
            "hosts.\"api.test\".regions[1].name",
            "hosts.\"api.test\".regions[2]",
            "hosts.\"api.test\".regions[3].via",
            "hosts.\"api.test\".regions[4].name",
            "hosts.\"api.test\".regions[5]",
            "hosts.\"api.test\".health_check.interval",
            "hosts.\"api.test\".health_check.path",
            "hosts.\"*.wild.test\".regions",
            "hosts.\"lonely.test\".health_check",
        ] {
            assert!(
                errors.iter().any(|e| e == want),
                "{want} missing from {errors:?}"
            );
        }
    }

    #[test]
    fn a_valid_region_table_passes() {
        let errors = errors_of(
            r#"
            [hosts."api.test"]
            mode = "hedge"
            hedge_after = "p99"
            retry_on = ["connect", "5xx", "429"]
            regions = [
              { name = "iad", address = "10.0.0.1:443", tls = true, sni = "api.test" },
              { name = "lax", addresses = ["10.0.1.1:443", "[::1]:443"] },
              { name = "ord", via = "http://sluice-ord.internal:8080" },
            ]
            health_check = { path = "/health", interval = "2s" }
            "#,
        );
        assert!(errors.is_empty(), "{errors:?}");
    }
}
