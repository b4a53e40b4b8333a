//! Who may use sluice and where it may connect: the egress policy, checked on the resolved
//! address (the exact address sluice then connects to, so DNS rebinding cannot slip past),
//! host allow/deny lists, CONNECT ports; and client authentication (`auth.rs`).

pub mod auth;

pub use crate::cidr::{embedded_v4, Cidr};

use crate::config::Security;
use crate::error::Code;
use std::net::{IpAddr, SocketAddr};

/// Ranges no request may reach unless `allow_cidrs` says so: this host, private networks,
/// link-local (cloud metadata), CGNAT, multicast, reserved and documentation ranges.
const DENIED_BY_DEFAULT: [&str; 24] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
    "100::/64",
    "2001:db8::/32",
    "64:ff9b:1::/48",
];

/// A compiled egress policy.
#[derive(Debug, Clone)]
pub struct Egress {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    defaults: Vec<Cidr>,
    allow_hosts: Vec<String>,
    deny_hosts: Vec<String>,
    connect_ports: Vec<u16>,
    connect_any_port: bool,
}

/// Why a destination was refused: the code and a reason for the client.
pub type Denial = (Code, String);

fn matches_host(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

impl Egress {
    /// Compile `[security]` (already validated: bad entries are skipped).
    pub fn new(s: &Security) -> Egress {
        let parse = |list: &[String]| list.iter().filter_map(|c| Cidr::parse(c).ok()).collect();
        Egress {
            allow: parse(&s.allow_cidrs),
            deny: parse(&s.deny_cidrs),
            defaults: DENIED_BY_DEFAULT
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            allow_hosts: s
                .allow_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            deny_hosts: s
                .deny_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            connect_ports: s.connect_ports.clone(),
            connect_any_port: s.connect_any_port,
        }
    }

    /// May requests go to this host name at all (before resolving it)?
    pub fn check_host(&self, host: &str) -> Result<(), Denial> {
        if self.deny_hosts.iter().any(|p| matches_host(p, host)) {
            return Err((
                Code::ForbiddenHost,
                format!("{host} is in security.deny_hosts"),
            ));
        }
        if !self.allow_hosts.is_empty() && !self.allow_hosts.iter().any(|p| matches_host(p, host)) {
            return Err((
                Code::ForbiddenHost,
                format!("{host} is not in security.allow_hosts"),
            ));
        }
        Ok(())
    }

    /// May a CONNECT tunnel open this port?
    pub fn check_connect_port(&self, port: u16) -> Result<(), Denial> {
        if self.connect_any_port || self.connect_ports.contains(&port) {
            Ok(())
        } else {
            Err((
                Code::ForbiddenPort,
                format!("CONNECT to port {port} is not allowed (security.connect_ports)"),
            ))
        }
    }

    /// Is this address allowed? IPv6 forms carrying an IPv4 address are judged by both.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let inner = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let candidates = [Some(ip), inner];
        let any_in = |list: &[Cidr]| {
            candidates
                .iter()
                .flatten()
                .any(|a| list.iter().any(|c| c.contains(*a)))
        };
        if any_in(&self.deny) {
            return false;
        }
        if let Some(v4) = inner {
            // The hidden IPv4 address decides: allowed only if it would be allowed itself.
            return self.allows(v4);
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return true;
        }
        !self.defaults.iter().any(|c| c.contains(ip))
    }

    /// Keep the allowed addresses; refuse when none is left.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Denial> {
        let total = addrs.len();
        let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| self.allows(a.ip())).collect();
        if allowed.is_empty() {
            let what = if total == 1 {
                "its address is"
            } else {
                "all its addresses are"
            };
            return Err((
                Code::ForbiddenDestination,
                format!(
                    "{host}: {what} in a range sluice does not reach (loopback, private, \
                     link-local/metadata, reserved); allow it with security.allow_cidrs"
                ),
            ));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(allow: &[&str], deny: &[&str]) -> Egress {
        Egress::new(&Security {
            allow_cidrs: allow.iter().map(|s| s.to_string()).collect(),
            deny_cidrs: deny.iter().map(|s| s.to_string()).collect(),
            ..Security::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn denies_internal_ranges_by_default_in_every_form() {
        let e = egress(&[], &[]);
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "::127.0.0.1",
            "2002:7f00:1::",
        ] {
            assert!(!e.allows(ip(bad)), "{bad} must be denied");
        }
        for good in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::101:101",
        ] {
            assert!(e.allows(ip(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn allow_and_deny_lists() {
        let e = egress(&["127.0.0.0/8", "10.0.0.0/8"], &["10.9.0.0/16", "1.1.1.1"]);
        assert!(e.allows(ip("127.0.0.1")));
        assert!(
            e.allows(ip("::ffff:127.0.0.1")),
            "mapped form follows its IPv4 address"
        );
        assert!(e.allows(ip("10.1.0.1")));
        assert!(!e.allows(ip("10.9.1.1")), "deny wins over allow");
        assert!(!e.allows(ip("1.1.1.1")));
        assert!(!e.allows(ip("::1")), "allowing 127/8 does not allow ::1");
    }

    #[test]
    fn hosts_and_ports() {
        let e = Egress::new(&Security {
            allow_hosts: vec!["api.example.com".into(), "*.stripe.com".into()],
            deny_hosts: vec!["evil.stripe.com".into()],
            ..Security::default()
        });
        assert!(e.check_host("api.example.com").is_ok());
        assert!(e.check_host("api.stripe.com").is_ok());
        assert!(e.check_host("stripe.com").is_err());
        assert!(e.check_host("xstripe.com").is_err());
        assert_eq!(
            e.check_host("evil.stripe.com").map_err(|r| r.0),
            Err(Code::ForbiddenHost)
        );
        assert!(e.check_connect_port(443).is_ok());
        assert_eq!(
            e.check_connect_port(22).map_err(|r| r.0),
            Err(Code::ForbiddenPort)
        );
    }

    #[test]
    fn filter_keeps_allowed_addresses_only() {
        let e = egress(&[], &[]);
        let addrs: Vec<SocketAddr> = vec![
            "10.0.0.1:443".parse().expect("a"),
            "93.184.216.34:443".parse().expect("b"),
        ];
        assert_eq!(e.filter("x", addrs).expect("one left").len(), 1);
        let only_private: Vec<SocketAddr> = vec!["10.0.0.1:443".parse().expect("a")];
        assert_eq!(
            e.filter("x", only_private).map_err(|r| r.0),
            Err(Code::ForbiddenDestination)
        );
    }
}
