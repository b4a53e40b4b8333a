//! A compiled, immutable configuration generation: what a request reads while it runs.

use super::Config;
use crate::target::Origin;
use std::collections::HashMap;
use std::net::SocketAddr;

/// A route compiled from `[[routes]]`.
#[derive(Clone, Debug)]
pub struct Route {
    pub prefix: String,
    pub origin: Origin,
}

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
        Generation {
            number,
            config,
            routes,
            resolve,
        }
    }

    /// The route whose prefix matches `path` at a segment boundary, if any.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            path.strip_prefix(r.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        })
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
}
