//! From a destination host to socket addresses: IP literals as they are, `[resolve]` pins,
//! then DNS through hickory's asynchronous resolver (no thread per lookup): `/etc/hosts`
//! first, answers cached for their TTL (failures too, for their negative TTL), one lookup in
//! flight per name however many requests wait for it, and a bound on lookups in flight, past
//! which a new name fails at once rather than queueing behind a flood.

use crate::config::Server;
use crate::error::{error, Code};
use crate::generation::Generation;
use crate::metrics::Metrics;
use crate::target::ip_literal;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::TokioResolver;
use lru::LruCache;
use pingora_error::Error;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A failed lookup is remembered this long when the answer carries no negative TTL.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Bounds on how long an answer is kept, whatever its TTL says.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(3600);

/// What a lookup found: addresses (IPv4 first), or why none.
type DnsAnswer = Result<Arc<Vec<IpAddr>>, Arc<str>>;

struct Entry {
    answer: DnsAnswer,
    until: Instant,
}

type DnsLookup = Shared<BoxFuture<'static, DnsAnswer>>;

/// The DNS side of sluice: hickory's resolver, sluice's cache of its answers and the
/// lookups in flight.
pub struct Dns {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: TokioResolver,
    cache: Mutex<LruCache<String, Entry>>,
    in_flight: Mutex<HashMap<String, DnsLookup>>,
    max_in_flight: usize,
}

