//! A compiled, immutable configuration generation: what a request reads while it runs (the
//! validated `Config` with its routes, host profiles, egress policy and clients compiled).

use crate::config::{Config, HostLimits};
use crate::target::Origin;
use crate::target::Route;
use std::collections::HashMap;
use std::net::SocketAddr;

/// Host label for destinations not named in `[hosts]` (metrics, the access log).
pub const OTHER_HOST: &str = "other";

/// One validated configuration with its lookup tables. Requests hold an `Arc` of the
/// generation they started on, so a reload never changes a request in flight.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    pub config: Config,
    /// Longest prefix first, so the most specific route wins.
    pub routes: Vec<Route>,
    /// Static resolution, keyed by lowercased `host` or `host:port`.
    pub resolve: HashMap<String, Vec<SocketAddr>>,
    /// Host limit profiles: index 0 is `[defaults]`, then one per `[hosts]` entry.
    pub profiles: Vec<HostLimits>,
    /// The `[hosts]` name of each profile (`other` for the defaults): bounded metric labels.
    pub profile_names: Vec<String>,
    /// The egress policy compiled from `[security]`.
    pub egress: crate::policy::Egress,
    /// The clients of `[[clients]]` (authentication is on when any is listed).
    pub clients: crate::policy::auth::Clients,
    /// Some `[hosts]` entry lists regions.
    pub has_regions: bool,
    /// `[hosts]` names (`host` or `host:port`) to their profile.
    exact_hosts: HashMap<String, u16>,
    /// `[hosts."*.suffix"]` entries as (".suffix", profile), longest suffix first.
    wildcard_hosts: Vec<(String, u16)>,
}

impl Generation {
    /// Compile a configuration that passed `validate()`; values that would have failed
    /// validation are skipped rather than trusted.
    pub fn build(number: u64, config: Config) -> Generation {
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .filter_map(|r| {
                Origin::parse_with_base(&r.target).ok().map(|origin| Route {
                    prefix: r.prefix.clone(),
                    origin,
                })
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let resolve = config
            .resolve
            .iter()
            .map(|(name, addrs)| {
                let addrs = addrs.iter().filter_map(|a| a.parse().ok()).collect();
                (name.to_ascii_lowercase(), addrs)
            })
            .collect();
        let mut profiles = vec![config.defaults.clone()];
        let mut profile_names = vec![OTHER_HOST.to_string()];
        let mut exact_hosts = HashMap::new();
        let mut wildcard_hosts = Vec::new();
        for (name, o) in &config.hosts {
            let index = u16::try_from(profiles.len()).unwrap_or(u16::MAX);
            profiles.push(o.apply(&config.defaults));
            let name = name.to_ascii_lowercase();
            profile_names.push(name.clone());
            match name.strip_prefix('*') {
                Some(suffix) => wildcard_hosts.push((suffix.to_string(), index)),
                None => {
                    exact_hosts.insert(name, index);
                }
            }
        }
        wildcard_hosts.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let egress = crate::policy::Egress::new(&config.security);
        let clients = crate::policy::auth::Clients::new(&config.clients);
        let has_regions = config.hosts.values().any(|o| !o.regions.is_empty());
        Generation {
            number,
            has_regions,
            egress,
            clients,
            config,
            routes,
            resolve,
            profiles,
            profile_names,
            exact_hosts,
            wildcard_hosts,
        }
    }

    /// The limits profile for a destination: `host:port`, then `host`, then the longest
    /// matching `*.suffix`, then `[defaults]` (0). Also says whether `[hosts]` named it.
    pub fn profile_for(&self, host: &str, host_port: &str) -> (u16, bool) {
        if self.exact_hosts.is_empty() && self.wildcard_hosts.is_empty() {
            return (0, false);
        }
        if let Some(&i) = self.exact_hosts.get(host_port) {
            return (i, true);
        }
        if let Some(&i) = self.exact_hosts.get(host) {
            return (i, true);
        }
        for (suffix, i) in &self.wildcard_hosts {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return (*i, true);
            }
        }
        (0, false)
    }

    /// The metric label for a profile: its `[hosts]` name, or `other`.
    pub fn host_label(&self, profile: u16) -> &str {
        self.profile_names
            .get(usize::from(profile))
            .map_or(OTHER_HOST, String::as_str)
    }

    /// The limits of a profile index (the defaults if out of range).
    pub fn limits(&self, profile: u16) -> &HostLimits {
        self.profiles
            .get(usize::from(profile))
            .unwrap_or(&self.profiles[0])
    }

    /// The route whose prefix matches `path` at a segment boundary, if any.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        crate::target::route_for(&self.routes, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_at_segment_boundaries() {
        let config = Config::parse(
            r#"
            [[routes]]
            prefix = "/api"
            target = "http://a.test"
            [[routes]]
            prefix = "/api/v2"
            target = "http://b.test"
            "#,
        )
        .expect("valid");
        let g = Generation::build(1, config);
        assert_eq!(
            g.route_for("/api/v2/x").map(|r| r.origin.host.as_str()),
            Some("b.test")
        );
        assert_eq!(
            g.route_for("/api/v1").map(|r| r.origin.host.as_str()),
            Some("a.test")
        );
        assert_eq!(
            g.route_for("/api?q=1").map(|r| r.origin.host.as_str()),
            Some("a.test")
        );
        assert!(g.route_for("/apix").is_none());
        assert!(g.route_for("/").is_none());
    }

    #[test]
    fn host_profiles_exact_port_and_wildcard() {
        let config = Config::parse(
            r#"
            [defaults]
            rps = 2.0
            [hosts."api.example.com"]
            rps = 10.0
            [hosts."api.example.com:8443"]
            rps = 20.0
            [hosts."*.example.com"]
            burst = 5
            [hosts."*.eu.example.com"]
            burst = 7
            "#,
        )
        .expect("valid");
        config.validate().expect("valid");
        let g = Generation::build(1, config);
        let rps = |h: &str, hp: &str| g.limits(g.profile_for(h, hp).0).rps;
        let burst = |h: &str, hp: &str| g.limits(g.profile_for(h, hp).0).burst;
        assert_eq!(rps("api.example.com", "api.example.com:443"), 10.0);
        assert_eq!(rps("api.example.com", "api.example.com:8443"), 20.0);
        assert_eq!(burst("x.example.com", "x.example.com:443"), 5);
        assert_eq!(rps("x.example.com", "x.example.com:443"), 2.0);
        assert_eq!(burst("a.eu.example.com", "a.eu.example.com:443"), 7);
        assert_eq!(g.profile_for("example.com", "example.com:443"), (0, false));
        assert_eq!(g.profile_for("other.test", "other.test:80"), (0, false));
    }
}