impl Dns {
    /// The resolver of `server`: its `dns_servers`, or `/etc/resolv.conf` when none is named.
    pub fn new(server: &Server) -> Result<Dns, String> {
        let (config, mut opts) = if server.dns_servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                format!("cannot read the system's DNS configuration ({e}); set server.dns_servers")
            })?
        } else {
            let mut group = NameServerConfigGroup::new();
            for s in &server.dns_servers {
                let addr: SocketAddr = s
                    .parse()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("server.dns_servers: {s:?} is not an address"))?;
                group.merge(NameServerConfigGroup::from_ips_clear(
                    &[addr.ip()],
                    addr.port(),
                    true,
                ));
            }
            (
                ResolverConfig::from_parts(None, vec![], group),
                ResolverOpts::default(),
            )
        };
        opts.use_hosts_file = ResolveHosts::Always;
        opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        // sluice keeps the answers (so it can count what the cache saves).
        opts.cache_size = 0;
        opts.timeout = server.dns_timeout.get();
        opts.attempts = 1;
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        let cap = NonZeroUsize::new(server.dns_cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Dns {
            inner: Arc::new(Inner {
                resolver,
                cache: Mutex::new(LruCache::new(cap)),
                in_flight: Mutex::new(HashMap::new()),
                max_in_flight: server.dns_max_in_flight,
            }),
        })
    }

    /// Addresses for `host:port`, in the order they should be tried.
    pub async fn resolve(
        &self,
        generation: &Generation,
        metrics: &Metrics,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, Box<Error>> {
        if let Some(addrs) = pinned(generation, host, port) {
            return Ok(addrs);
        }
        let name = host.to_ascii_lowercase();
        let answer = match self.inner.cached(&name) {
            Some(a) => {
                let hit = if a.is_ok() { "hit" } else { "negative_hit" };
                metrics.dns_cache.with_label_values(&[hit]).inc();
                a
            }
            None => {
                let lookup = Inner::lookup(&self.inner, &name, metrics)?;
                match tokio::time::timeout(timeout, lookup).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        return Err(error(
                            Code::Dns,
                            format!("DNS lookup of {host} timed out after {timeout:?}"),
                        ))
                    }
                }
            }
        };
        match answer {
            Ok(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            Err(why) => Err(error(Code::Dns, format!("DNS lookup of {host}: {why}"))),
        }
    }

    /// Lookups in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Inner {
    fn cached(&self, name: &str) -> Option<DnsAnswer> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(name) {
            Some(e) if e.until > Instant::now() => Some(e.answer.clone()),
            Some(_) => {
                cache.pop(name);
                None
            }
            None => None,
        }
    }

    /// The lookup of `name` in flight, joined, or a new one (if under the bound). A new one
    /// runs to its end in its own task, whoever still waits: it fills the cache, then leaves
    /// the table of lookups in flight.
    fn lookup(inner: &Arc<Inner>, name: &str, metrics: &Metrics) -> Result<DnsLookup, Box<Error>> {
        let mut in_flight = inner.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = in_flight.get(name) {
            metrics.dns_cache.with_label_values(&["coalesced"]).inc();
            return Ok(f.clone());
        }
        if in_flight.len() >= inner.max_in_flight {
            metrics.dns_lookups.with_label_values(&["refused"]).inc();
            return Err(error(
                Code::Dns,
                format!(
                    "{} DNS lookups already in flight (server.dns_max_in_flight): not looking up {name}",
                    inner.max_in_flight
                ),
            ));
        }
        metrics.dns_cache.with_label_values(&["miss"]).inc();
        let me = inner.clone();
        let owned = name.to_string();
        let counter = metrics.dns_lookups.clone();
        let fut = async move {
            let (answer, until, result) = me.ask(&owned).await;
            counter.with_label_values(&[result]).inc();
            if until > Instant::now() {
                let mut cache = me.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.put(
                    owned.clone(),
                    Entry {
                        answer: answer.clone(),
                        until,
                    },
                );
            }
            me.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&owned);
            answer
        }
        .boxed()
        .shared();
        in_flight.insert(name.to_string(), fut.clone());
        drop(in_flight);
        tokio::spawn(fut.clone());
        Ok(fut)
    }

    /// One question to the resolver: the answer, until when it holds, and the metric's
    /// result label.
    async fn ask(&self, name: &str) -> (DnsAnswer, Instant, &'static str) {
        let now = Instant::now();
        match self.resolver.lookup_ip(format!("{name}.")).await {
            Ok(found) => {
                let mut ips: Vec<IpAddr> = found.iter().collect();
                ips.sort_by_key(IpAddr::is_ipv6);
                ips.dedup();
                if ips.is_empty() {
                    return (Err(Arc::from("no address")), now + NEGATIVE_TTL, "empty");
                }
                let until = found.valid_until().clamp(now + MIN_TTL, now + MAX_TTL);
                (Ok(Arc::new(ips)), until, "ok")
            }
            Err(e) => {
                let negative = e.proto().and_then(|p| match p.kind() {
                    ProtoErrorKind::NoRecordsFound { negative_ttl, .. } => {
                        Some(negative_ttl.map_or(NEGATIVE_TTL, |s| {
                            Duration::from_secs(u64::from(s)).clamp(MIN_TTL, MAX_TTL)
                        }))
                    }
                    _ => None,
                });
                match negative {
                    Some(ttl) if e.is_nx_domain() => (
                        Err(Arc::from("no such name (NXDOMAIN)")),
                        now + ttl,
                        "nxdomain",
                    ),
                    Some(ttl) => (
                        Err(Arc::from("no address records")),
                        now + ttl,
                        "no_records",
                    ),
                    // A server that did not answer is not an answer to remember.
                    None => (Err(Arc::from(e.to_string().as_str())), now, "error"),
                }
            }
        }
    }
}

/// `[resolve]` pins and IP literals, which never need DNS.
fn pinned(generation: &Generation, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
    if let Some(ip) = ip_literal(host) {
        return Some(vec![SocketAddr::new(ip, port)]);
    }
    if generation.resolve.is_empty() {
        return None;
    }
    generation
        .resolve
        .get(&format!("{host}:{port}"))
        .or_else(|| generation.resolve.get(host))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn generation(toml: &str) -> Generation {
        Generation::build(1, Config::parse(toml).expect("valid"))
    }

    #[test]
    fn literals_and_pins_skip_dns() {
        let g = generation(
            "[resolve]\n\"api.test\" = [\"127.0.0.1:1000\"]\n\"api.test:8443\" = [\"127.0.0.2:2000\"]\n",
        );
        assert_eq!(
            pinned(&g, "::1", 80),
            Some(vec!["[::1]:80".parse().expect("addr")])
        );
        assert_eq!(
            pinned(&g, "api.test", 443),
            Some(vec!["127.0.0.1:1000".parse().expect("addr")])
        );
        assert_eq!(
            pinned(&g, "api.test", 8443),
            Some(vec!["127.0.0.2:2000".parse().expect("addr")])
        );
        assert_eq!(pinned(&g, "other.test", 443), None);
    }
}
